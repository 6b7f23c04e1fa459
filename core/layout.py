"""Rank layout: which rank sits where on the plan's mesh (pure arithmetic, no process group).

The layout follows Megatron-Core's two rank generators: dense layers over tp-cp-dp-pp and expert
layers over etp-ep-edp-pp (edp = tp*cp*dp / (etp*ep)), both read from the plan's `order`, the
first dimension varying fastest. The passes (a rank's coordinates), the runtime (its process
groups), the cost model (which groups share a node), `dump` (every rank in one process) and
`partitioner.parallel_state` all read this one layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from core.plan import Plan


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
        edp = plan.tp * plan.cp * plan.degree("dp") // (plan.expert_tp * plan.ep)
        rename = {"tp": ("etp", plan.expert_tp), "ep": ("ep", plan.ep), "dp": ("edp", edp),
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

    def stride(self, dim: str) -> int:
        """Rank distance between neighbours along `dim` (how far apart its group is laid)."""
        return self._strides[dim]

    def coords(self, rank: int) -> dict[str, int]:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a world of {self.world_size}")
        return {dim: rank // self._strides[dim] % size for dim, size in self.sizes}

    def rank_of(self, coords: dict[str, int]) -> int:
        return sum(coords[dim] * self._strides[dim] for dim, _ in self.sizes)

    def group_ranks(self, dim: str | tuple[str, ...], rank: int) -> list[int]:
        """The ranks that share every coordinate of `rank` except `dim` (or each of several
        dims, e.g. ("dp", "cp")), ordered with the first dim varying fastest."""
        dims = (dim,) if isinstance(dim, str) else tuple(dim)
        base = self.coords(rank)
        ranks = [base]
        for d in dims:
            ranks = [{**c, d: i} for i in range(self.size(d)) for c in ranks]
        return [self.rank_of(c) for c in ranks]

    def partitions(self, dim: str | tuple[str, ...]) -> list[list[int]]:
        """Every group along `dim` (each rank in exactly one), in a fixed order."""
        seen, groups = set(), []
        for rank in range(self.world_size):
            if rank not in seen:
                group = self.group_ranks(dim, rank)
                seen.update(group)
                groups.append(group)
        return groups


def rank_coords(plan: Plan, rank: int) -> dict[str, int]:
    """Every coordinate of `rank`: the dense dims and the expert ones (etp, ep, edp)."""
    coords = RankLayout.dense(plan).coords(rank)
    coords.update({k: v for k, v in RankLayout.expert(plan).coords(rank).items()
                   if k not in coords})
    return coords


def mesh_sizes(plan: Plan) -> dict[str, int]:
    """Size of every mesh dimension, dense and expert."""
    sizes = dict(RankLayout.dense(plan).sizes)
    sizes.update(dict(RankLayout.expert(plan).sizes))
    return sizes
