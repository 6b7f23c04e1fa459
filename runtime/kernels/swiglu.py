"""Fused SwiGLU: ``swiglu(gate, up) = silu(gate) * up``.

Contract
--------
``gate`` and ``up``: same shape and dtype (float16 / bfloat16 / float32, any shape); the result
has that shape and dtype. Computed in float32 per element. Backward, with ``s = sigmoid(gate)``:
``d(gate) = dy * up * s * (1 + gate * (1 - s))`` and ``d(up) = dy * gate * s``, both from one
kernel that reads gate, up, dy once (nothing but the inputs is saved for backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_tensors

BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(
    # pointers (flat, contiguous)
    Gate, Up, Out,
    # sizes
    NUMEL,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    g = tl.load(Gate + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(Up + offs, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(Out + offs, out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    # pointers (flat, contiguous)
    Gate, Up, DOut, DGate, DUp,
    # sizes
    NUMEL,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    g = tl.load(Gate + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(Up + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DOut + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    dgate = dy * u * s * (1.0 + g * (1.0 - s))
    dup = dy * g * s
    tl.store(DGate + offs, dgate.to(DGate.dtype.element_ty), mask=mask)
    tl.store(DUp + offs, dup.to(DUp.dtype.element_ty), mask=mask)


def _launch_fwd(gate, up):
    check_tensors("swiglu", gate, up)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} "
                         f"{up.dtype} must match")
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK, num_warps=4)
    return out, gate, up


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        out, gate_c, up_c = _launch_fwd(gate, up)
        ctx.save_for_backward(gate_c, up_c)
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n:
            _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, dout, dgate, dup, n,
                                                         BLOCK=BLOCK, num_warps=4)
        return dgate, dup


def swiglu(gate, up):
    """silu(gate) * up in one kernel; backward gives d(gate) and d(up) in one kernel."""
    return SwiGLUFunction.apply(gate, up)
