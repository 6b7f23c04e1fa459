"""Triton rms_norm / layer_norm vs the reference under the interpreter.

Tolerances (abs and rel): float32 1e-5 forward, 1e-4 gradients (d(weight) sums over rows);
float16 2e-3 / 5e-3; bfloat16 2e-2 / 5e-2 (the interpreter's bf16 rounding can differ from
torch's by one ulp).
"""

import pytest
import torch

pytest.importorskip("triton")

from runtime.kernels import layer_norm, reference, rms_norm  # noqa: E402

TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 5e-3), torch.bfloat16: (2e-2, 5e-2)}
SHAPES = [(3, 5, 37), (7, 64), (2, 300)]  # ragged last dims exercise the column mask


def _check(fn, ref_fn, x, params, dy, dtype):
    inputs = [x] + [p for p in params if p is not None]
    y = fn(x, *params)
    grads = torch.autograd.grad(y, inputs, dy)
    ry = ref_fn(x, *params)
    rgrads = torch.autograd.grad(ry, inputs, dy)
    tol_fwd, tol_bwd = TOL[dtype]
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.float(), ry.float(), atol=tol_fwd, rtol=tol_fwd)
    for a, b in zip(grads, rgrads, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), atol=tol_bwd, rtol=tol_bwd)


def _make(shape, dtype, param_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype).requires_grad_()
    pd = param_dtype or dtype
    w = (torch.randn(n, generator=g) + 1).to(pd).requires_grad_()
    b = torch.randn(n, generator=g).to(pd).requires_grad_()
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, w, b, dy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "none"])
def test_layer_norm(shape, dtype, affine):
    x, w, b, dy = _make(shape, dtype)
    params = {"weight+bias": (w, b), "weight": (w, None), "none": (None, None)}[affine]
    _check(lambda x, *p: layer_norm(x, *p, eps=1e-5), lambda x, *p: reference.layer_norm(x, *p, eps=1e-5),
           x, params, dy, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm(shape, dtype, with_weight):
    x, w, _, dy = _make(shape, dtype)
    params = (w if with_weight else None,)
    _check(lambda x, *p: rms_norm(x, *p, eps=1e-6), lambda x, *p: reference.rms_norm(x, *p, eps=1e-6),
           x, params, dy, dtype)


def test_float32_params_with_bfloat16_activations():
    x, w, b, dy = _make((4, 48), torch.bfloat16, param_dtype=torch.float32)
    _check(layer_norm, reference.layer_norm, x, (w, b), dy, torch.bfloat16)
    _check(rms_norm, reference.rms_norm, x, (w,), dy, torch.bfloat16)


@pytest.mark.parametrize("layout", ["row-strided", "column-major"])
def test_noncontiguous_input_and_large_eps(layout):
    base = torch.randn(6, 40) if layout == "row-strided" else torch.randn(40, 6).t()
    x = base[:, :33].requires_grad_()  # row-strided: strides (40, 1); column-major: (1, 6)
    assert not x.is_contiguous()
    w = torch.randn(33, requires_grad=True)
    dy = torch.randn(6, 33)
    _check(lambda x, w: rms_norm(x, w, eps=0.5), lambda x, w: reference.rms_norm(x, w, eps=0.5),
           x, (w,), dy, torch.float32)
    _check(lambda x, w: layer_norm(x, w, None, eps=0.5), lambda x, w: reference.layer_norm(x, w, None, eps=0.5),
           x, (w,), dy, torch.float32)


def test_rejects_wrong_weight_shape():
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(torch.randn(2, 8), torch.randn(7))
