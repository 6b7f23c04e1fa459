"""Triton flash attention vs runtime/kernels/reference.py under the interpreter.

Tolerances (max abs error, also relative for larger values): float32 1e-4 on out/lse and 2e-4 on
gradients; float16 2e-3 on out/lse and 1e-2 on gradients (inputs ~N(0, 1), outputs O(1)).
bfloat16 is not run here: Triton 3.x's interpreter returns garbage for tl.dot on bfloat16
operands (a plain bf16 load/store kernel is exact), so bf16 attention is only checked on a GPU.
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from runtime.kernels import flash_attention, reference  # noqa: E402

TOL = {torch.float32: (1e-4, 2e-4), torch.float16: (2e-3, 1e-2)}

# (batch, heads, kv_heads, seq_q, seq_k, head_dim, causal, q_offset, k_offset)
CASES = [
    pytest.param(1, 2, 2, 37, 37, 32, True, 0, 0, id="causal-ragged"),
    pytest.param(2, 4, 2, 50, 33, 24, False, 0, 0, id="gqa-noncausal-sq!=sk-d24"),
    pytest.param(1, 4, 1, 19, 45, 40, True, 30, 0, id="mqa-causal-qoffset-d40"),
    pytest.param(1, 2, 2, 40, 40, 16, True, 0, 20, id="koffset-empty-rows"),
    pytest.param(1, 2, 1, 24, 24, 64, True, 0, 24, id="all-rows-empty"),
    pytest.param(1, 2, 2, 33, 17, 80, False, 5, 9, id="offsets-ignored-noncausal-d80"),
]


def _inputs(B, H, KH, Sq, Sk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Sq, D, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, KH, Sk, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, KH, Sk, D, generator=g).to(dtype).requires_grad_()
    return q, k, v


def _close(actual, expected, tol, what):
    assert actual.shape == expected.shape, what
    assert actual.dtype == expected.dtype, what
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def _run(fn, q, k, v, dout, dlse, **kw):
    out, lse = fn(q, k, v, **kw)
    grads = torch.autograd.grad([out, lse], [q, k, v], [dout, dlse])
    return out, lse, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,H,KH,Sq,Sk,D,causal,qo,ko", CASES)
def test_matches_reference(B, H, KH, Sq, Sk, D, causal, qo, ko, dtype):
    q, k, v = _inputs(B, H, KH, Sq, Sk, D, dtype)
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(B, H, Sq, D, generator=g).to(dtype)
    dlse = torch.randn(B, H, Sq, generator=g)
    kw = dict(causal=causal, q_offset=qo, k_offset=ko)
    ref_out, ref_lse, ref_grads = _run(reference.flash_attention, q, k, v, dout, dlse, **kw)
    out, lse, grads = _run(flash_attention, q, k, v, dout, dlse, **kw)
    tol_fwd, tol_bwd = TOL[dtype]
    _close(out, ref_out, tol_fwd, "out")
    assert lse.dtype == torch.float32 and lse.shape == (B, H, Sq)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "empty rows differ"
    finite = torch.isfinite(ref_lse)
    _close(lse[finite], ref_lse[finite], tol_fwd, "lse")
    for name, a, b in zip("qkv", grads, ref_grads, strict=True):
        _close(a, b, tol_bwd, f"d{name}")


def test_empty_rows_give_zero_and_neginf():
    # queries 0..9 see no key (keys start at global position 10); the rest see some
    q, k, v = _inputs(1, 2, 2, 20, 20, 16, torch.float32)
    out, lse = flash_attention(q, k, v, causal=True, k_offset=10)
    assert torch.isneginf(lse[..., :10]).all() and torch.isfinite(lse[..., 10:]).all()
    assert torch.equal(out[..., :10, :], torch.zeros_like(out[..., :10, :]))
    dq, dk, dv = torch.autograd.grad((out.sum() + lse[..., 10:].sum()), [q, k, v])
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert torch.equal(dq[..., :10, :], torch.zeros_like(dq[..., :10, :]))


@pytest.mark.parametrize("which", ["out", "lse"])
def test_gradient_through_one_output(which):
    # ring attention sometimes differentiates only through lse; autograd passes None for the other
    q, k, v = _inputs(1, 2, 1, 21, 30, 16, torch.float32, seed=3)
    w = torch.randn(1, 2, 21, 16) if which == "out" else torch.randn(1, 2, 21)
    grads = []
    for fn in (flash_attention, reference.flash_attention):
        out, lse = fn(q, k, v, causal=False)
        y = out if which == "out" else lse
        gs = torch.autograd.grad((y * w).sum(), [q, k, v], allow_unused=True)
        grads.append([torch.zeros_like(x) if g is None else g for g, x in zip(gs, (q, k, v), strict=True)])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


def test_noncontiguous_inputs_and_custom_scale():
    # (B, S, H, D) projections viewed as (B, H, S, D) without a copy
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 23, 2, 32, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 29, 2, 32, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(2, 29, 2, 32, generator=g).transpose(1, 2).requires_grad_()
    assert not q.is_contiguous()
    res = []
    for fn in (flash_attention, reference.flash_attention):
        out, lse = fn(q, k, v, causal=True, scale=0.3)
        res.append((out, lse, *torch.autograd.grad(out.square().sum() + lse.sum(), [q, k, v])))
    for a, b in zip(*res, strict=True):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


def test_lse_merges_two_key_halves():
    # the property ring attention relies on: attention over [k1, k2] from the two halves' (out, lse)
    q, k, v = _inputs(1, 2, 2, 16, 32, 16, torch.float32, seed=7)
    q, k, v = q.detach(), k.detach(), v.detach()
    full, lse = flash_attention(q, k, v, causal=True, q_offset=16)
    o1, l1 = flash_attention(q, k[:, :, :16], v[:, :, :16], causal=True, q_offset=16, k_offset=0)
    o2, l2 = flash_attention(q, k[:, :, 16:], v[:, :, 16:], causal=True, q_offset=16, k_offset=16)
    merged_lse = torch.logaddexp(l1, l2)
    merged = o1 * (l1 - merged_lse).exp()[..., None] + o2 * (l2 - merged_lse).exp()[..., None]
    torch.testing.assert_close(merged_lse, lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, full, atol=1e-5, rtol=1e-5)


def test_default_scale_and_causal():
    q, k, v = _inputs(1, 1, 1, 20, 20, 24, torch.float32)
    out, lse = flash_attention(q, k, v)  # causal=True, scale=1/sqrt(24)
    ref, ref_lse = reference.flash_attention(q, k, v, True, 1 / math.sqrt(24))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_rejects_bad_shapes():
    q = torch.randn(1, 3, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        flash_attention(q, k, k)
    with pytest.raises(TypeError, match="float64"):
        flash_attention(q.double(), q.double(), q.double())
