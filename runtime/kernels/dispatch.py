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
