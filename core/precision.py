"""Mixed precision by parameter casting: the plan's dtype names and what they mean.

The runtime keeps fp32 main weights (what the user's optimizer sees) and binds compute copies
in `param_dtype` into the graph; `passes.mixed_precision` keeps norms, softmax and the loss in
fp32. This module only names the dtypes, so the plan, the passes and the cost model agree.
"""

from __future__ import annotations

import torch

from core.plan import Plan

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""Plan dtype name -> torch dtype."""

MAIN_DTYPE = torch.float32
"""The dtype of the main weights and of gradient accumulation under mixed precision."""


def compute_dtype(plan: Plan) -> torch.dtype | None:
    """The dtype parameters are cast to for compute, or None when the plan casts nothing
    (param_dtype unset, or fp32: the model then runs as given)."""
    if plan.param_dtype in (None, "fp32"):
        return None
    return DTYPES[plan.param_dtype]


def reduce_dtype(plan: Plan) -> torch.dtype:
    return DTYPES[plan.reduce_dtype]


def bytes_of(name: str) -> int:
    """Bytes per element of a plan dtype name."""
    return DTYPES[name].itemsize
