"""Process groups for the plan's mesh: `core.layout.RankLayout`'s groups made live."""

from __future__ import annotations

import torch
import torch.distributed as dist

from core.layout import RankLayout
from core.plan import Plan


GRADIENTS = "dp_cp"
"""The pseudo-dimension of the group dense gradients are summed over: dp x cp."""


class Mesh:
    """Process groups for one rank: `mesh.group("tp")`, `mesh.coord("pp")`, `mesh.size("dp")`.

    `GRADIENTS` ("dp_cp") names the dp x cp group (the dp group when cp is 1).
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
        # Gradients (and ZeRO-1 shards) of dense parameters span dp x cp: every cp rank
        # computes its tokens' share, as every dp rank its batch's (Megatron's dp-cp group).
        self._group_ranks[GRADIENTS] = self.dense.group_ranks(("cp", "dp"), self.rank)
        if plan.cp == 1:
            if "dp" in self._groups:
                self._groups[GRADIENTS] = self._groups["dp"]
        elif live:
            self._groups[GRADIENTS] = _new_groups(self.dense.partitions(("cp", "dp")),
                                                  self.rank, self.world_size)

    def coord(self, dim: str) -> int:
        return self._group_ranks[dim].index(self.rank)

    def coords(self) -> dict[str, int]:
        return {dim: self.coord(dim) for dim in self._group_ranks}

    def size(self, dim: str) -> int:
        return len(self._group_ranks[dim])

    def group(self, dim: str):
        """The process group along `dim`, or None when that dimension has size 1."""
        return self._groups.get(dim)

    def group_names(self) -> dict[str, str]:
        """Mesh dimension -> the c10d name of this rank's group along it, for every dimension of
        size > 1: what `passes.lowering.collectives` writes into a program's collectives."""
        return {dim: group.group_name for dim, group in self._groups.items()}

    def ranks(self, dim: str) -> list[int]:
        return list(self._group_ranks[dim])

    def __repr__(self) -> str:
        return f"Mesh(rank={self.rank}, coords={self.coords()})"


def _new_groups(partitions: list[list[int]], rank: int, world_size: int):
    if len(partitions) == 1 and len(partitions[0]) == world_size:
        return dist.group.WORLD
    mine = None
    for ranks in partitions:  # collective: every rank creates every group, in the same order
        group = process_group(ranks)
        if rank in ranks:
            mine = group
    return mine


_GROUPS: dict[tuple[int, ...], object] = {}
_GROUPS_WORLD: list = [None]
"""The default group `_GROUPS` was made under (a new one, after destroy_process_group and
init again, empties the cache)."""


def process_group(ranks: list[int]):
    """The process group of `ranks`, made at the first request and kept for the process.

    Collective like `torch.distributed.new_group` (every rank asks for every group, in the
    same order), and since every rank then also finds the same groups cached, a hit is a hit
    on every rank. Each model, plan and parallel_state call would otherwise add groups that
    live as long as the process: gloo keeps threads per group, and a process that
    parallelizes many models (a notebook, a plan search, the test suite's ranks) would run
    hundreds of them."""
    if _GROUPS_WORLD[0] is not dist.group.WORLD:
        _GROUPS.clear()
        _GROUPS_WORLD[0] = dist.group.WORLD
    key = tuple(ranks)
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(list(ranks))
    return _GROUPS[key]


def cached_groups() -> list:
    """The groups `process_group` keeps for the process (under the current default group)."""
    return list(_GROUPS.values()) if _GROUPS_WORLD[0] is dist.group.WORLD else []


def default_device() -> torch.device:
    """CUDA device of this local rank under NCCL, else CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
