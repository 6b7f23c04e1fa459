"""Triton kernels for the runtime's hot paths, with plain-torch twins in ``reference``.

``runtime.kernels.<op>`` always runs the Triton kernel (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``); ``runtime.kernels.dispatch.<op>`` picks the kernel for CUDA
float16/bfloat16/float32 tensors and ``runtime.kernels.reference.<op>`` otherwise.

Ops (each module's docstring holds its full contract):
    flash_attention(q, k, v, causal=True, scale=None, *, q_offset=0, k_offset=0) -> (out, lse)
    rms_norm(x, weight=None, eps=1e-6)
    layer_norm(x, weight=None, bias=None, eps=1e-5)
    swiglu(gate, up)
    grouped_gemm(x, w, group_sizes)
    permute(tokens, expert_ids, num_experts) -> (permuted, row_id_map, group_sizes)
    unpermute(permuted, row_id_map, probs=None)

Triton is imported on first use of a kernel, so ``import runtime.kernels.reference`` (and
``dispatch`` on CPU) works where triton is not installed.

The op names are also module names (``runtime/kernels/flash_attention.py``), and Python's import
system binds a loaded submodule as an attribute of its package. So that ``runtime.kernels.<op>``
is always the function, the package's attribute lookup answers op names itself. Reach a module's
other contents with ``from runtime.kernels.<module> import Name`` (``import
runtime.kernels.<op> as m`` would give the function, not the module).
"""

from __future__ import annotations

import importlib
import sys
import types

# public name -> module that defines it
_OPS = {
    "flash_attention": "flash_attention",
    "rms_norm": "rms_norm",
    "layer_norm": "layer_norm",
    "swiglu": "swiglu",
    "grouped_gemm": "grouped_gemm",
    "permute": "permute",
    "unpermute": "permute",
}

__all__ = list(_OPS)


def _load(name: str):
    return getattr(importlib.import_module(f"{__name__}.{_OPS[name]}"), name)


class _KernelsPackage(types.ModuleType):
    def __getattribute__(self, name: str):
        # checked before the module dict, where an imported submodule of the same name sits
        if name in _OPS:
            return _load(name)
        return super().__getattribute__(name)


sys.modules[__name__].__class__ = _KernelsPackage
