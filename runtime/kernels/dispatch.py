"""The runtime's kernel selection: Triton on CUDA for 16/32-bit floats, plain torch otherwise.

Each function has the signature of the op of the same name in ``runtime.kernels`` and calls
``runtime.kernels.<op>`` when every floating-point tensor argument is a CUDA tensor of dtype
float16, bfloat16 or float32 (and triton imports), else ``runtime.kernels.reference.<op>``.
The choice is a plain function of the tensors (``use_triton``); there is no global switch.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

from core import ops

from . import reference

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=1)
def _triton_available() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def use_triton(*tensors) -> bool:
    """True when the Triton kernel should run for these arguments (None entries are skipped)."""
    floats = [t for t in tensors if isinstance(t, torch.Tensor) and t.dtype.is_floating_point]
    if not floats:
        return False
    return (all(t.is_cuda and t.dtype in _KERNEL_DTYPES for t in floats)
            and _triton_available())


def _kernel(name):
    return getattr(importlib.import_module("runtime.kernels"), name)


def flash_attention(q, k, v, causal=True, scale=None, *, q_offset=0, k_offset=0):
    impl = _kernel("flash_attention") if use_triton(q, k, v) else reference.flash_attention
    return impl(q, k, v, causal, scale, q_offset=q_offset, k_offset=k_offset)


def rms_norm(x, weight=None, eps=1e-6):
    impl = _kernel("rms_norm") if use_triton(x, weight) else reference.rms_norm
    return impl(x, weight, eps)


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    impl = _kernel("layer_norm") if use_triton(x, weight, bias) else reference.layer_norm
    return impl(x, weight, bias, eps)


def swiglu(gate, up):
    impl = _kernel("swiglu") if use_triton(gate, up) else reference.swiglu
    return impl(gate, up)


def grouped_gemm(x, w, group_sizes):
    impl = _kernel("grouped_gemm") if use_triton(x, w) else reference.grouped_gemm
    return impl(x, w, group_sizes)


def permute(tokens, expert_ids, num_experts):
    impl = _kernel("permute") if use_triton(tokens) else reference.permute
    return impl(tokens, expert_ids, num_experts)


def unpermute(permuted, row_id_map, probs=None):
    impl = _kernel("unpermute") if use_triton(permuted, probs) else reference.unpermute
    return impl(permuted, row_id_map, probs)


# --- graph-level replacements: the kernel ops of core.ops -----------------------------------
# passes/kernels.py points graph nodes at core.ops' kernel ops, registered here; each runs the
# Triton kernel where it applies (CUDA 16/32-bit tensors and the arguments the kernel supports)
# and the aten op otherwise, so on CPU and in float64 the numbers are exactly the captured
# graph's. They are registered as CompositeImplicitAutograd: autograd goes through what they
# run (the kernels' own autograd Functions, or aten's), as through a Python call.

def scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *,
                                 scale=None, enable_gqa=False):
    if attn_mask is None and dropout_p == 0.0 and use_triton(q, k, v) and (
            enable_gqa or k.shape[1] == q.shape[1]):
        return _kernel("flash_attention")(q, k, v, is_causal, scale)[0]
    return torch.ops.aten.scaled_dot_product_attention.default(
        q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)


def aten_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5,
                    cudnn_enable=True):
    if len(normalized_shape) == 1 and use_triton(x, weight, bias):
        return _kernel("layer_norm")(x, weight, bias, eps)
    return torch.ops.aten.layer_norm.default(x, normalized_shape, weight, bias, eps,
                                             cudnn_enable)


def silu_mul(gate, up):
    """silu(gate) * up: the SwiGLU MLP's activation."""
    if use_triton(gate, up) and gate.shape == up.shape:
        return _kernel("swiglu")(gate, up)
    return torch.nn.functional.silu(gate) * up


def decomposed_rms_norm(x, weight, eps, *, compute_dtype=None, output_dtype=None):
    """`core.ops.rms_norm`: the RMSNorm models write out by hand. The Triton kernel runs where
    it computes the same thing (a 1-D weight of the last dim or none, the result in x's dtype);
    otherwise the same aten ops as the captured graph, in its order, so the numbers match."""
    if use_triton(x, weight) and _rms_kernel_applies(x, weight, compute_dtype, output_dtype):
        return _kernel("rms_norm")(x, weight, eps)
    return ops.rms_norm_reference(x, weight, eps, compute_dtype, output_dtype)


def _rms_kernel_applies(x, weight, compute_dtype, output_dtype) -> bool:
    y_dtype = output_dtype or compute_dtype or x.dtype
    result_dtype = y_dtype if weight is None else torch.promote_types(y_dtype, weight.dtype)
    max_cols = importlib.import_module("runtime.kernels.layer_norm").MAX_COLS
    return (result_dtype == x.dtype and x.shape[-1] <= max_cols
            and (weight is None or (weight.dim() == 1 and weight.shape[0] == x.shape[-1])))


for _op, _impl in ((ops.scaled_dot_product_attention, scaled_dot_product_attention),
                   (ops.layer_norm, aten_layer_norm),
                   (ops.silu_mul, silu_mul),
                   (ops.rms_norm, decomposed_rms_norm)):
    torch.library.impl(_op._name, "CompositeImplicitAutograd")(_impl)
