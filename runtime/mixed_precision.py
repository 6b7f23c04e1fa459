"""Mixed precision by parameter casting: compute copies of the fp32 main weights, and dynamic
loss scaling for fp16.

`ComputeCopies` holds one `param_dtype` copy of each floating main weight; the graphs read the
copies. Each copy is made once as `main.to(dtype)` with autograd on, so its gradient (computed
in `param_dtype`) flows back through the cast into the main weight's `.grad` in fp32: the
accumulation across microbatches is fp32 (Megatron's main_grad), and the hooks of gradient
reduction (runtime.data_parallel) fire on the main weights as they would without casting. The
runtime never sees the user's `opt.step()`: `refresh` copies the main weights into the copies
(in place, so the graphs keep them bound) when a tensor the optimizer updates changed its
`_version`.

`DynamicLossScale` is torch.amp.GradScaler's rule over the step's reduced gradients: an
overflow anywhere in the world skips the step (the gradients left None, the scale halved),
`growth_interval` good steps in a row double the scale.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class ComputeCopies:
    """`dtype` copies of `mains` (name -> main weight), refreshed when the watched tensors
    change."""

    def __init__(self, mains: dict[str, nn.Parameter], dtype: torch.dtype) -> None:
        self.mains = mains
        self.dtype = dtype
        with torch.enable_grad():  # the cast's backward carries gradients to the main weights
            self.copies = {name: main.to(dtype) for name, main in mains.items()}
        self._seen: list[int] | None = None
        self.refreshes = 0
        """How many times the copies were refreshed (tests read it)."""

    @torch.no_grad()
    def refresh(self, watched: list[torch.Tensor]) -> bool:
        """Copy the main weights into the compute copies if any of `watched` (the tensors the
        user's optimizer updates) changed since the last refresh; True if it did."""
        versions = [tensor._version for tensor in watched]
        if versions == self._seen:
            return False
        for name, copy in self.copies.items():
            copy.copy_(self.mains[name])
        self._seen = versions
        self.refreshes += 1
        return True

    def nbytes(self) -> int:
        return sum(copy.numel() * copy.element_size() for copy in self.copies.values())


class DynamicLossScale:
    """The loss scale of fp16 training (torch.amp.GradScaler's defaults)."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000) -> None:
        self.scale = init_scale
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self._good_steps = 0
        self.skipped = 0
        """Steps skipped for an overflow so far."""

    def overflowed(self, grads: list[torch.Tensor], device: torch.device) -> bool:
        """Collective over the whole world: does any rank's gradient hold an inf or a NaN?"""
        found = torch.zeros((), dtype=torch.float32, device=device)
        for grad in grads:
            if not torch.isfinite(grad).all():
                found.fill_(1.0)
                break
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return bool(found.item())

    def update(self, overflow: bool) -> None:
        """Halve the scale after an overflow; double it after growth_interval good steps."""
        if overflow:
            self.scale *= self.backoff_factor
            self._good_steps = 0
            self.skipped += 1
            return
        self._good_steps += 1
        if self._good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self._good_steps = 0
