"""Expert parallelism against one device on real gloo ranks: outputs, loss, every gradient, the
gradient norm and the weights after AdamW steps, with ep folded onto data-parallel ranks and
onto tensor-parallel ranks (with and without sp), experts split inside by etp = tp, with pp,
with microbatches, with ZeRO-1, folded onto context-parallel ranks (Megatron's parallel folding:
each cp rank dispatches its share of the gathered tokens); softmax (Mixtral-style) and sigmoid +
selection bias + shared expert (DeepSeek-style) routers; experts and a whole rank that receive
no tokens; Hugging Face Mixtral unchanged, with both of its exported expert forms; experts
written as an nn.ModuleList of MLPs run in a loop (each expert's parameters held whole by one ep
rank); checkpoints moved between ep=2 (also beside cp=2, also of ModuleList experts) and dp=2.
Two spawns."""

from __future__ import annotations

import torch

from equivalence import assert_passed, equivalence_worker
from model_zoo import hf_mixtral, looped_moe, starved_moe
from partitioner.models import tiny_moe
from ranks import on_ranks

F64 = torch.float64
DEEPSEEK = {"router": "sigmoid", "shared_experts": 1}

TWO_RANKS = [
    ("moe-ep2", "tiny_moe", {}, "ep=2", F64),
    ("moe-gelu-top1-ep2", "tiny", {"n_experts": 4, "topk": 1}, "ep=2", F64),
    ("deepseek-ep2", "tiny_moe", DEEPSEEK, "ep=2", F64),
    ("moe-ep2-mb2-token-weighted", "tiny_moe", {}, "ep=2,mb=2", F64, {"token_weighted": True}),
    ("moe-ep2-float32", "tiny_moe", {}, "ep=2", torch.float32),
    # expert 0 and every expert of rank 1 receive no token
    ("moe-ep2-no-tokens", starved_moe, {}, "ep=2", F64),
    # ep over the tp ranks: each dispatches its half of the (replicated) tokens
    ("moe-tp2-ep2", "tiny_moe", {}, "tp=2,ep=2,etp=1", F64),
    ("moe-tp2-sp-ep2", "tiny_moe", {}, "tp=2,sp=on,ep=2,etp=1", F64),
    ("moe-ep2-zero", "tiny_moe", {}, "ep=2,zero=1", F64),
    # ep over the cp ranks: each dispatches its half of the (gathered) sequence
    ("moe-cp2-ep2", "tiny_moe", {}, "cp=2,ep=2", F64),
    ("deepseek-cp2-ep2", "tiny_moe", DEEPSEEK, "cp=2,ep=2", F64),
    # 7 tokens padded to 8: the 7 gathered ones do not halve, both cp ranks dispatch them all
    ("moe-cp2-ep2-odd-tokens", "tiny_moe", {"batch": 1, "seq": 7}, "cp=2,ep=2", F64,
     {"token_weighted": True}),
    # experts as a ModuleList of MLPs: stacked per rank for the grouped GEMMs, each expert's
    # parameters held by one ep rank (over dp, over tp with etp=1; ZeRO-1 on four ranks)
    ("looped-ep2", looped_moe, {}, "ep=2", F64),
    ("looped-tp2-ep2", looped_moe, {}, "tp=2,ep=2,etp=1", F64),
    ("looped-bias-ep2", looped_moe, {"bias": True}, "ep=2", F64),
]
HF = [
    # torch's eager grouped GEMM (the reference's path) takes no float64
    ("hf-mixtral-grouped-mm-ep2", hf_mixtral, {}, "ep=2", torch.float32),
    ("hf-mixtral-batched-mm-ep2", hf_mixtral, {"experts_implementation": "batched_mm"}, "ep=2",
     F64),
    ("hf-mixtral-tp2-ep2", hf_mixtral, {"experts_implementation": "batched_mm"},
     "tp=2,ep=2,etp=1", F64),
    ("hf-mixtral-grouped-mm-cp2-ep2", hf_mixtral, {}, "cp=2,ep=2", torch.float32),
    ("hf-mixtral-batched-mm-cp2-ep2", hf_mixtral, {"experts_implementation": "batched_mm"},
     "cp=2,ep=2", F64),
]
FOUR_RANKS = [
    ("moe-ep4", "tiny_moe", {}, "ep=4", F64),
    ("moe-ep2-dp4", "tiny_moe", {}, "dp=4,ep=2", F64),  # edp=2: expert gradients summed
    ("moe-ep2-pp2", "tiny_moe", {}, "ep=2,pp=2,mb=2", F64),
    ("deepseek-ep4-dense-first", "tiny_moe", {**DEEPSEEK, "dense_layers": 1}, "ep=4", F64),
    ("moe-tp2-ep4", "tiny_moe", {}, "tp=2,ep=4,etp=1", F64),  # one ep group over tp x dp
    ("moe-tp2-sp-ep2-dp2", "tiny_moe", {}, "tp=2,sp=on,ep=2,etp=1", F64),
    # ZeRO-1: dense state split over dp=4, the experts' over edp=2
    ("moe-ep2-dp4-zero", "tiny_moe", {}, "dp=4,ep=2,zero=1", F64),
    # etp = tp = 2 (Megatron's default): each expert column/row split over the tp ranks
    ("moe-tp2-ep2-etp2", "tiny_moe", {}, "tp=2,ep=2", F64),
    ("moe-gelu-tp2-sp-ep2-etp2", "tiny", {"n_experts": 4, "topk": 2}, "tp=2,sp=on,ep=2", F64),
    # ep beside cp: one ep group over cp x dp; over tp x cp (etp=1, each of the 4 ranks
    # dispatches a quarter of the tokens); with etp = tp; with ZeRO-1 (edp=2)
    ("moe-dp2-cp2-ep4", "tiny_moe", {}, "dp=2,cp=2,ep=4", F64),
    ("moe-tp2-cp2-ep2", "tiny_moe", {}, "tp=2,cp=2,ep=2,etp=1", F64),
    ("moe-tp2-cp2-ep2-etp2", "tiny_moe", {}, "tp=2,cp=2,ep=2", F64),
    ("moe-cp2-ep2-dp2-zero", "tiny_moe", {}, "cp=2,ep=2,dp=2,zero=1", F64),
    # ModuleList experts: edp=2 with ZeRO-1, one expert per rank top-1, with pp
    ("looped-dp4-ep2-zero", looped_moe, {}, "dp=4,ep=2,zero=1", F64),
    ("looped-ep4-top1", looped_moe, {"topk": 1}, "ep=4", F64),
    ("looped-ep2-pp2", looped_moe, {}, "ep=2,pp=2,mb=2", F64),
]
HF_FOUR_RANKS = [
    ("hf-mixtral-batched-mm-tp2-ep2-etp2", hf_mixtral, {"experts_implementation": "batched_mm"},
     "tp=2,ep=2", F64),
]


