"""Placements: how a value is laid over one mesh dimension, as small immutable values.

`Replicate()`, `Shard(dim)`, `StridedShard(dim, blocks)` and `Partial(op)` are DTensor's
placements (JAX's `PartitionSpec` per mesh axis) with what DTensor lacks: `Shard.padded`
(a vocabulary padded to a multiple of the group, the padding rows never leaving the rank) and
`StridedShard.blocks` (Megatron's fused q|k|v: each sub-block split over the group, not the
concatenation), and `Held(index)`: the whole value on one coordinate of the group only (an
expert of a ModuleList on the ep rank holding it, as a pipeline stage holds its layers). A
`Placements` maps mesh dimension names to placements; dimensions it does not name are
replicated. `ParamLayout` says where one parameter (or buffer) lives, and shards and
unshards full tensors accordingly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Union

import torch


@dataclass(frozen=True)
class Replicate:
    """Every rank of the group holds the whole value."""

    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Shard:
    """Split evenly along tensor dimension `dim`; rank i holds chunk i.

    `padded`: the full size after zero padding to a multiple of the group (vocabulary rows).
    """

    dim: int
    padded: int | None = None
    replicas: int = 1
    """Consecutive ranks holding the same chunk: the group's size / replicas chunks, rank i
    holding chunk i // replicas (grouped-query kv heads fewer than the group)."""

    def __str__(self) -> str:
        more = f",replicas={self.replicas}" if self.replicas > 1 else ""
        return f"S({self.dim}{more})"


@dataclass(frozen=True)
class StridedShard:
    """A fused value whose sub-blocks `blocks` (sizes along `dim`) are each split evenly:
    rank i holds chunk i of every block, concatenated (Megatron's fused qkv / gate_up)."""

    dim: int
    blocks: tuple[int, ...]

    def __str__(self) -> str:
        return f"S({self.dim},blocks={'|'.join(map(str, self.blocks))})"


@dataclass(frozen=True)
class Partial:
    """Each rank holds a partial value; the whole is their reduction by `op`."""

    op: str = "sum"

    def __str__(self) -> str:
        return f"P({self.op})"


@dataclass(frozen=True)
class Held:
    """The whole value on the ranks whose coordinate along the mesh dim is `index`, and no
    piece of it elsewhere (one expert of a ModuleList, held by one ep rank)."""

    index: int

    def __str__(self) -> str:
        return f"H({self.index})"


Placement = Union[Replicate, Shard, StridedShard, Partial, Held]
SplitPlacement = Union[Shard, StridedShard]


@dataclass(frozen=True)
class Placements:
    """Mesh dimension -> placement, for the dimensions where a value is not replicated.

    `Placements()` is replicated everywhere. Order is the order the value was split in (a
    tensor split over tp then over another dimension is unsplit in reverse).
    """

    items: tuple[tuple[str, Placement], ...] = ()

    @classmethod
    def of(cls, **by_mesh_dim: Placement) -> "Placements":
        return cls(tuple((dim, p) for dim, p in by_mesh_dim.items()
                         if not isinstance(p, Replicate)))

    def on(self, mesh_dim: str) -> Placement:
        for dim, placement in self.items:
            if dim == mesh_dim:
                return placement
        return Replicate()

    def with_(self, mesh_dim: str, placement: Placement) -> "Placements":
        kept = tuple((d, p) for d, p in self.items if d != mesh_dim)
        return Placements(kept if isinstance(placement, Replicate)
                          else kept + ((mesh_dim, placement),))

    def splits(self) -> Iterator[tuple[str, SplitPlacement]]:
        """(mesh dim, Shard/StridedShard) in split order."""
        for dim, placement in self.items:
            if isinstance(placement, (Shard, StridedShard)):
                yield dim, placement

    def held(self) -> Iterator[tuple[str, Held]]:
        """(mesh dim, Held): the dims along which one coordinate alone holds the value."""
        for dim, placement in self.items:
            if isinstance(placement, Held):
                yield dim, placement

    @property
    def replicated(self) -> bool:
        return not self.items

    def __str__(self) -> str:
        return ",".join(f"{p}@{dim}" for dim, p in self.items) or "R"


