"""Data-parallel time terms: the gradient sync (dense weights over dp x cp, expert weights over
the expert data-parallel group; ZeRO-1 reduce-scatters and all-gathers instead of all-reducing)
and, on this package's runtime, the loss summed over pp and dp."""

from __future__ import annotations

from cost_model.comm import CollectiveCost, collective_parts
from cost_model.traits import Traits


def gradient_sync(tr: Traits, dense_params: float, expert_params: float) -> tuple:
    """The collectives of one rank's gradient sync (fp32 gradients; ZeRO-1 gathers the updated
    parameters back in the training precision)."""
    hw, groups = tr.hw, tr.groups
    if tr.plan.zero:
        return (collective_parts("reduce_scatter", 4 * dense_params, groups.dpcp, hw),
                collective_parts("all_gather", hw.elem_bytes * dense_params, groups.dpcp, hw),
                collective_parts("reduce_scatter", 4 * expert_params, groups.edp, hw),
                collective_parts("all_gather", hw.elem_bytes * expert_params, groups.edp, hw))
    return (collective_parts("all_reduce", 4 * dense_params, groups.dpcp, hw),
            collective_parts("all_reduce", 4 * expert_params, groups.edp, hw))


def exposed(sync_s: float, buckets: int, last_backward_s: float) -> float:
    """What of the sync the step waits on: it overlaps the last microbatch's backward bucket by
    bucket, so at least the last bucket shows."""
    return max(sync_s / buckets, sync_s - last_backward_s)


def loss_sum(tr: Traits) -> CollectiveCost:
    """This package's step sums its loss over pp and dp: a few bytes every rank waits on (none
    on Megatron-Core's runtime)."""
    if tr.runtime != "partitioner":
        return CollectiveCost(0.0, 0.0)
    loss = CollectiveCost(0.0, 0.0)
    for group in (tr.groups.pp, tr.groups.dp):
        part = collective_parts("all_reduce", 24, group, tr.hw)
        loss = CollectiveCost(loss.latency + part.latency, loss.transfer + part.transfer)
    return loss
