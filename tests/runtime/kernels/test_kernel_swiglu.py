"""Triton swiglu vs the reference. Tolerances: float32 1e-5; float16 2e-3; bfloat16 2e-2."""

import pytest
import torch

pytest.importorskip("triton")

from runtime.kernels import reference, swiglu  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 37), (3, 4, 1030), (1,), (0, 8)])
def test_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(0)
    gate = (torch.randn(shape, generator=g) * 3).to(dtype).requires_grad_()
    up = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(shape, generator=g).to(dtype)
    y = swiglu(gate, up)
    ry = reference.swiglu(gate, up)
    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == gate.shape
    torch.testing.assert_close(y.float(), ry.float(), atol=tol, rtol=tol)
    if gate.numel():
        grads = torch.autograd.grad(y, [gate, up], dy)
        rgrads = torch.autograd.grad(ry, [gate, up], dy)
        for a, b in zip(grads, rgrads, strict=True):
            torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def test_noncontiguous_halves_of_one_projection():
    # the usual layout: gate and up are the two halves of one (tokens, 2 * ffn) projection
    h = torch.randn(7, 2 * 45, requires_grad=True)
    gate, up = h[:, :45], h[:, 45:]
    dy = torch.randn(7, 45)
    (g1,) = torch.autograd.grad(swiglu(gate, up), [h], dy)
    (g2,) = torch.autograd.grad(reference.swiglu(gate, up), [h], dy)
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="must match"):
        swiglu(torch.randn(3, 4), torch.randn(3, 5))
