"""Data-parallel time terms: the gradient sync (dense weights over dp x cp, expert weights over
the expert data-parallel group; ZeRO-1 reduce-scatters and all-gathers instead of all-reducing)
and, on this package's runtime, the loss summed over pp and dp.

Gradients go over the wire in the plan's `reduce_dtype` (fp32 unless mixed precision names
another, as Megatron's grad_reduce_in_bf16 / NeMo's grad_sync_dtype do). The reduction overlaps
the last microbatch's backward bucket by bucket. On Megatron-Core's runtime the distributed
optimizer's parameter all-gather (ZeRO-1) overlaps the next step's first forward the same way
(its overlap_param_gather, which tuned runs set, as Llama 3's FSDP prefetches); this package's
runtime gathers after the optimizer, exposed."""

from __future__ import annotations

from cost_model.comm import CollectiveCost, collective_parts
from cost_model.memory import DTYPE_BYTES
from cost_model.traits import Traits


def gradient_sync(tr: Traits, dense_params: float, expert_params: float) -> tuple:
    """The collectives of one rank's gradient sync (gradients in the plan's reduce_dtype;
    ZeRO-1 gathers the updated parameters back in the training precision)."""
    hw, groups = tr.hw, tr.groups
    grad = DTYPE_BYTES[tr.plan.reduce_dtype]
    if tr.plan.zero:
        return (collective_parts("reduce_scatter", grad * dense_params, groups.dpcp, hw),
                collective_parts("all_gather", hw.elem_bytes * dense_params, groups.dpcp, hw),
                collective_parts("reduce_scatter", grad * expert_params, groups.edp, hw),
                collective_parts("all_gather", hw.elem_bytes * expert_params, groups.edp, hw))
    return (collective_parts("all_reduce", grad * dense_params, groups.dpcp, hw),
            collective_parts("all_reduce", grad * expert_params, groups.edp, hw))


def exposed(sync_s: float, buckets: int, last_backward_s: float) -> float:
    """What of the sync the step waits on: it overlaps the last microbatch's backward bucket by
    bucket, so at least the last bucket shows."""
    return max(sync_s / buckets, sync_s - last_backward_s)


def exposed_sync(tr: Traits, sync: tuple, buckets: int, forward_s: float,
                 backward_s: float) -> float:
    """What of `gradient_sync`'s collectives the step waits on, for a pipeline rank whose
    microbatch takes `forward_s` and `backward_s` (all its virtual stages): everything behind
    the backward (`overlap_window`), or on Megatron-Core's runtime under ZeRO-1 the reductions
    behind the backward and the parameter all-gathers behind the first forward."""
    behind_backward = overlap_window(tr, backward_s)
    if tr.runtime != "megatron" or not tr.plan.zero:
        return exposed(sum(c.seconds for c in sync), buckets, behind_backward)
    reduce_s = sum(c.seconds for c in sync[0::2])
    gather_s = sum(c.seconds for c in sync[1::2])
    return (exposed(reduce_s, buckets, behind_backward) +
            exposed(gather_s, buckets, overlap_window(tr, forward_s)))


def overlap_window(tr: Traits, per_microbatch_s: float) -> float:
    """Seconds of a rank's compute a bucketed sync can hide behind at the step's end (backward)
    or start (forward): one microbatch's. Under interleaving on Megatron-Core's runtime each
    virtual stage syncs once its own last microbatch is done (its grad_sync_func), and the
    schedule then still runs min(p, m) microbatches of each of the other v-1 virtual stages
    (Narayanan et al.'s depth-first order), so the window is one virtual stage's microbatch
    plus those; this package's runtime syncs after the last backward."""
    p = tr.plan
    if tr.runtime != "megatron" or p.schedule != "interleaved-1f1b" or p.vpp == 1:
        return per_microbatch_s
    chunk = per_microbatch_s / p.vpp
    return chunk * (1 + (p.vpp - 1) * min(p.pp, p.microbatches))


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
