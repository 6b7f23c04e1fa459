"""dp=2 (and ZeRO-1) against one device on real gloo ranks: outputs, loss, every gradient,
the global gradient norm and the weights after AdamW steps (partitioner.check.check_rank)."""

import pytest
import torch

from equivalence import assert_passed
from partitioner.check import check_rank
from partitioner.models import tiny, tiny_llama
from ranks import on_ranks

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _run_cases(cases):
    return [(name, check_rank(factory, plan, dtype=DTYPES[dtype], **kw))
            for name, factory, plan, dtype, kw in cases]


IN_REPO = [
    (f"{model}-{plan}-{dtype}", factory, plan, dtype, {})
    for model, factory in (("gpt", tiny), ("llama", tiny_llama))
    for plan in ("dp=2", "dp=2,zero=1")
    for dtype in ("float64", "float32")
] + [
    ("gpt-microbatches-token-weighted", tiny, "dp=2,mb=2", "float64", {"token_weighted": True}),
    ("llama-zero-mb2-token-weighted", tiny_llama, "dp=2,zero=1,mb=2", "float32",
     {"token_weighted": True}),
    ("gpt-meta-load", tiny, "dp=2", "float64", {"meta": True}),
    ("llama-meta-load-zero", tiny_llama, "dp=2,zero=1", "float64", {"meta": True}),
]


def test_in_repo_models_dp2_match_one_device():
    assert_passed(on_ranks(2, _run_cases, IN_REPO), IN_REPO)


def _hf_cases():
    from model_zoo import hf_gpt2, hf_llama

    return [(f"{name}-{plan}-{dtype}", factory, plan, dtype, {})
            for name, factory in (("hf-llama", hf_llama), ("hf-gpt2", hf_gpt2))
            for plan in ("dp=2", "dp=2,zero=1")
            for dtype in ("float64", "float32")]


def _run_hf():
    return _run_cases(_hf_cases())


def test_hugging_face_models_dp2_match_one_device():
    pytest.importorskip("transformers")
    assert_passed(on_ranks(2, _run_hf), _hf_cases())


def _semantics():
    """Gradient accumulation, ZeRO-1 parameter sharding and call shapes on 2 ranks."""
    import copy

    import torch.distributed as dist

    from partitioner import parallelize
    from partitioner.check import lm_loss

    torch.manual_seed(0)
    model, (ids,) = tiny(batch=4)
    model = model.double()
    target = torch.randint(0, 512, ids.shape, generator=torch.Generator().manual_seed(3))
    reference = copy.deepcopy(model)
    out = {}

    pm = parallelize(model, "dp=2", example_inputs=(ids,), loss_fn=lm_loss)
    pm.step(ids, target=target)
    pm.step(ids, target=target)  # .grad accumulates, as two backward() calls would
    lm_loss(reference(ids), target).backward()
    lm_loss(reference(ids), target).backward()
    grads = pm.full_grad_dict()
    out["accumulates"] = max((grads[n] - p.grad).abs().max().item()
                             for n, p in reference.named_parameters())
    local = list(pm.parameters())
    out["params_are_local_copies"] = all(
        p is not q for p in local for q in model.parameters())
    out["params_once"] = len(local) == len({id(p) for p in local}) == len(
        list(model.parameters()))
    odd = ids[:3, :7]  # any batch >= 1, any length: captured again and cached
    out["call_any_shape"] = (pm(odd) - reference(odd)).abs().max().item()
    out["programs_cached"] = len(pm.executor.programs.training)

    zero = parallelize(copy.deepcopy(reference), "dp=2,zero=1", example_inputs=(ids,),
                       loss_fn=lm_loss)
    shards = list(zero.parameters())
    total = sum(p.numel() for p in reference.parameters())
    out["zero_shard_fraction"] = sum(s.numel() for s in shards) / total
    out["zero_shards_differ"] = [s.detach()[:4].tolist() for s in shards]
    out["explain"] = zero.explain().splitlines()[0]
    auto = parallelize(copy.deepcopy(reference), "auto", example_inputs=(ids,), loss_fn=lm_loss)
    out["auto"] = (auto.plan.world_size, (auto.step(ids, target=target)
                                          - lm_loss(reference(ids), target)).abs().item())
    return out


def test_accumulation_zero_shards_and_call_shapes():
    results = on_ranks(2, _semantics)
    for r in results:
        assert r["accumulates"] < 1e-12
        assert r["params_are_local_copies"] and r["params_once"]
        assert r["call_any_shape"] < 1e-12
        assert r["programs_cached"] == 2  # the step's microbatch shape and the odd call shape
        assert 0.5 <= r["zero_shard_fraction"] < 0.51  # each rank holds half (plus padding)
        assert r["explain"].startswith("rank ")
        assert r["auto"][0] == 2 and r["auto"][1] < 1e-12  # the cost model's pick runs exactly
    assert results[0]["zero_shards_differ"] != results[1]["zero_shards_differ"]
