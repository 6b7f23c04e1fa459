"""Pipeline-parallel time terms: the p2p hops between stages, the tied-embedding sync of the
first and last stage, and the schedule's span over the stages' microbatch times.

Pipeline time with per-rank microbatch time x_r = F_r + B_r over m microbatches and v virtual
stages per rank:
    T = m max_r x_r + (sum_r x_r - max_r x_r) / v
which for equal stages is (m + p - 1) x (1F1B, GPipe) and m x (1 + (p-1)/(v m)) (interleaved):
the bubble fractions (p-1)/(m+p-1) and (p-1)/(v m) of published-runs.md. The zero-bubble
schedules split B into its input-gradient half I and weight-gradient half W (I = W = B/2: a
matmul's dX and dW cost the same); only F and I are on the pipeline's critical path, and the W
steps fill the rest (Qi et al. 2023):
    ZB-H1: T = m max_r x_r + (sum_r f_r - max_r f_r)       bubble (p-1)(F + I - W) = (p-1) F
    ZB-V:  T = m max_r x_r + (sum_r f_r - max_r f_r) / 2   two half stages per rank in a V
with f_r = F_r; `core.schedules.unit_bubble` simulates the same at unit costs.
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
    stage (none without tying or pipelining, or when one rank holds both: zb-v's V)."""
    if tr.plan.pp == 1 or not tr.shape.tie_embeddings or tr.head_rank == 0:
        return CollectiveCost(0.0, 0.0)
    pair = GroupPlacement(2, 1 if not tr.groups.pp.intra_node else 2)
    return collective_parts("all_reduce", 4 * tr.shape.vocab * tr.shape.hidden / tr.vocab_split,
                            pair, tr.hw)


def span(stage_x: list[float], microbatches: int, vpp: int, schedule: str = "1f1b",
         stage_f: list[float] | None = None) -> float:
    """Seconds of the schedule over pipeline ranks whose microbatch takes `stage_x` each
    (forward and backward), `stage_f` of it the forward (needed by the zero-bubble ones)."""
    xmax, xsum = max(stage_x), sum(stage_x)
    if schedule in ("zb-h1", "zb-v"):
        if stage_f is None:
            raise ValueError(f"the {schedule} span needs the forward times (stage_f)")
        fill = sum(stage_f) - max(stage_f)
        return microbatches * xmax + (fill / 2 if schedule == "zb-v" else fill)
    return microbatches * xmax + (xsum - xmax) / vpp
