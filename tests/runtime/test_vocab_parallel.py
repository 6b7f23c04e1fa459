"""Vocab-parallel cross-entropy against F.cross_entropy on the full logits: one rank (the
padding rule alone) and two gloo ranks (the all-reduces), loss and gradient, every reduction,
ignore_index, label smoothing, padded vocabularies (one shard all padding)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.plan import Plan
from ranks import on_ranks
from runtime.mesh import Mesh
from runtime.vocab_parallel import vocab_parallel_cross_entropy

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _problem(shape, vocab, ranks, width, dtype, seed):
    """Full logits (shape + (vocab,)), the padded version cut into `ranks` shards of `width`
    (padding filled with large values so that counting it would show), targets with ignored
    tokens and a grad_output for reduction="none"."""
    generator = torch.Generator().manual_seed(seed)
    full = torch.randn(*shape, vocab, generator=generator, dtype=torch.float64) * 3
    junk = 40 + torch.randn(*shape, ranks * width - vocab, generator=generator,
                            dtype=torch.float64)
    shards = torch.cat([full, junk], dim=-1).to(dtype).chunk(ranks, dim=-1)
    target = torch.randint(0, vocab, shape, generator=generator)
    target.view(-1)[::5] = -100
    grad_out = torch.randn(shape, generator=generator, dtype=torch.float64)
    return full.to(dtype), shards, target, grad_out


def _reference(full, target, grad_out, **kwargs):
    """F.cross_entropy on the full logits (class dim last -> (N, C)), its gradient."""
    logits = full.detach().double().requires_grad_()  # low precision: compare with float64
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), **kwargs)
    if kwargs.get("reduction") == "none":
        loss = loss.reshape(target.shape)
        loss.backward(grad_out)
    else:
        loss.backward()
    return loss.detach(), logits.grad


def _run_case(mesh, shard, target, grad_out, vocab, **kwargs):
    local = shard.detach().clone().requires_grad_()
    group = mesh.group_names().get("tp")  # None: a group of one
    loss = vocab_parallel_cross_entropy(local, target, group, vocab_size=vocab, **kwargs)
    if kwargs.get("reduction") == "none":
        loss.backward(grad_out.to(loss.dtype))
    else:
        loss.backward()
    return loss.detach(), local.grad


def _errors(loss, grad, ref_loss, ref_grad, rank, width, vocab):
    """(loss error, gradient error on this shard's real columns, max |gradient| on padding)."""
    start = rank * width
    real = max(0, min(width, vocab - start))
    loss_err = (loss.double() - ref_loss).abs().max().item() / (ref_loss.abs().max().item()
                                                                + 1e-30)
    mine = ref_grad[..., start:start + real]
    grad_err = ((grad[..., :real].double() - mine).abs().max().item()
                / (ref_grad.abs().max().item() + 1e-30)) if real else 0.0
    padding = grad[..., real:].abs().max().item() if real < width else 0.0
    return loss_err, grad_err, padding


# --- one rank: no group, only the padding rule and the math ------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_one_rank_matches_cross_entropy_and_skips_padding(reduction, label_smoothing):
    mesh = Mesh(Plan().resolve(1), 0, live=False)
    full, (shard,), target, grad_out = _problem((3, 5), 11, 1, 13, torch.float64, seed=0)
    kwargs = dict(reduction=reduction, label_smoothing=label_smoothing)
    ref_loss, ref_grad = _reference(full, target, grad_out, **kwargs)
    loss, grad = _run_case(mesh, shard, target, grad_out, 11, **kwargs)
    assert loss.shape == ref_loss.shape
    loss_err, grad_err, padding = _errors(loss, grad, ref_loss, ref_grad, 0, 13, 11)
    assert loss_err < 1e-13 and grad_err < 1e-13 and padding == 0.0


def test_in_vocabulary_ignore_index_and_all_ignored_mean_is_nan():
    mesh = Mesh(Plan().resolve(1), 0, live=False)
    full, (shard,), target, grad_out = _problem((4, 6), 9, 1, 9, torch.float64, seed=1)
    target = target.clamp(min=0)  # class 0 is the ignored one now
    ref_loss, ref_grad = _reference(full, target, grad_out, ignore_index=0)
    loss, grad = _run_case(mesh, shard, target, grad_out, 9, ignore_index=0)
    assert _errors(loss, grad, ref_loss, ref_grad, 0, 9, 9)[:2] < (1e-13, 1e-13)
    ignored = torch.full((4, 6), -100)
    nan = vocab_parallel_cross_entropy(shard, ignored, vocab_size=9)
    assert torch.isnan(nan) and torch.isnan(F.cross_entropy(full.reshape(-1, 9),
                                                            ignored.reshape(-1)))


def test_bad_arguments_fail_clearly():
    logits = torch.randn(2, 4, 8)
    with pytest.raises(RuntimeError, match="outside \\[0, vocab_size\\)"):
        vocab_parallel_cross_entropy(logits, torch.full((2, 4), 7), vocab_size=6)
    with pytest.raises(ValueError, match="reduction 'avg'"):
        vocab_parallel_cross_entropy(logits, torch.zeros(2, 4, dtype=torch.long),
                                     vocab_size=8, reduction="avg")
    with pytest.raises(ValueError, match="target shape"):
        vocab_parallel_cross_entropy(logits, torch.zeros(8, dtype=torch.long), vocab_size=8)


# --- two gloo ranks ----------------------------------------------------------------------------

CASES = [
    # name, token shape, vocab, width a rank, dtype, kwargs
    ("even vocab mean", (4, 8), 16, 8, torch.float64, {}),
    ("padded vocab sum", (4, 8), 15, 8, torch.float64, dict(reduction="sum")),
    ("padded vocab none", (4, 8), 15, 8, torch.float64, dict(reduction="none")),
    ("second shard all padding", (6,), 3, 4, torch.float64, {}),
    ("ignore_index inside the vocabulary", (3, 7), 15, 8, torch.float64,
     dict(ignore_index=3, reduction="sum")),
    ("label smoothing, padded, ignored tokens", (4, 8), 15, 8, torch.float64,
     dict(label_smoothing=0.1)),
    ("label smoothing none", (5,), 15, 8, torch.float64,
     dict(label_smoothing=0.2, reduction="none")),
    ("float32", (4, 8), 511, 256, torch.float32, {}),
    ("bfloat16 computes in float32", (4, 8), 511, 256, torch.bfloat16, dict(reduction="sum")),
]


def _two_rank_worker(cases):
    import torch.distributed as dist

    mesh = Mesh(Plan(tp=2).resolve(2))
    rank = mesh.coord("tp")
    results = []
    for index, (name, shape, vocab, width, dtype, kwargs) in enumerate(cases):
        full, shards, target, grad_out = _problem(shape, vocab, 2, width, dtype, seed=index)
        kwargs = dict(kwargs)
        ignore = kwargs.get("ignore_index")
        if ignore is not None:  # -100 is a class out of range then, as for F.cross_entropy
            target[target == -100] = 0
            target.view(-1)[1::4] = ignore
        ref_loss, ref_grad = _reference(full, target, grad_out, **kwargs)
        loss, grad = _run_case(mesh, shards[rank], target, grad_out, vocab, **kwargs)
        results.append((name, dtype, loss.dtype == dtype,
                        *_errors(loss, grad, ref_loss, ref_grad, rank, width, vocab)))
    dist.barrier()
    return results


def test_two_ranks_match_cross_entropy_on_full_logits():
    per_rank = on_ranks(2, _two_rank_worker, CASES, timeout=240)
    bad = []
    for rank, results in enumerate(per_rank):
        assert len(results) == len(CASES)
        for name, dtype, same_dtype, loss_err, grad_err, padding in results:
            tol = TOLERANCE[dtype]
            if not (same_dtype and loss_err <= tol and grad_err <= tol and padding == 0.0):
                bad.append(f"rank {rank} {name}: dtype kept {same_dtype}, loss {loss_err:.1e}, "
                           f"grad {grad_err:.1e}, padding grad {padding:.1e} (tol {tol:.0e})")
    assert not bad, "\n".join(bad)
