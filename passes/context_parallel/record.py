"""What the context-parallel pass did, as a typed record in `gm.meta[core.meta.CP_RECORD]`."""

from __future__ import annotations

from dataclasses import dataclass

from core.sequence_layout import SequenceLayout


@dataclass(frozen=True)
class Gathered:
    """A sequence-sharded value gathered whole before an op that cannot run on shards."""

    node: str
    """The op that reads the whole sequence."""
    reason: str

    def __str__(self) -> str:
        return f"{self.node}: gathered the sequence ({self.reason})"


@dataclass(frozen=True)
class ContextParallelRecord:
    """Which values run on this cp rank's tokens, how attention sees the rest, and what the
    executor needs: the layout (to shard targets, unshard outputs) and the sharded outputs."""

    cp: int
    rank: int
    algo: str
    """"ring" or "a2a"."""
    layout: SequenceLayout | None
    """The sequence over the cp ranks; None when the pass stepped aside."""
    padding: int = 0
    """Tokens added at the end of the sequence so that it splits (the layout's length less
    the model's); their outputs are dropped and their targets ignored."""
    entered: tuple[str, ...] = ()
    """Values taken from the whole sequence to this rank's tokens (a local slice: inputs,
    positions, tables the sequence reads)."""
    attention: tuple[str, ...] = ()
    """Attention calls replaced by ring or all-to-all attention."""
    gathered: tuple[Gathered, ...] = ()
    """Where the sequence had to be gathered whole (exact, but no memory saved after it)."""
    outputs: tuple[int | None, ...] = ()
    """Per flat graph output: its sequence dim when it holds this rank's tokens, else None."""
    sharded_nodes: int = 0
    blocks: str = ""
    """How ring attention computes its blocks on this rank's device."""
    stepped_aside: str | None = None
    """Why the pass left the graph alone (a forward-only call whose length cp does not
    divide), or None."""

    @property
    def length(self) -> int:
        """The model's sequence length (without the padding)."""
        return self.layout.length - self.padding

    @property
    def sharded_outputs(self) -> bool:
        return any(dim is not None for dim in self.outputs)

    def summary(self) -> str:
        if self.stepped_aside:
            return f"cp={self.cp}: stepped aside: {self.stepped_aside}"
        layout = self.layout
        kind = ("load-balanced, 2*cp chunks" if layout.balanced else "contiguous chunks")
        padded = (f" (padded from {layout.length - self.padding} by {self.padding})"
                  if self.padding else "")
        return (f"cp={self.cp} {self.algo}, sequence {layout.length}{padded} -> "
                f"{layout.local} tokens "
                f"per rank ({kind}): {self.sharded_nodes} nodes on sequence shards, "
                f"{len(self.attention)} attention calls, {len(self.entered)} values entered, "
                f"{len(self.gathered)} gathered")

    def __str__(self) -> str:
        lines = [f"context_parallel ({self.summary()})"]
        if self.blocks:
            lines.append(f"  ring blocks: {self.blocks}")
        lines += [f"  {g}" for g in self.gathered]
        return "\n".join(lines)
