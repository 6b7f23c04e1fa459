"""What the time terms read, as typed values: the plan on its cluster (`Traits`), where its
process groups lie (`Groups`), and what a strategy's collectives add to a block (`CommTerm`).

Every term of terms/ is a function of a `Traits` (and, per block, of the block's lambdified
costs); step_time.py adds the terms up. Nothing here costs anything itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from core.layout import RankLayout
from core.plan import Plan
from core.schedules import placement
from cost_model.comm import GroupPlacement, group_placement
from cost_model.hardware import Cluster, Hardware
from cost_model.shapes import TransformerShape

Runtime = Literal["megatron", "partitioner"]


@dataclass(frozen=True)
class Groups:
    """Where each process group of a plan lies on the cluster's nodes."""

    tp: GroupPlacement
    cp: GroupPlacement
    dp: GroupPlacement
    pp: GroupPlacement
    ep: GroupPlacement
    """The expert-parallel group, on the expert layout (etp-ep-edp-pp)."""
    edp: GroupPlacement
    """The expert data-parallel group: what expert weight gradients are reduced over."""
    dpcp: GroupPlacement
    """dp x cp: what dense weight gradients are reduced over."""

    @classmethod
    def of(cls, plan: Plan, cluster: Cluster) -> "Groups":
        g = cluster.gpus_per_node
        dense, expert = RankLayout.dense(plan), RankLayout.expert(plan)
        tp, cp, dp, pp = (group_placement(dense, d, g) for d in ("tp", "cp", "dp", "pp"))
        # the cp ranks sit between tp and dp in the layout, so dp x cp shares nodes as both do
        dpcp = GroupPlacement(plan.dp * plan.cp,
                              max(1, min(dp.per_node * cp.per_node, plan.dp * plan.cp)))
        return cls(tp=tp, cp=cp, dp=dp, pp=pp, ep=group_placement(expert, "ep", g),
                   edp=group_placement(expert, "edp", g), dpcp=dpcp)


@dataclass(frozen=True)
class Traits:
    """One plan (dp resolved) on one cluster, for one model and micro-batch size: what every
    term reads."""

    shape: TransformerShape
    """The model, at the sequence length of the step."""
    hw: Hardware
    plan: Plan
    mbs: int
    """Sequences per microbatch."""
    groups: Groups
    runtime: Runtime
    """Whose runtime runs the plan where they differ (see step_time.estimate)."""
    vocab_parallel: bool
    """The embedding, the LM head and the loss split over the vocabulary (else whole)."""

    @property
    def args(self) -> tuple:
        """(t, c, b, sp, e, et): the arguments of layer_costs' lambdified block costs."""
        p = self.plan
        return (p.tp, p.cp, self.mbs, 1 if p.sp else 0, p.ep, p.expert_tp)

    @property
    def tokens(self) -> float:
        """Tokens of one microbatch on one context-parallel rank."""
        return self.mbs * self.shape.seq / self.plan.cp

    @property
    def placement(self) -> tuple[int, ...]:
        """The pp rank of every stage (the schedule's: zb-v's V puts the last on rank 0)."""
        return placement(self.plan.schedule, self.plan.pp, self.plan.vpp)

    @property
    def head_rank(self) -> int:
        """The pp rank holding the last stage: the LM head, the loss."""
        return self.placement[-1]

    @property
    def vocab_split(self) -> int:
        """Ways the embedding and the LM head are split."""
        return self.plan.tp if self.vocab_parallel else 1

    @property
    def partitioner_sp(self) -> bool:
        """Sequence parallelism as this package's runtime runs it (its extra collectives)."""
        return self.plan.sp and self.plan.tp > 1 and self.runtime == "partitioner"


class CommTerm(NamedTuple):
    """Seconds a strategy's collectives add to one block (or stage end), per direction."""

    fwd: float = 0.0
    """Exposed seconds in forward: what the rank waits beyond its compute."""
    bwd: float = 0.0
    work_fwd: float = 0.0
    """Of the forward's collectives, the transfers: work for a core shared with other ranks."""
    work_bwd: float = 0.0


class Extra(NamedTuple):
    """A stage end's own seconds per microbatch (the embedding on the first stage, the head and
    loss on the last), compute and collectives together."""

    fwd: float
    bwd: float
    work_fwd: float
    """Of `fwd`, what keeps a core busy (compute and transfers, no latency)."""
    work_bwd: float
    comm: float = 0.0
    """Of `fwd + bwd`, the exposed seconds of its tensor-parallel collectives (reports split
    the step by term with it)."""

    @property
    def work(self) -> float:
        return self.work_fwd + self.work_bwd