def split_placement(dim: int, blocks: tuple[int, ...] | None = None,
                    padded: int | None = None) -> SplitPlacement:
    """Shard, or StridedShard for fused blocks (a fused value is never padded)."""
    if blocks:
        if padded is not None:
            raise ValueError(f"a fused value (blocks {blocks}) cannot also be padded to {padded}")
        return StridedShard(dim, tuple(blocks))
    return Shard(dim, padded)


def local_size(placement: SplitPlacement, full: int, parts: int) -> int:
    if isinstance(placement, StridedShard):
        return full // parts
    return (placement.padded or full) // (parts // placement.replicas)


def take_shard(full: torch.Tensor, placement: SplitPlacement, index: int,
               parts: int) -> torch.Tensor:
    """Rank `index` of `parts`'s piece of `full` (a view where possible)."""
    dim = placement.dim
    if isinstance(placement, Shard):
        if placement.padded is not None and placement.padded > full.shape[dim]:
            pad = list(full.shape)
            pad[dim] = placement.padded - full.shape[dim]
            full = torch.cat([full, full.new_zeros(pad)], dim=dim)
        return full.chunk(parts // placement.replicas, dim=dim)[index // placement.replicas]
    blocks = full.split(list(placement.blocks), dim=dim)
    return torch.cat([block.chunk(parts, dim=dim)[index] for block in blocks], dim=dim)


def unshard(pieces: list[torch.Tensor], placement: SplitPlacement,
            full_size: int) -> torch.Tensor:
    """Inverse of `take_shard`: every rank's piece (in group order) -> the full tensor."""
    dim = placement.dim
    if isinstance(placement, StridedShard):
        parts = len(pieces)
        local_blocks = [b // parts for b in placement.blocks]
        split = [piece.split(local_blocks, dim=dim) for piece in pieces]
        full = torch.cat([torch.cat([split[r][b] for r in range(parts)], dim=dim)
                          for b in range(len(placement.blocks))], dim=dim)
    else:
        full = torch.cat(pieces[::placement.replicas], dim=dim)
    return full.narrow(dim, 0, full_size)


@dataclass(frozen=True)
class ParamLayout:
    """Where one parameter (or buffer) lives on this rank."""

    name: str
    full_shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool = True
    placements: Placements = Placements()
    """Replicated over every mesh dimension it does not name."""
    aliases: tuple[str, ...] = ()
    """Other state-dict names of the same (tied) tensor."""
    is_buffer: bool = False
    persistent: bool = True

    def __str__(self) -> str:
        return str(self.placements)

    def local_shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        shape = list(self.full_shape)
        for mesh_dim, placement in self.placements.splits():
            shape[placement.dim] = local_size(placement, shape[placement.dim], sizes[mesh_dim])
        return tuple(shape)

    def local_numel(self, sizes: dict[str, int]) -> int:
        return math.prod(self.local_shape(sizes))

    def replicas(self, sizes: dict[str, int], over: tuple[str, ...]) -> int:
        """How many ranks of the mesh dims `over` hold the same elements of this tensor."""
        split = {dim for dim, _ in self.placements.splits()}
        split |= {dim for dim, _ in self.placements.held()}
        return math.prod(sizes[dim] for dim in over if dim not in split)

    def held_at(self, coords: dict[str, int]) -> bool:
        """Whether a rank at `coords` holds this tensor (it does unless a `Held` says not)."""
        return all(coords[dim] == held.index for dim, held in self.placements.held())

    def shard(self, full: torch.Tensor, coords: dict[str, int],
              sizes: dict[str, int]) -> torch.Tensor:
        """This rank's piece of the full tensor (a copy)."""
        out = full
        for mesh_dim, placement in self.placements.splits():
            out = take_shard(out, placement, coords[mesh_dim], sizes[mesh_dim])
        return out.clone()
