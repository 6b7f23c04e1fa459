"""Triton grouped_gemm vs the reference (a per-group loop of matmuls).

Tolerances: float32 1e-4 (IEEE products, K <= 50); float16 2e-3 forward, 1e-2 gradients (d(w)
sums up to 40 rows). bfloat16 is not run: the interpreter's tl.dot is wrong on bf16 operands.
"""

import pytest
import torch

pytest.importorskip("triton")

from runtime.kernels import grouped_gemm, reference  # noqa: E402

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 1e-2)}

# (group sizes, tokens, K, N); tokens > sum(sizes) leaves padding rows
CASES = [
    pytest.param([5, 0, 17, 3], 25, 20, 33, id="ragged-with-empty"),
    pytest.param([0, 0, 0], 4, 16, 16, id="all-empty"),
    pytest.param([40], 40, 48, 24, id="one-group"),
    pytest.param([7, 9, 0], 20, 18, 40, id="padding-rows"),
    pytest.param([1, 2, 3, 4, 5, 6, 7, 8], 36, 24, 17, id="eight-experts"),
]


def _inputs(sizes, T, K, N, dtype, size_dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(len(sizes), K, N, generator=g) / K**0.5).to(dtype).requires_grad_()
    dy = torch.randn(T, N, generator=g).to(dtype)
    return x, w, torch.tensor(sizes, dtype=size_dtype), dy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sizes,T,K,N", CASES)
def test_matches_reference(sizes, T, K, N, dtype):
    x, w, gs, dy = _inputs(sizes, T, K, N, dtype)
    y = grouped_gemm(x, w, gs)
    dx, dw = torch.autograd.grad(y, [x, w], dy)
    ry = reference.grouped_gemm(x, w, gs)
    rdx, rdw = torch.autograd.grad(ry, [x, w], dy)
    tol_fwd, tol_bwd = TOL[dtype]
    assert y.shape == (T, N) and y.dtype == dtype
    torch.testing.assert_close(y.float(), ry.float(), atol=tol_fwd, rtol=tol_fwd)
    torch.testing.assert_close(dx.float(), rdx.float(), atol=tol_bwd, rtol=tol_bwd)
    torch.testing.assert_close(dw.float(), rdw.float(), atol=tol_bwd, rtol=tol_bwd)
    used = sum(sizes)
    assert torch.equal(y[used:], torch.zeros_like(y[used:]))  # padding rows
    for g, n in enumerate(sizes):
        if n == 0:
            assert torch.equal(dw[g], torch.zeros_like(dw[g]))


def test_int32_sizes_and_transposed_weight():
    # a (G, N, K) parameter used as w.transpose(1, 2), as an nn.Linear-style layout would
    x, _, gs, dy = _inputs([6, 0, 11], 17, 20, 12, torch.float32, size_dtype=torch.int32)
    wt = torch.randn(3, 12, 20, requires_grad=True)
    res = []
    for fn in (grouped_gemm, reference.grouped_gemm):
        y = fn(x, wt.transpose(1, 2), gs)
        res.append((y, *torch.autograd.grad(y, [x, wt], dy)))
    for a, b in zip(*res, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_rejects_bad_group_sizes():
    x = torch.randn(5, 16)
    w = torch.randn(2, 16, 8)
    with pytest.raises(ValueError, match="sum"):
        grouped_gemm(x, w, torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="group_sizes must be"):
        grouped_gemm(x, w, torch.tensor([5]))
    with pytest.raises(TypeError, match="integer"):
        grouped_gemm(x, w, torch.tensor([2.0, 3.0]))


@pytest.mark.parametrize("counts", [
    pytest.param(torch.tensor([5, 0, 9]), id="counts-per-expert"),
    pytest.param(torch.tensor([[2, 0, 4], [3, 0, 5]]), id="counts-per-source-rank"),  # (ep, E)
])
def test_the_expert_parallel_grouped_mm_runs_the_kernel_where_it_applies(monkeypatch, counts):
    """`core.ops.grouped_mm` (what ep's experts run) launches this kernel for the forward and
    both gradients where `use_triton` says so (CUDA; here forced, interpreted on the CPU),
    and gives the numbers of its loop of matmuls."""
    import runtime.expert_parallel as expert_parallel
    from core import ops

    rows_n = int(counts.sum())
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(rows_n, 12, generator=g).requires_grad_()
    weight = (torch.randn(3, 12, 10, generator=g) / 12**0.5).requires_grad_()
    dy = torch.randn(rows_n, 10, generator=g)
    results = {}
    for kernel in (False, True):
        launched = []
        monkeypatch.setattr(expert_parallel, "use_triton",
                            lambda *t, kernel=kernel: launched.append(1) or kernel)
        out = ops.grouped_mm(rows, weight, counts)
        results[kernel] = (out, *torch.autograd.grad(out, [rows, weight], dy))
        # asked in forward and backward (the loop's backward asks again for its dx GEMM)
        assert len(launched) == (2 if kernel else 3)
    for ours, loop in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(ours, loop, rtol=1e-4, atol=1e-4)
