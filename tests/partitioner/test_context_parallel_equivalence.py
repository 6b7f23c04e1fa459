"""Context parallelism against one device on real gloo ranks (float64): outputs, loss, every
gradient, the gradient norm and the weights after AdamW steps, for ring and all-to-all
attention alone and composed with tp, sp, dp, zero=1 and pp; masks (bidirectional, sliding
window, packed documents); Hugging Face models, with `labels=` shifted inside the graph.
Two spawns (2 and 4 ranks) check everything."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from equivalence import assert_passed, equivalence_worker
from model_zoo import hf_gpt2, hf_llama
from partitioner.check import EquivalenceReport, TOLERANCES, lm_loss_sum, relative_error
from ranks import on_ranks

F64 = torch.float64

TWO_RANKS = [
    ("gpt-ring", "tiny", {}, "cp=2", F64),
    ("llama-ring", "tiny_llama", {}, "cp=2", F64),
    ("llama-a2a", "tiny_llama", {}, "cp=2,cp_algo=a2a", F64),
    ("gpt-ring-token-weighted-mb2", "tiny", {}, "cp=2,mb=2", F64, {"token_weighted": True}),
    ("llama-ring-zero", "tiny_llama", {}, "cp=2,zero=1", F64),
    ("gpt-ring-float32", "tiny", {}, "cp=2", torch.float32),
    # lengths that do not split: padded at the end (exact under causal attention)
    ("gpt-ring-padded", "tiny", {"seq": 18}, "cp=2", F64, {"token_weighted": True}),
    ("llama-a2a-padded", "tiny_llama", {"seq": 15}, "cp=2,cp_algo=a2a", F64,
     {"token_weighted": True}),
]
FOUR_RANKS = [
    ("hf-gpt2-tp2-cp2", hf_gpt2, {}, "tp=2,cp=2", F64),
    ("gpt-ring-cp4", "tiny", {}, "cp=4", F64),
    ("llama-tp2-sp-cp2", "tiny_llama", {}, "tp=2,sp=on,cp=2", F64),
    ("gpt-tp2-cp2-a2a", "tiny_llama", {}, "tp=2,cp=2,cp_algo=a2a", F64),
    ("llama-cp2-dp2", "tiny_llama", {}, "cp=2,dp=2", F64),
    ("gpt-cp2-pp2", "tiny", {}, "cp=2,pp=2,mb=2", F64),
    ("llama-cp2-dp2-zero", "tiny_llama", {}, "cp=2,dp=2,zero=1", F64, {"token_weighted": True}),
    ("llama-tp2-sp-cp2-padded", "tiny_llama", {"seq": 20}, "tp=2,sp=on,cp=2", F64,
     {"token_weighted": True}),
]
HF = [
    ("hf-llama-ring", hf_llama, {}, "cp=2", F64),
    ("hf-llama-a2a", hf_llama, {}, "cp=2,cp_algo=a2a", F64),
    ("hf-gpt2-ring", hf_gpt2, {}, "cp=2", F64),  # learned positions, Conv1D on flat rows
]


class MaskedLM(nn.Module):
    """A one-layer LM whose attention mask is built in the graph from its inputs: causal or
    bidirectional, a sliding window, documents packed in a row (per-token document ids)."""

    def __init__(self, causal: bool = True, window: int | None = None, documents: bool = False):
        super().__init__()
        self.causal, self.window, self.documents = causal, window, documents
        self.embed = nn.Embedding(64, 32)
        self.pos = nn.Embedding(32, 32)
        self.qkv = nn.Linear(32, 96)
        self.out = nn.Linear(32, 32)
        self.head = nn.Linear(32, 64)

    def forward(self, ids, doc=None):
        b, s = ids.shape
        x = self.embed(ids) + self.pos(torch.arange(s, device=ids.device))
        q, k, v = (t.view(b, s, 4, 8).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        mask = None
        if self.window is not None:
            mask = torch.ones(s, s, dtype=torch.bool, device=ids.device).tril().triu(
                1 - self.window)
        if self.documents:
            same = (doc[:, :, None] == doc[:, None, :])[:, None]
            causal = torch.ones(s, s, dtype=torch.bool, device=ids.device).tril()
            mask = same & causal
        is_causal = self.causal and mask is None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        x = x + self.out(y.transpose(1, 2).reshape(b, s, 32))
        return self.head(x)


def _masked_cases():
    return [("bidirectional-ring", dict(causal=False), "cp=2", 16),
            ("bidirectional-a2a", dict(causal=False), "cp=2,cp_algo=a2a", 16),
            ("sliding-window-ring", dict(window=5), "cp=2", 16),
            ("sliding-window-a2a", dict(window=5), "cp=2,cp_algo=a2a", 16),
            ("packed-documents-ring", dict(documents=True), "cp=2", 16),
            ("packed-documents-a2a", dict(documents=True), "cp=2,cp_algo=a2a", 16),
            ("packed-documents-ring-padded", dict(documents=True), "cp=2", 15),
            ("sliding-window-a2a-padded", dict(window=5), "cp=2,cp_algo=a2a", 15)]


def _check_masked(name: str, kwargs: dict, plan: str, seq: int) -> tuple[str, EquivalenceReport]:
    """Outputs, loss and gradients of MaskedLM (token-weighted loss with ignored labels)."""
    import copy

    import torch.distributed as dist

    from partitioner import parallelize

    torch.manual_seed(0)
    model = MaskedLM(**kwargs).double()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 64, (4, seq))
    doc = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4] * 2 + [[0] * 9 + [1] * 7] * 2)[:, :seq]
    target = torch.randint(0, 64, (4, seq))
    target[:, -3:] = -100
    args = (ids, doc) if kwargs.get("documents") else (ids,)
    pm = parallelize(model, plan, example_inputs=args, loss_fn=lm_loss_sum)
    errors = {"output": relative_error(pm(*args), reference(*args))}
    loss = pm.step(*args, target=target)
    total, count = lm_loss_sum(reference(*args), target)
    (total / count).backward()
    errors["loss"] = relative_error(loss, total / count)
    grads = pm.full_grad_dict()
    errors["gradients"] = max(relative_error(grads[n], p.grad)
                              for n, p in reference.named_parameters())
    return name, EquivalenceReport(rank=dist.get_rank(), dtype="float64", errors=errors,
                                   tolerance=TOLERANCES[F64])


def _check_hf_labels(seq: int) -> tuple[str, EquivalenceReport]:
    """A Hugging Face causal LM given `labels=` shifts them inside the graph (pad, slice) and
    returns its own mean loss: the shift is done on the whole sequence, the loss read whole."""
    import copy

    import torch.distributed as dist

    from partitioner import parallelize

    torch.manual_seed(0)
    model, (ids,) = hf_llama(seq=seq)  # 15: padded to 16
    model = model.double()
    reference = copy.deepcopy(model)
    labels = ids.clone()
    labels[:, :3] = -100
    pm = parallelize(model, "cp=2", example_inputs=(), example_kwargs={
        "input_ids": ids, "labels": labels})
    loss = pm.step(input_ids=ids, labels=labels)
    ref_loss = reference(input_ids=ids, labels=labels).loss
    ref_loss.backward()
    grads = pm.full_grad_dict()
    errors = {"loss": relative_error(loss, ref_loss),
              "gradients": max(relative_error(grads[n], p.grad)
                               for n, p in reference.named_parameters() if p.grad is not None),
              "logits": relative_error(pm(input_ids=ids, labels=labels).logits,
                                       reference(input_ids=ids, labels=labels).logits)}
    return f"hf-llama-labels-{seq}", EquivalenceReport(rank=dist.get_rank(), dtype="float64",
                                                errors=errors, tolerance=TOLERANCES[F64])


def _semantics() -> dict:
    """What cp refuses or steps aside for, on running ranks."""
    from partitioner import parallelize
    from partitioner.check import lm_loss
    from partitioner.models import tiny

    torch.manual_seed(0)
    model, (ids,) = tiny(batch=4, seq=16)
    reference = model.double()
    pm = parallelize(model, "cp=2", example_inputs=(ids,), loss_fn=lm_loss)
    odd = ids[:, :15]  # 15 does not split into 4 chunks: the call pads it to 16
    out = {"odd_length_call": relative_error(pm(odd), reference(odd))}
    target = ids.roll(-1, 1)
    target[:, -1] = -100
    try:
        pm.step(ids, target=target)
    except ValueError as error:
        out["mean_with_ignored"] = str(error)
    # cp_pad=off: a forward call of a length that does not split runs without cp; a step of
    # it is refused (it never trains on the forward-only program)
    strict = parallelize(model, "cp=2,cp_pad=off", example_inputs=(ids,), loss_fn=lm_loss)
    out["stepped_aside_call"] = relative_error(strict(odd), reference(odd))
    try:
        strict.step(odd, target=odd)
    except ValueError as error:
        out["odd_length_step"] = str(error)
    return out


def _two_ranks(cases, masked, hf):
    reports = equivalence_worker(cases)
    reports += [_check_masked(*case) for case in masked]
    if hf:
        reports += equivalence_worker(HF) + [_check_hf_labels(16), _check_hf_labels(15)]
    return reports, _semantics()


def test_cp_on_two_ranks_matches_one_device():
    try:
        import transformers  # noqa: F401  (the Hugging Face cases need it)
        hf = True
    except ImportError:
        hf = False
    results = on_ranks(2, _two_ranks, TWO_RANKS, _masked_cases(), hf)
    names = [c[0] for c in TWO_RANKS] + [c[0] for c in _masked_cases()] + (
        [c[0] for c in HF] + ["hf-llama-labels-16", "hf-llama-labels-15"] if hf else [])
    assert_passed([reports for reports, _ in results], names)
    for _, semantics in results:
        assert semantics["odd_length_call"] < 1e-12
        assert "Return (loss_sum, token_count)" in semantics["mean_with_ignored"]
        assert semantics["stepped_aside_call"] < 1e-12
        assert "sequence length 15 does not split" in semantics["odd_length_step"]


def test_cp_with_tp_sp_dp_zero_pp_on_four_ranks_matches_one_device():
    assert_passed(on_ranks(4, equivalence_worker, FOUR_RANKS), FOUR_RANKS)
