"""What the sequence-parallel pass did, as a typed record in `gm.meta[core.meta.SP_RECORD]`."""

from __future__ import annotations

from dataclasses import dataclass

from passes.tensor_parallel.record import InsertedCollective


# Roles of the collectives the sequence-parallel pass inserts.
SEQUENCE_EXIT = "region exit, reduce-scattered along the sequence"  # was TP's all_reduce
SEQUENCE_ENTRY = "region entry, gathered from sequence shards"  # was TP's copy_to_region
ZONE_EXIT = "a zone value read whole outside the zone"  # all_gather
ZONE_ENTRY = "a whole value read by the zone"  # scatter (this rank's slice)
GRADIENT_SUM = "a tensor broadcast over the tokens (gradient summed over tp)"  # copy_to_region


@dataclass(frozen=True)
class SequenceParallelRecord:
    """What the sequence-parallel pass split and inserted, in `gm.meta[core.meta.SP_RECORD]`."""

    tp: int
    batch: int
    seq: int
    zone: tuple[str, ...]
    """The nodes that run on sequence shards."""
    collectives: tuple[InsertedCollective, ...]
    replaced: tuple[str, ...]
    """The tensor-parallel pass's collectives it replaced (all_reduce, copy_to_region)."""
    stepped_aside: str | None = None
    """Why the pass left the graph alone (a forward-only program whose sequence tp does not
    divide), or None."""

    def summary(self) -> str:
        """One line, for `dump --passes`."""
        if self.stepped_aside:
            return f"tp={self.tp}: stepped aside: {self.stepped_aside}"
        return (f"tp={self.tp}, tokens {self.batch}x{self.seq}: {len(self.zone)} nodes on "
                f"sequence shards, {len(self.collectives)} collectives in place of "
                f"{len(self.replaced)} of tensor parallel's")

    def __str__(self) -> str:
        lines = [f"sequence_parallel ({self.summary()})"]
        if not self.stepped_aside:
            lines += [f"  {c}" for c in self.collectives]
        return "\n".join(lines)
