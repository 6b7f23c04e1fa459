"""Fused RMSNorm.

Contract
--------
``rms_norm(x, weight=None, eps=1e-6) -> y``: over the last dim of ``x`` (any leading shape),
``y = x / sqrt(mean(x^2) + eps) * weight``, as torch.nn.functional.rms_norm. ``weight`` is 1-D
of the last dim's size or None (then 1, and no gradient). ``y`` has x's dtype, the weight's
gradient the weight's dtype; statistics and accumulation are float32. Last dim at most 65536.

The kernels are the row-norm kernels of layer_norm.py with ``RMS=True`` (no mean, no bias):
forward one program per row saving 1/rms; backward one pass for dx plus per-program float32
partials of d(weight) that a torch ``sum`` finishes.
"""

from __future__ import annotations

import torch

from .layer_norm import norm_backward, norm_forward


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, x2, mean, rstd = norm_forward("rms_norm", x, weight, None, eps, rms=True)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw, _ = norm_backward(x2, weight, False, dy, rstd, rstd, rms=True)
        return dx.view(ctx.x_shape), dw, None


def rms_norm(x, weight=None, eps=1e-6):
    """Fused RMSNorm over the last dim. Forward as F.rms_norm; backward gives dx and dweight."""
    return RMSNormFunction.apply(x, weight, float(eps))
