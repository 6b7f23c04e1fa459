"""What the tensor-parallel pass did, as a typed record in `gm.meta[core.meta.TP_RECORD]`.

The passes after it read this record instead of re-finding the pass's work in the graph:
sequence parallelism takes the region entries and exits it turns into sequence collectives,
the loss path takes the vocab-parallel logits it computes from their shards, reports print it.
Nodes are named (`node.name`), so a record stays true across graph copies and the pipeline
split, which keep node names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.placement import SplitPlacement

CollectiveKind = Literal["copy_to_region", "all_reduce", "all_gather", "reduce_scatter",
                         "gather_for_region", "scatter"]


@dataclass(frozen=True)
class InsertedCollective:
    """A collective a pass put into the graph."""

    node: str
    """The inserted node."""
    kind: CollectiveKind
    value: str
    """The node whose value it carries."""
    mesh_dim: str
    role: str
    """Why it is there (a region's entry or exit, a vocab-parallel lookup's sum, ...)."""

    def __str__(self) -> str:
        return f"{self.node} = {self.kind}({self.value}, {self.mesh_dim!r})  # {self.role}"


# Roles of the collectives the tensor-parallel pass inserts.
REGION_ENTRY = "region entry"  # copy_to_region before the column projections
REGION_EXIT = "region exit"  # all_reduce after a row projection
KV_WEIGHT = "replicated kv weight"  # copy_to_region of a k/v weight narrowed per rank
LOOKUP_SUM = "vocab-parallel lookup sum"  # all_reduce of the masked lookups
LOGITS_GATHER = "vocab-parallel logits gather"  # all_gather of the LM head's columns


@dataclass(frozen=True)
class ShardedParam:
    """A parameter (canonical name) split over the tensor-parallel group."""

    name: str
    placement: SplitPlacement

    def __str__(self) -> str:
        return f"{self.name}: {self.placement}"


@dataclass(frozen=True)
class RegionRecord:
    """One column/row region: the projections that open and close it, and its collectives."""

    columns: tuple[str, ...]
    rows: tuple[str, ...]
    entries: tuple[str, ...]
    """copy_to_region nodes before the columns (one per distinct input)."""
    exits: tuple[str, ...]
    """all_reduce nodes after the rows."""

    def __str__(self) -> str:
        return (f"region {', '.join(self.columns)} -> {', '.join(self.rows)} "
                f"(entries {', '.join(self.entries)}; exits {', '.join(self.exits)})")


@dataclass(frozen=True)
class ShardedLogits:
    """An output leaf that is vocab-parallel logits, gathered only to be returned, and the
    shard behind it: `step` can run the loss on the shard and never gather."""

    leaf: int
    """Position among the graph output's flat leaves."""
    shard: str
    """Node holding this rank's columns (the LM head's local output)."""
    gathered: tuple[str, ...]
    """The nodes that rebuild the full logits from the shard (all_gather, then slice)."""
    mesh_dim: str
    dim: int
    """The vocabulary dim (non-negative)."""
    vocab_size: int
    padded_vocab: int
    local_vocab: int
    """Columns per rank: padded_vocab / group size."""

    def __str__(self) -> str:
        padding = (f", vocabulary {self.vocab_size} padded to {self.padded_vocab}"
                   if self.padded_vocab != self.vocab_size else "")
        return (f"output leaf {self.leaf} stays sharded over {self.mesh_dim} "
                f"({self.local_vocab} of {self.padded_vocab} columns a rank{padding})")


@dataclass(frozen=True)
class TensorParallelRecord:
    """Everything the tensor-parallel pass split and inserted on this rank."""

    tp: int
    params: tuple[ShardedParam, ...]
    regions: tuple[RegionRecord, ...]
    collectives: tuple[InsertedCollective, ...]
    logits: tuple[ShardedLogits, ...]
    """Vocab-parallel logits among the graph's outputs."""

    def inserted(self, *roles: str) -> tuple[InsertedCollective, ...]:
        return tuple(c for c in self.collectives if c.role in roles)

    def summary(self) -> str:
        """One line, for `dump --passes`."""
        logits = f", vocab-parallel logits x{len(self.logits)}" if self.logits else ""
        return (f"tp={self.tp}: {len(self.params)} sharded parameters, {len(self.regions)} "
                f"regions, {len(self.collectives)} collectives{logits}")

    def __str__(self) -> str:
        lines = [f"tensor_parallel ({self.summary()})"]
        lines += [f"  {item}" for item in self.regions + self.params + self.collectives
                  + self.logits]
        return "\n".join(lines)
