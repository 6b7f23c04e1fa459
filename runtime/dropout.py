"""What `core.ops.dropout_mask` does: the counter generator of core/dropout.py, drawn for this
rank's elements with the key the executor set for the call (step, microbatch's first sample,
training)."""

from __future__ import annotations

import torch

from core import ops
from core.dropout import IndexSpec, current_key, keep_mask


def dropout_mask(x: torch.Tensor, p: float, seed: int, node: int, rows_per_sample: int,
                 spec: list[int]) -> torch.Tensor:
    key = current_key()
    if not key.training:
        return torch.ones_like(x)
    index = IndexSpec.parse(list(spec))
    if index.local != tuple(x.shape):
        raise RuntimeError(f"partitioner.dropout_mask: the value is {tuple(x.shape)} here but "
                           f"its index spec {index} describes {index.local}")
    kept = keep_mask(p, seed, node, index, key, rows_per_sample, x.device)
    scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    return kept.to(x.dtype) * scale


torch.library.impl(ops.dropout_mask._name, "CompositeExplicitAutograd")(dropout_mask)
# The mask is a constant the graph multiplies by: autograd passes over it, so the product keeps
# only the mask for backward (not its input, as it would for a mask that needed a gradient).
_LIB = torch.library.Library("partitioner", "IMPL")
_LIB.impl("dropout_mask", torch.library.fallthrough_kernel, "Autograd")
