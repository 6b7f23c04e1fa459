"""Helpers shared by the Triton launchers (not part of the public contract)."""

from __future__ import annotations

import os

import torch

# dtypes every Triton kernel here accepts; float64 goes to the reference path (dispatch.py)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1 set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_tensors(op: str, *tensors: torch.Tensor, dtypes=KERNEL_DTYPES) -> None:
    """Same device for all, a dtype the kernel supports, and a device Triton can run on."""
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"{op}: tensors on different devices ({device} and {t.device})")
    for t in tensors:
        if dtypes is not None and t.dtype not in dtypes:
            raise TypeError(
                f"{op}: the Triton kernel takes {', '.join(str(d) for d in dtypes)}, got {t.dtype}; "
                "use runtime.kernels.reference (or runtime.kernels.dispatch) for other dtypes"
            )
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            f"{op}: the Triton kernel got CPU tensors; set TRITON_INTERPRET=1 before triton is "
            "imported to run it under the interpreter, or call runtime.kernels.reference / "
            "runtime.kernels.dispatch, which pick the plain-torch path on CPU"
        )


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use IEEE products so they match torch's default (tf32 off) matmul."""
    return "ieee" if dtype == torch.float32 else "tf32"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
