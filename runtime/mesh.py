"""Rank layout and process groups for the plan's mesh.

The layout follows Megatron-Core's two rank generators: dense layers over tp-cp-dp-pp and expert
layers over etp-ep-edp-pp (edp = tp*cp*dp / (etp*ep)), both read from the plan's `order`, the
first dimension varying fastest. `RankLayout` is pure arithmetic (the CLI's `dump` uses it for
every rank in one process); `Mesh` adds the live torch.distributed groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist

from partitioner.plan import Plan


@dataclass(frozen=True)
class RankLayout:
    """Ranks on a grid of named dimensions; `order[0]` varies fastest."""

    sizes: tuple[tuple[str, int], ...]
    """(dimension, size) pairs in layout order, fastest first."""

    @classmethod
    def dense(cls, plan: Plan) -> "RankLayout":
        order = [d for d in plan.order.split("-") if d != "ep"]
        return cls(tuple((d, plan.degree(d)) for d in order))

    @classmethod
    def expert(cls, plan: Plan) -> "RankLayout":
        edp = plan.tp * plan.cp * plan.degree("dp") // (plan.etp * plan.ep)
        rename = {"tp": ("etp", plan.etp), "ep": ("ep", plan.ep), "dp": ("edp", edp),
                  "pp": ("pp", plan.pp)}
        return cls(tuple(rename[d] for d in plan.order.split("-") if d != "cp"))

    @property
    def world_size(self) -> int:
        return math.prod(size for _, size in self.sizes)

    @cached_property
    def _strides(self) -> dict[str, int]:
        strides, stride = {}, 1
        for dim, size in self.sizes:
            strides[dim] = stride
            stride *= size
        return strides

    def size(self, dim: str) -> int:
        return dict(self.sizes)[dim]

    def coords(self, rank: int) -> dict[str, int]:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a world of {self.world_size}")
        return {dim: rank // self._strides[dim] % size for dim, size in self.sizes}

    def rank_of(self, coords: dict[str, int]) -> int:
        return sum(coords[dim] * self._strides[dim] for dim, _ in self.sizes)

    def group_ranks(self, dim: str, rank: int) -> list[int]:
        """The ranks that share every coordinate of `rank` except `dim`, ordered along `dim`."""
        base = self.coords(rank)
        return [self.rank_of({**base, dim: i}) for i in range(self.size(dim))]

    def partitions(self, dim: str) -> list[list[int]]:
        """Every group along `dim` (each rank in exactly one), in a fixed order."""
        seen, groups = set(), []
        for rank in range(self.world_size):
            if rank not in seen:
                group = self.group_ranks(dim, rank)
                seen.update(group)
                groups.append(group)
        return groups


class Mesh:
    """Process groups for one rank: `mesh.group("tp")`, `mesh.coord("pp")`, `mesh.size("dp")`.

    Every rank must build its Mesh with the same plan (torch.distributed.new_group is
    collective). Dimensions of size 1 have no group: collectives on them are bypassed.
    """

    def __init__(self, plan: Plan, rank: int | None = None, *, live: bool = True) -> None:
        self.plan = plan
        self.dense = RankLayout.dense(plan)
        self.expert = RankLayout.expert(plan)
        self.rank = dist.get_rank() if rank is None else rank
        self.world_size = self.dense.world_size
        self._groups: dict[str, object] = {}
        self._group_ranks: dict[str, list[int]] = {}
        for layout in (self.dense, self.expert):
            for dim, size in layout.sizes:
                if dim in self._group_ranks:
                    continue  # pp appears in both layouts with identical groups
                self._group_ranks[dim] = layout.group_ranks(dim, self.rank)
                if live and size > 1:
                    self._groups[dim] = _new_groups(layout.partitions(dim), self.rank,
                                                    self.world_size)

    def coord(self, dim: str) -> int:
        return self._group_ranks[dim].index(self.rank)

    def coords(self) -> dict[str, int]:
        return {dim: self.coord(dim) for dim in self._group_ranks}

    def size(self, dim: str) -> int:
        return len(self._group_ranks[dim])

    def group(self, dim: str):
        """The process group along `dim`, or None when that dimension has size 1."""
        return self._groups.get(dim)

    def ranks(self, dim: str) -> list[int]:
        return list(self._group_ranks[dim])

    def __repr__(self) -> str:
        return f"Mesh(rank={self.rank}, coords={self.coords()})"


def _new_groups(partitions: list[list[int]], rank: int, world_size: int):
    if len(partitions) == 1 and len(partitions[0]) == world_size:
        return dist.group.WORLD
    mine = None
    for ranks in partitions:  # collective: every rank creates every group, in the same order
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


def default_device() -> torch.device:
    """CUDA device of this local rank under NCCL, else CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