def _balance() -> tuple[str, list[list[int]]]:
    """explain() and the rows each of this rank's experts received in a step of the starved
    model (batch 4 over ep=2 folded on dp=2: 2 sequences of 16 tokens per rank, top-2)."""
    from partitioner import parallelize
    from partitioner.check import lm_loss

    model, (ids,) = starved_moe()
    pm = parallelize(model.double(), "ep=2", example_inputs=(ids,), loss_fn=lm_loss)
    pm.step(ids, target=ids)
    return pm.explain(), pm.last_expert_rows


TWO_RANK_CHECKPOINTS = (("ep=2", "dp=2"), ("ep=2", "ep=2"), ("dp=2", "ep=2"),
                        ("ep=2,zero=1", "dp=2"), ("dp=2,zero=1", "ep=2,zero=1"),
                        ("cp=2,ep=2", "dp=2"))
FOUR_RANK_CHECKPOINTS = (("tp=2,ep=2", "dp=4"), ("dp=4,zero=1", "tp=2,ep=2,zero=1"))


def _checkpoints(path: str, pairs) -> dict[str, float]:
    """Save under one plan after an AdamW step, load under another (experts split over ep or
    etp, or whole on every rank): the same weights and the same next step."""
    from partitioner.capture import shared_captures

    with shared_captures(("tiny_moe", "float64")):  # one model, captured once per shape
        return _save_and_load(path, pairs)


