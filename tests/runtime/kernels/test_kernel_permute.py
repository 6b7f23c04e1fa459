"""Triton permute / unpermute vs the reference.

row_id_map, group_sizes and permuted rows must be exactly equal (it is a copy); unpermute and the
gradients use float32 1e-5, bfloat16 2e-2 (sums of topk weighted rows).
"""

import pytest
import torch

pytest.importorskip("triton")

from runtime.kernels import grouped_gemm, permute, reference, unpermute  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}

# (tokens, hidden, experts, topk)
CASES = [
    pytest.param(13, 37, 4, 2, id="ragged-hidden"),
    pytest.param(40, 16, 8, 1, id="top1-some-experts-empty"),
    pytest.param(5, 8, 6, 3, id="top3"),
    pytest.param(9, 24, 16, 2, id="more-experts-than-tokens"),
]


def _routing(T, E, topk, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:topk] for _ in range(T)])
    if topk == 1:
        ids = ids % max(E // 2, 1)  # leave half of the experts without tokens
    probs = torch.rand(T, topk, generator=g).softmax(-1)
    return ids, probs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,H,E,topk", CASES)
def test_matches_reference(T, H, E, topk, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    ids, probs = _routing(T, E, topk)
    probs.requires_grad_()

    p, m, gs = permute(x, ids, E)
    rp, rm, rgs = reference.permute(x, ids, E)
    assert torch.equal(m, rm) and m.dtype == torch.int64
    assert torch.equal(gs, rgs) and gs.dtype == torch.int64 and int(gs.sum()) == T * topk
    assert torch.equal(p, rp)

    # a per-row transform between the two, so unpermute's inputs are not just copies
    scale = torch.linspace(0.5, 2.0, T * topk).to(dtype)[:, None]
    y = unpermute(p * scale, m, probs)
    ry = reference.unpermute(rp * scale, rm, probs)
    dy = torch.randn(T, H, generator=g).to(dtype)
    grads = torch.autograd.grad(y, [x, probs], dy)
    rgrads = torch.autograd.grad(ry, [x, probs], dy)
    tol = TOL[dtype]
    torch.testing.assert_close(y.float(), ry.float(), atol=tol, rtol=tol)
    for a, b in zip(grads, rgrads, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def test_rows_are_grouped_by_expert_in_token_order():
    ids = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2]])
    x = torch.arange(4.0)[:, None].expand(4, 3).contiguous()
    p, m, gs = permute(x, ids, 4)
    assert gs.tolist() == [3, 2, 3, 0]
    # expert 0: tokens 0, 1, 3; expert 1: tokens 1, 2; expert 2: tokens 0, 2, 3
    assert p[:, 0].tolist() == [0, 1, 3, 1, 2, 0, 2, 3]
    assert m.tolist() == [[5, 0], [1, 3], [6, 4], [2, 7]]


def test_unpermute_without_probs_inverts_top1():
    x = torch.randn(11, 20)
    ids = torch.randint(0, 3, (11,))
    p, m, _ = permute(x, ids, 3)
    assert torch.equal(unpermute(p, m), x)


def test_moe_layer_end_to_end():
    # permute -> grouped_gemm -> unpermute with router weights, vs the reference chain
    g = torch.Generator().manual_seed(2)
    T, H, F, E, topk = 12, 16, 24, 4, 2
    x = torch.randn(T, H, generator=g, requires_grad=True)
    w = torch.randn(E, H, F, generator=g, requires_grad=True)
    ids, probs = _routing(T, E, topk, seed=3)
    probs.requires_grad_()
    res = []
    for perm, gemm, unperm in ((permute, grouped_gemm, unpermute),
                               (reference.permute, reference.grouped_gemm, reference.unpermute)):
        p, m, gs = perm(x, ids, E)
        y = unperm(gemm(p, w, gs), m, probs)
        res.append((y, *torch.autograd.grad(y.square().sum(), [x, w, probs])))
    for a, b in zip(*res, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="expert ids"):
        permute(torch.randn(3, 4), torch.tensor([0, 1, 4]), 4)
