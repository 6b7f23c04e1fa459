"""Fused LayerNorm (and the shared row-norm kernels that rms_norm.py also launches).

Contract
--------
``layer_norm(x, weight=None, bias=None, eps=1e-5) -> y``: normalizes over the last dim of ``x``
(any leading shape), biased variance as torch.nn.functional.layer_norm;
``y = (x - mean) / sqrt(var + eps) * weight + bias``. ``weight`` / ``bias`` are 1-D of the last
dim's size, or None (then 1 / 0, and no gradient for them). ``y`` has x's dtype; weight and bias
may be another kernel dtype (e.g. float32 parameters with bfloat16 activations) and their
gradients come back in their own dtype. Statistics and accumulation are float32.

One program normalizes one row (the whole row sits in registers, so the last dim is at most
65536). Backward: one pass computes dx per row and per-program float32 partial sums of
d(weight), d(bias); a torch ``sum`` over the few program partials finishes them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_tensors, next_pow2

MAX_COLS = 65536


@triton.jit
def _norm_fwd_kernel(
    # pointers
    X, W, B, Y, Mean, Rstd,
    # sizes and strides (X and Y are (ROWS, N) with row strides, unit column stride)
    ROWS, N, stride_x, stride_y, eps,
    # meta-parameters
    RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride can pass 2**31
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        xc = x
    else:
        mean = tl.sum(x, 0) / N
        xc = tl.where(mask, x - mean, 0.0)
        tl.store(Mean + row, mean)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / N + eps)
    tl.store(Rstd + row, rstd)
    y = xc * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    # pointers; DW, DB are float32 (PROGRAMS, N) partial sums
    X, W, DY, DX, Mean, Rstd, DW, DB,
    # sizes and strides
    ROWS, N, stride_x, stride_dy, stride_dx,
    # meta-parameters
    RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row32 in range(pid, ROWS, programs):
        row = tl.cast(row32, tl.int64)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        if RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - tl.load(Mean + row)) * rstd, 0.0)
        if HAS_W:
            wdy = dy * w
        else:
            wdy = dy
        c1 = tl.sum(xhat * wdy, 0) / N
        if RMS:
            dx = (wdy - xhat * c1) * rstd
        else:
            c2 = tl.sum(wdy, 0) / N
            dx = (wdy - (xhat * c1 + c2)) * rstd
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
    if HAS_W:
        tl.store(DW + pid * N + cols, dw, mask=mask)
    if HAS_B:
        tl.store(DB + pid * N + cols, db, mask=mask)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def norm_forward(op, x, weight, bias, eps, rms):
    """Launch the forward kernel; returns (y, x_rows, mean, rstd)."""
    params = [t for t in (weight, bias) if t is not None]
    check_tensors(op, x, *params)
    N = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (N,):
            raise ValueError(f"{op}: {name} must have shape ({N},), got {tuple(t.shape)}")
    if N > MAX_COLS:
        raise ValueError(f"{op}: last dim {N} > {MAX_COLS} is not supported by the kernel")
    x2 = _as_rows(x)
    rows = x2.shape[0]
    y = torch.empty((rows, N), device=x.device, dtype=x.dtype)
    mean = torch.empty((rows,), device=x.device, dtype=torch.float32)
    rstd = torch.empty((rows,), device=x.device, dtype=torch.float32)
    if rows > 0 and N > 0:
        block = next_pow2(N)
        _norm_fwd_kernel[(rows,)](
            x2, weight, bias, y, mean, rstd,
            rows, N, x2.stride(0), y.stride(0), float(eps),
            RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_N=block,
            num_warps=min(max(block // 256, 1), 16),
        )
    return y.view(x.shape), x2, mean, rstd


def norm_backward(x2, weight, has_bias, dy, mean, rstd, rms, bias_dtype=None):
    """Launch the backward kernel; returns (dx_rows, dweight or None, dbias or None)."""
    rows, N = x2.shape
    dy2 = _as_rows(dy)
    dx = torch.empty_like(x2, memory_format=torch.contiguous_format)
    if x2.device.type == "cuda":
        programs = min(rows, 4 * torch.cuda.get_device_properties(x2.device).multi_processor_count)
    else:
        programs = min(rows, 4)
    programs = max(programs, 1)
    dw = torch.zeros((programs, N), device=x2.device, dtype=torch.float32) if weight is not None else None
    db = torch.zeros((programs, N), device=x2.device, dtype=torch.float32) if has_bias else None
    if rows > 0 and N > 0:
        block = next_pow2(N)
        _norm_bwd_kernel[(programs,)](
            x2, weight, dy2, dx, mean, rstd, dw, db,
            rows, N, x2.stride(0), dy2.stride(0), dx.stride(0),
            RMS=rms, HAS_W=weight is not None, HAS_B=has_bias, BLOCK_N=block,
            num_warps=min(max(block // 256, 1), 16),
        )
    dweight = dw.sum(0).to(weight.dtype) if weight is not None else None
    dbias = db.sum(0).to(bias_dtype) if has_bias else None
    return dx, dweight, dbias


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, x2, mean, rstd = norm_forward("layer_norm", x, weight, bias, eps, rms=False)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = norm_backward(x2, weight, ctx.has_bias, dy, mean, rstd, rms=False,
                                   bias_dtype=ctx.bias_dtype)
        return dx.view(ctx.x_shape), dw, db, None


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """Fused LayerNorm over the last dim. Forward as F.layer_norm; backward gives dx, dweight, dbias."""
    return LayerNormFunction.apply(x, weight, bias, float(eps))
