"""What the expert-parallel pass did, as a typed record in `gm.meta[core.meta.EP_RECORD]`."""

from __future__ import annotations

from dataclasses import dataclass

from core.placement import Placements


@dataclass(frozen=True)
class MoELayer:
    """One MoE layer found in the graph and dispatched over the ep group."""

    path: str
    """The module the router's top-k came from ("blocks.1.mlp")."""
    num_experts: int
    topk: int
    local_experts: tuple[int, int]
    """[first, last) experts this rank holds."""
    weights: tuple[str, ...]
    """The stacked expert parameters, split along dim 0 (the expert dim) over ep; for experts
    held as a ModuleList, every expert's parameters (each held whole by one ep rank)."""
    expert_ops: tuple[str, ...]
    """What each expert computes on its rows, in order (grouped_mm, gelu, ...)."""
    tokens: int
    """Tokens of one microbatch on this rank (each sent to `topk` experts)."""
    placements: tuple[tuple[str, Placements], ...] = ()
    """Each expert weight's placements: dim 0 over ep; with etp > 1 also split inside; a
    ModuleList's experts `Held(rank)@ep`."""
    capacity: int | None = None
    """Pairs each expert keeps of this rank's microbatch (capacity_factor); None: dropless."""
    split_over: tuple[str, ...] = ()
    """The groups holding the same tokens that split them ("cp=2", "tp=2"): this rank
    dispatches its share, and the returned rows are gathered whole again."""

    def __str__(self) -> str:
        first, last = self.local_experts
        kept = ("dropless" if self.capacity is None else
                f"each expert keeps its first {self.capacity} pairs in token order, the rest "
                f"dropped (zero output)")
        weights = ", ".join(f"{name} {placements}" for name, placements in self.placements)
        if any(any(True for _ in p.held()) for _, p in self.placements):
            per = len(self.placements) // self.num_experts
            weights = (f"a ModuleList's, {per} per expert, each expert's held whole by one ep "
                       f"rank ({', '.join(f'{n} {p}' for n, p in self.placements[:per])}, ...)")
        share = (f" (this rank's share of them over {' x '.join(self.split_over)}, which "
                 f"hold the same tokens)" if self.split_over else "")
        return (f"{self.path}: {self.num_experts} experts top-{self.topk}, experts "
                f"{first}..{last - 1} here; {self.tokens} tokens x {self.topk}{share} "
                f"dispatched by all-to-all, {kept}; experts run "
                f"{' -> '.join(self.expert_ops)}; weights {weights}")


@dataclass(frozen=True)
class ExpertParallelRecord:
    ep: int
    rank: int
    """This rank's coordinate in the ep group."""
    layers: tuple[MoELayer, ...]

    def summary(self) -> str:
        return (f"ep={self.ep}: {len(self.layers)} MoE layers dispatched by all-to-all, "
                f"{self.layers[0].num_experts // self.ep if self.layers else 0} experts per rank")

    def __str__(self) -> str:
        return "\n".join([f"expert_parallel ({self.summary()})"]
                         + [f"  {layer}" for layer in self.layers])