def _save_and_load(path: str, pairs, factory=tiny_moe) -> dict[str, float]:
    import torch.distributed as dist

    from partitioner import parallelize
    from partitioner.check import lm_loss, relative_error

    model, (ids,) = factory()
    model = model.double()
    out = {}
    for saved_under, loaded_under in pairs:
        torch.manual_seed(0)
        pm = parallelize(model, saved_under, example_inputs=(ids,), loss_fn=lm_loss)
        opt = torch.optim.AdamW(pm.parameters(), lr=1e-2)
        pm.step(ids, target=ids)
        opt.step()
        where = f"{path}/{factory.__name__}-{saved_under}-{loaded_under}"
        pm.save(where, optimizer=opt)
        weights = pm.full_state_dict()
        other = parallelize(model, loaded_under, example_inputs=(ids,), loss_fn=lm_loss)
        other_opt = torch.optim.AdamW(other.parameters(), lr=1e-2)
        other.load(where, optimizer=other_opt)
        loaded = other.full_state_dict()
        name = f"{factory.__name__} {saved_under}->{loaded_under}"
        out[f"{name} weights"] = max(relative_error(loaded[k], v) for k, v in weights.items())
        for p, q in ((pm, opt), (other, other_opt)):
            q.zero_grad()
            p.step(ids, target=ids)
            q.step()
        after, other_after = pm.full_state_dict(), other.full_state_dict()
        out[f"{name} next step"] = max(relative_error(other_after[k], v)
                                       for k, v in after.items())
        dist.barrier()
    return out


LOOPED_CHECKPOINTS = (("ep=2", "dp=2"), ("dp=2,zero=1", "ep=2,zero=1"))


def _two_ranks(cases, path):
    return equivalence_worker(cases), _balance(), {
        **_checkpoints(path, TWO_RANK_CHECKPOINTS),
        **_save_and_load(path, LOOPED_CHECKPOINTS, looped_moe)}


def _four_ranks(cases, path):
    return equivalence_worker(cases), _checkpoints(path, FOUR_RANK_CHECKPOINTS)


def test_ep_on_two_ranks_matches_one_device(tmp_path):
    try:
        import transformers  # noqa: F401  (the Hugging Face cases need it)
        cases = TWO_RANKS + HF
    except ImportError:
        cases = TWO_RANKS
    results = on_ranks(2, _two_ranks, cases, str(tmp_path))
    assert_passed([reports for reports, _, _ in results], cases)
    for _, _, checkpoints in results:
        assert max(checkpoints.values()) < 1e-12, checkpoints
    (explain_0, rows_0), (explain_1, rows_1) = [balance for _, balance, _ in results]
    assert "blocks.0.mlp: 8 experts top-2, experts 0..3 here" in explain_0
    assert "blocks.0.mlp: 8 experts top-2, experts 4..7 here" in explain_1
    # one dispatch per layer; every (token, choice) of both ranks lands on rank 0's experts
    # 1..3 (expert 0 and experts 4..7 are never chosen)
    assert len(rows_0) == len(rows_1) == 2
    assert all(rows[0] == 0 and sum(rows) == 2 * 2 * 16 * 2 for rows in rows_0)
    assert rows_1 == [[0, 0, 0, 0]] * 2
    assert "rows this rank's experts received in the last step" in explain_0


def test_ep_with_tp_dp_pp_and_expert_tp_on_four_ranks_matches_one_device(tmp_path):
    try:
        import transformers  # noqa: F401  (the Hugging Face cases need it)
        cases = FOUR_RANKS + HF_FOUR_RANKS
    except ImportError:
        cases = FOUR_RANKS
    results = on_ranks(4, _four_ranks, cases, str(tmp_path))
    assert_passed([reports for reports, _ in results], cases)
    for _, checkpoints in results:
        assert max(checkpoints.values()) < 1e-12, checkpoints
