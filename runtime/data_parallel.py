"""Data parallelism: gradient reduction over dp, and ZeRO-1 sharding of optimizer state.

`GradReducer` sums gradients over the dp group in buckets that are launched (asynchronously) as
soon as every gradient of the bucket is final during the last microbatch's backward, so the
reduction overlaps the rest of backward, as in PyTorch DDP and Megatron's DistributedDataParallel.

`ZeroShards` is the distributed optimizer (ZeRO-1): the model's parameters become views into one
flat buffer per dtype, and each dp rank owns a 1/dp slice of it as a separate leaf tensor. The
user's optimizer updates only those slices (so its state is 1/dp); gradients are
reduce-scattered into the slices, and the updated slices are all-gathered back into the flat
buffer before the next forward.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn

from runtime.collectives import all_gather_into, reduce_scatter_into

DEFAULT_BUCKET_BYTES = 25 * 2**20


class GradReducer:
    """Sum `.grad` of `params` over `group` (None: a group of one, nothing to do)."""

    def __init__(self, params: list[nn.Parameter], group, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.group = group
        self.params = [p for p in params if p.requires_grad]
        # Backward produces gradients roughly in reverse order of use: fill buckets from the end.
        self.buckets: list[list[nn.Parameter]] = []
        current, size = [], 0
        for p in reversed(self.params):
            if current and (size + p.numel() * p.element_size() > bucket_bytes
                            or p.dtype != current[0].dtype):
                self.buckets.append(current)
                current, size = [], 0
            current.append(p)
            size += p.numel() * p.element_size()
        if current:
            self.buckets.append(current)
        self._bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self._armed = False
        self._ready: list[set[int]] = []
        self._pending: dict[int, tuple[object, torch.Tensor]] = {}
        self._hooks = []
        if group is not None:
            self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def arm(self) -> None:
        """The next backward is the last before reduction: launch buckets as they fill."""
        self._armed = self.group is not None
        self._ready = [set() for _ in self.buckets]
        self._pending = {}

    def _on_grad(self, param: nn.Parameter) -> None:
        if not self._armed:
            return
        index = self._bucket_of[id(param)]
        self._ready[index].add(id(param))
        if len(self._ready[index]) == len(self.buckets[index]):
            self._launch(index)

    def _launch(self, index: int) -> None:
        bucket = self.buckets[index]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in bucket])
        self._pending[index] = (dist.all_reduce(flat, group=self.group, async_op=True), flat)

    def finish(self) -> None:
        """Reduce every bucket not launched yet, wait for all, write the sums into `.grad`."""
        if self.group is None:
            return
        self._armed = False
        for index in range(len(self.buckets)):
            if index not in self._pending:
                self._launch(index)
        for index, (work, flat) in sorted(self._pending.items()):
            work.wait()
            offset = 0
            for p in self.buckets[index]:
                piece = flat[offset: offset + p.numel()].view_as(p)
                offset += p.numel()
                if p.grad is None:
                    p.grad = piece.clone()
                else:
                    p.grad.copy_(piece)
        self._pending = {}

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


class ZeroShards:
    """ZeRO-1 over `group`: flat parameter buffers per dtype, one 1/dp leaf slice per rank."""

    def __init__(self, params: list[nn.Parameter], group, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = defaultdict(list)
        for p in params:
            if p.requires_grad:
                by_dtype[p.dtype].append(p)
        self.params = by_dtype
        self.flat: dict[torch.dtype, torch.Tensor] = {}
        self.shards: dict[torch.dtype, nn.Parameter] = {}
        for dtype, group_params in by_dtype.items():
            total = sum(p.numel() for p in group_params)
            padded = math.ceil(total / size) * size
            device = group_params[0].device
            flat = torch.zeros(padded, dtype=dtype, device=device)
            offset = 0
            with torch.no_grad():
                for p in group_params:
                    view = flat[offset: offset + p.numel()].view_as(p)
                    view.copy_(p)
                    p.data = view  # the model now reads the flat buffer
                    offset += p.numel()
            self.flat[dtype] = flat
            self.shards[dtype] = nn.Parameter(self._my_slice(flat).clone())

    def _my_slice(self, flat: torch.Tensor) -> torch.Tensor:
        n = flat.numel() // self.size
        return flat[self.rank * n: (self.rank + 1) * n]

    def owned_pieces(self):
        """(model parameter, the slice of our shard's gradient that belongs to it) for every
        parameter overlapping this rank's slice (for norms that weigh parameters differently)."""
        for dtype, group_params in self.params.items():
            shard = self.shards[dtype]
            if shard.grad is None:
                continue
            n = shard.numel()
            start, offset = self.rank * n, 0
            for p in group_params:
                lo, hi = max(offset, start), min(offset + p.numel(), start + n)
                if lo < hi:
                    yield p, shard.grad[lo - start: hi - start]
                offset += p.numel()

    def shard_parameters(self) -> list[nn.Parameter]:
        return list(self.shards.values())

    @torch.no_grad()
    def gather(self) -> None:
        """Every rank's updated slice -> the full flat buffer (and so the model's parameters)."""
        for dtype, flat in self.flat.items():
            if self.group is None:
                flat.copy_(self.shards[dtype])
            else:
                all_gather_into(flat, self.shards[dtype].detach(), self.group)

    @torch.no_grad()
    def refresh_shards(self) -> None:
        """The flat buffer was written (a state dict was loaded): copy our slices from it."""
        for dtype, flat in self.flat.items():
            self.shards[dtype].copy_(self._my_slice(flat))

    @torch.no_grad()
    def reduce_grads(self) -> None:
        """Sum model gradients over dp into our slice's `.grad` (accumulating); free the rest."""
        for dtype, group_params in self.params.items():
            flat = self.flat[dtype]
            flat_grad = torch.zeros_like(flat)
            offset = 0
            for p in group_params:
                if p.grad is not None:
                    flat_grad[offset: offset + p.numel()].copy_(p.grad.reshape(-1))
                    p.grad = None
                offset += p.numel()
            if self.group is None:
                mine = flat_grad
            else:
                mine = torch.empty(flat.numel() // self.size, dtype=dtype, device=flat.device)
                reduce_scatter_into(mine, flat_grad, self.group)
            shard = self.shards[dtype]
            if shard.grad is None:
                shard.grad = mine
            else:
                shard.grad.add_(mine)

    @torch.no_grad()
    def full_grads(self) -> dict[int, torch.Tensor]:
        """id(model parameter) -> its full reduced gradient, gathered from every rank's slice."""
        out = {}
        for dtype, group_params in self.params.items():
            shard = self.shards[dtype]
            mine = shard.grad if shard.grad is not None else torch.zeros_like(shard)
            flat = torch.empty_like(self.flat[dtype])
            if self.group is None:
                flat.copy_(mine)
            else:
                all_gather_into(flat, mine.contiguous(), self.group)
            offset = 0
            for p in group_params:
                out[id(p)] = flat[offset: offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        return out
