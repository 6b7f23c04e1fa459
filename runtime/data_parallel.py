"""Data parallelism: gradient reduction over dp, and ZeRO-1 sharding of optimizer state.

`GradReducer` sums gradients over the dp group in buckets that are launched (asynchronously) as
soon as every gradient of the bucket is final during the last microbatch's backward, so the
reduction overlaps the rest of backward, as in PyTorch DDP and Megatron's DistributedDataParallel.

`ZeroShards` is the distributed optimizer (ZeRO-1): the model's parameters become views into one
flat buffer per group and dtype, and each rank of the group owns a 1/size slice of it as a
separate leaf tensor. The user's optimizer updates only those slices (so its state is 1/size);
gradients are reduce-scattered into the slices, and the updated slices are all-gathered back
into the flat buffer before the next forward. The groups (`ZeroGroup`) are the ranks that sum
the parameters' gradients: dp x cp for dense parameters, the expert-data-parallel ranks for
experts split over ep (Megatron's distributed optimizer keeps the same two).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from runtime.collectives import all_gather_into, reduce_scatter_into

DEFAULT_BUCKET_BYTES = 25 * 2**20


class GradReducer:
    """Sum `.grad` of `params` over `group` (None: a group of one, nothing to do)."""

    def __init__(self, params: list[nn.Parameter], group, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 reduce_dtype: torch.dtype | None = None):
        self.group = group
        self.reduce_dtype = reduce_dtype
        """The dtype the sums travel in (mixed precision's reduce_dtype); None: the grads'."""
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
        if self.reduce_dtype is not None:
            flat = flat.to(self.reduce_dtype)
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
                    p.grad = piece.to(p.dtype, copy=True)
                else:
                    p.grad.copy_(piece)
        self._pending = {}

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


@dataclass(frozen=True)
class ZeroGroup:
    """Parameters whose optimizer state is split over one process group (ZeRO-1): the dense
    parameters over dp x cp, experts split over ep over the expert-data-parallel group."""

    name: str
    params: list
    group: object
    """The process group, or None for a group of one."""
    rank: int
    size: int


class ZeroShards:
    """ZeRO-1: per (group, dtype) key a flat parameter buffer, one 1/size leaf slice per rank.

    Keys are `"dense.float32"`-like strings (`ZeroGroup.name` and the dtype)."""

    def __init__(self, groups: list[ZeroGroup]):
        self.params: dict[str, list[nn.Parameter]] = {}
        self.dtype: dict[str, torch.dtype] = {}
        self._group: dict[str, ZeroGroup] = {}
        for zero_group in groups:
            by_dtype: dict[torch.dtype, list[nn.Parameter]] = defaultdict(list)
            for p in zero_group.params:
                if p.requires_grad:
                    by_dtype[p.dtype].append(p)
            for dtype, group_params in by_dtype.items():
                key = f"{zero_group.name}.{str(dtype).removeprefix('torch.')}"
                self.params[key], self.dtype[key], self._group[key] = (group_params, dtype,
                                                                      zero_group)
        self.reduce_dtype: torch.dtype | None = None
        """The dtype gradients are reduce-scattered in (mixed precision); None: theirs."""
        self.flat: dict[str, torch.Tensor] = {}
        self.shards: dict[str, nn.Parameter] = {}
        for key, group_params in self.params.items():
            total = sum(p.numel() for p in group_params)
            padded = math.ceil(total / self.size(key)) * self.size(key)
            device = group_params[0].device
            flat = torch.zeros(padded, dtype=self.dtype[key], device=device)
            offset = 0
            with torch.no_grad():
                for p in group_params:
                    view = flat[offset: offset + p.numel()].view_as(p)
                    view.copy_(p)
                    p.data = view  # the model now reads the flat buffer
                    offset += p.numel()
            self.flat[key] = flat
            self.shards[key] = nn.Parameter(self.my_slice(key, flat).clone())

    def group(self, key: str):
        return self._group[key].group

    def size(self, key: str) -> int:
        return self._group[key].size

    def my_slice(self, key: str, flat: torch.Tensor) -> torch.Tensor:
        n = flat.numel() // self.size(key)
        rank = self._group[key].rank
        return flat[rank * n: (rank + 1) * n]

    def owned_pieces(self):
        """(model parameter, the slice of our shard's gradient that belongs to it, the size of
        the group the parameter's state is split over) for every parameter overlapping this
        rank's slice (for norms that weigh parameters differently)."""
        for key, group_params in self.params.items():
            shard = self.shards[key]
            if shard.grad is None:
                continue
            n = shard.numel()
            start, offset = self._group[key].rank * n, 0
            for p in group_params:
                lo, hi = max(offset, start), min(offset + p.numel(), start + n)
                if lo < hi:
                    yield p, shard.grad[lo - start: hi - start], self.size(key)
                offset += p.numel()

    def shard_parameters(self) -> list[nn.Parameter]:
        return list(self.shards.values())

    @torch.no_grad()
    def gather(self) -> None:
        """Every rank's updated slice -> the full flat buffer (and so the model's parameters)."""
        for key, flat in self.flat.items():
            if self.group(key) is None:
                flat.copy_(self.shards[key])
            else:
                all_gather_into(flat, self.shards[key].detach(), self.group(key))

    @torch.no_grad()
    def refresh_shards(self) -> None:
        """The flat buffer was written (a state dict was loaded): copy our slices from it."""
        for key, flat in self.flat.items():
            self.shards[key].copy_(self.my_slice(key, flat))

    @torch.no_grad()
    def reduce_grads(self) -> None:
        """Sum model gradients over each group into our slice's `.grad` (accumulating); free
        the rest."""
        for key, group_params in self.params.items():
            flat = self.flat[key]
            flat_grad = torch.zeros_like(flat)
            offset = 0
            for p in group_params:
                if p.grad is not None:
                    flat_grad[offset: offset + p.numel()].copy_(p.grad.reshape(-1))
                    p.grad = None
                offset += p.numel()
            if self.group(key) is None:
                mine = flat_grad
            else:
                wire = self.reduce_dtype or flat.dtype
                mine = torch.empty(flat.numel() // self.size(key), dtype=wire,
                                   device=flat.device)
                reduce_scatter_into(mine, flat_grad.to(wire), self.group(key))
                mine = mine.to(flat.dtype)
            shard = self.shards[key]
            if shard.grad is None:
                shard.grad = mine
            else:
                shard.grad.add_(mine)

    @torch.no_grad()
    def full_grads(self) -> dict[int, torch.Tensor]:
        """id(model parameter) -> its full reduced gradient, gathered from every rank's slice."""
        out = {}
        for key, group_params in self.params.items():
            shard = self.shards[key]
            mine = shard.grad if shard.grad is not None else torch.zeros_like(shard)
            flat = torch.empty_like(self.flat[key])
            if self.group(key) is None:
                flat.copy_(mine)
            else:
                all_gather_into(flat, mine.contiguous(), self.group(key))
            offset = 0
            for p in group_params:
                out[id(p)] = flat[offset: offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        return out
