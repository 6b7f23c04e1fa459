"""Pipeline-parallel time terms: the p2p hops between stages, the tied-embedding sync of the
first and last stage, and the schedule's span over the stages' microbatch times.

Pipeline time with per-rank microbatch time x_r = F_r + B_r over m microbatches and v virtual
stages per rank:
    T = m max_r x_r + (sum_r x_r - max_r x_r) / v
which for equal stages is (m + p - 1) x (1F1B, GPipe) and m x (1 + (p-1)/(v m)) (interleaved):
the bubble fractions (p-1)/(m+p-1) and (p-1)/(v m) of published-runs.md.
"""

from __future__ import annotations

from cost_model.comm import CollectiveCost, GroupPlacement, collective_parts
from cost_model.traits import Traits


def hop(tr: Traits) -> CollectiveCost:
    """One microbatch's activations sent to the next stage, scattered over tp (Megatron's
    scatter-gather)."""
    if tr.plan.pp == 1:
        return CollectiveCost(0.0, 0.0)
    return collective_parts("send", tr.hw.elem_bytes * tr.tokens * tr.shape.hidden / tr.plan.tp,
                            tr.groups.pp, tr.hw)


def per_microbatch(tr: Traits, one: CollectiveCost) -> tuple[float, float]:
    """(exposed seconds, work seconds) of a rank's hops per microbatch: a send and a receive
    each way on each of its virtual stages; the profile's `p2p_overlap` of it hides behind
    compute, but the bytes are copied all the same."""
    v = tr.plan.vpp
    return 2 * v * one.seconds * (1 - tr.hw.p2p_overlap), 2 * v * one.transfer


def tied_embedding_sync(tr: Traits) -> CollectiveCost:
    """The gradient all-reduce of an embedding tied to the LM head across the first and last
    stage (none without tying or pipelining)."""
    if tr.plan.pp == 1 or not tr.shape.tie_embeddings:
        return CollectiveCost(0.0, 0.0)
    pair = GroupPlacement(2, 1 if not tr.groups.pp.intra_node else 2)
    return collective_parts("all_reduce", 4 * tr.shape.vocab * tr.shape.hidden / tr.vocab_split,
                            pair, tr.hw)


def span(stage_x: list[float], microbatches: int, vpp: int) -> float:
    """Seconds of the schedule over pipeline ranks whose microbatch takes `stage_x` each."""
    xmax, xsum = max(stage_x), sum(stage_x)
    return microbatches * xmax + (xsum - xmax) / vpp
