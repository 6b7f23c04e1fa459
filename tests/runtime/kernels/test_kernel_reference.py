"""runtime/kernels/reference.py against plain torch and Python loops, in float64 (atol 1e-10).

These need no triton: the reference is the CPU / float64 path of the runtime.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from runtime.kernels import reference

TOL = dict(atol=1e-10, rtol=1e-10)


def _qkv(B, H, KH, Sq, Sk, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    return mk(B, H, Sq, D), mk(B, KH, Sk, D), mk(B, KH, Sk, D)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("H,KH", [(4, 4), (4, 2), (4, 1)])
def test_attention_matches_sdpa(causal, H, KH):
    q, k, v = _qkv(2, H, KH, 9, 9, 12)
    out, lse = reference.flash_attention(q, k, v, causal=causal)
    kr, vr = k.repeat_interleave(H // KH, 1), v.repeat_interleave(H // KH, 1)
    ref = F.scaled_dot_product_attention(q, kr, vr, is_causal=causal)
    torch.testing.assert_close(out, ref, **TOL)
    assert lse.dtype == torch.float64 and lse.shape == (2, H, 9)
    g1 = torch.autograd.grad(out.square().sum(), [q, k, v])
    g2 = torch.autograd.grad(ref.square().sum(), [q, k, v])
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_attention_offsets_and_lse_against_loops():
    q, k, v = (t.detach() for t in _qkv(1, 2, 1, 5, 7, 4))
    qo, ko, scale = 3, 1, 0.7
    out, lse = reference.flash_attention(q, k, v, causal=True, scale=scale, q_offset=qo, k_offset=ko)
    for h in range(2):
        for i in range(5):
            visible = [j for j in range(7) if ko + j <= qo + i]
            s = [scale * float(q[0, h, i] @ k[0, 0, j]) for j in visible]
            if not visible:
                assert lse[0, h, i] == -math.inf and not out[0, h, i].any()
                continue
            expected_lse = math.log(sum(math.exp(x) for x in s))
            assert abs(float(lse[0, h, i]) - expected_lse) < 1e-10
            w = torch.tensor([math.exp(x - expected_lse) for x in s], dtype=torch.float64)
            expected = (w[:, None] * v[0, 0, visible]).sum(0)
            torch.testing.assert_close(out[0, h, i], expected, **TOL)


def test_attention_float32_lse_for_low_precision():
    q, k, v = (t.detach().float() for t in _qkv(1, 1, 1, 4, 4, 8))
    assert reference.flash_attention(q, k, v)[1].dtype == torch.float32
    assert reference.flash_attention(q.half(), k.half(), v.half())[1].dtype == torch.float32


def test_attention_gradcheck_with_empty_rows():
    # rows 0..2 see no key; the gradient through out and lse must be finite and correct elsewhere
    q, k, v = _qkv(1, 2, 1, 6, 4, 3, seed=1)

    def f(q, k, v):
        out, lse = reference.flash_attention(q, k, v, causal=True, q_offset=0, k_offset=3)
        return out, torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)

    out, lse = reference.flash_attention(q, k, v, causal=True, k_offset=3)
    assert torch.isneginf(lse[..., :3]).all() and not out[..., :3, :].any()
    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("affine", [True, False])
def test_norms_match_torch(affine):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 17, generator=g, dtype=torch.float64)
    w = torch.randn(17, generator=g, dtype=torch.float64) if affine else None
    b = torch.randn(17, generator=g, dtype=torch.float64) if affine else None
    torch.testing.assert_close(reference.layer_norm(x, w, b, 1e-5), F.layer_norm(x, (17,), w, b, 1e-5), **TOL)
    torch.testing.assert_close(reference.rms_norm(x, w, 1e-6), F.rms_norm(x, (17,), w, 1e-6), **TOL)


def test_swiglu_matches_torch():
    g, u = torch.randn(2, 2, 9, dtype=torch.float64).unbind(0)
    torch.testing.assert_close(reference.swiglu(g, u), F.silu(g) * u, **TOL)


def test_grouped_gemm_matches_loop():
    x = torch.randn(10, 6, dtype=torch.float64)
    w = torch.randn(4, 6, 5, dtype=torch.float64)
    sizes = [3, 0, 5, 1]  # one padding row at the end
    out = reference.grouped_gemm(x, w, torch.tensor(sizes))
    row = 0
    for g, n in enumerate(sizes):
        for _ in range(n):
            torch.testing.assert_close(out[row], x[row] @ w[g], **TOL)
            row += 1
    assert not out[row:].any()


def test_permute_unpermute_match_loops():
    T, H, E = 6, 3, 3
    x = torch.randn(T, H, dtype=torch.float64)
    ids = torch.tensor([[1, 0], [2, 1], [1, 2], [0, 1], [2, 0], [1, 2]])
    probs = torch.rand(T, 2, dtype=torch.float64)
    p, m, gs = reference.permute(x, ids, E)
    expected = [x[t] for e in range(E) for t in range(T) for kk in range(2) if ids[t, kk] == e]
    torch.testing.assert_close(p, torch.stack(expected), **TOL)
    assert gs.tolist() == [int((ids == e).sum()) for e in range(E)]
    for t in range(T):
        for kk in range(2):
            assert torch.equal(p[m[t, kk]], x[t])
    y = reference.unpermute(p * 2, m, probs)
    for t in range(T):
        torch.testing.assert_close(y[t], 2 * x[t] * probs[t].sum(), **TOL)
