"""Tensor-parallel time terms: a block's f/g collectives (all-reduce, or with sequence
parallelism its all-gather and reduce-scatter halves), and the vocab-parallel stage ends.

With sequence parallelism this package's runtime (Traits.runtime == "partitioner") also gathers
each column region's input again in backward, exposed, and all-reduces the gradient of every
norm weight and bias read in the sequence zone, per microbatch; Megatron-Core overlaps the
first and sums the second once per step.

With async TP (plan `async_tp=on`: this package's passes/async_tp.py, Megatron-Core's
tp_comm_overlap) each all-gather and reduce-scatter runs as tp ring steps overlapped with the
chunks of the GEMM beside it (comm.overlapped_transfer): forward, the all-gather with the column
projection after it and the reduce-scatter with the row projection before it; backward, the
row projection's all-gather of its output gradient with its input-gradient GEMM and the column
projection's reduce-scatter of its input gradient with its weight-gradient GEMM, each a GEMM
of the forward's size. This runtime's backward regather is fused the same way (with the column
projection's input-gradient GEMM).
"""

from __future__ import annotations

from cost_model.comm import CollectiveCost, collective_parts, overlapped_transfer
from cost_model.layer_costs import BlockCosts, embedding_time, head_time
from cost_model.shapes import TransformerShape
from cost_model.traits import CommTerm, Extra, Traits


def block(tr: Traits, bc: BlockCosts) -> CommTerm:
    """The tensor-parallel collectives of one block: two f/g pairs (attention, MLP) each way."""
    hw, group = tr.hw, tr.groups.tp
    msg = bc.tp_bytes(*tr.args)
    if tr.plan.async_tp and tr.plan.tp > 1:
        return _overlapped_block(tr, bc, msg)
    one = pair(tr, msg)
    fwd = bwd = 2 * one.seconds
    work = 2 * one.transfer  # per direction
    if not tr.partitioner_sp:
        return CommTerm(fwd, bwd, work, work)
    # backward: each column region's input gathered again (2 a block), and one small
    # all-reduce per norm weight/bias and row-parallel bias gradient
    regather = collective_parts("all_gather", msg, group, hw)
    small = collective_parts("all_reduce", 4 * tr.shape.hidden, group, hw)
    n_small = sp_param_reads(tr.shape)
    bwd += 2 * regather.seconds + n_small * small.seconds
    return CommTerm(fwd, bwd, work, work + 2 * regather.transfer + n_small * small.transfer)


def _overlapped_block(tr: Traits, bc: BlockCosts, msg: float) -> CommTerm:
    """`block` under async TP (sequence parallelism on): each collective's latency, and of its
    transfer what the GEMM beside it does not hide."""
    hw, group, tp = tr.hw, tr.groups.tp, tr.plan.tp
    gather = collective_parts("all_gather", msg, group, hw)
    scatter = collective_parts("reduce_scatter", msg, group, hw)
    attn_in, attn_out, mlp_in, mlp_out = (window(*tr.args) for window in bc.tp_windows)

    def exposed(cost: CollectiveCost, window: float) -> float:
        return cost.latency + overlapped_transfer(cost, window, tp)

    fwd = (exposed(gather, attn_in) + exposed(scatter, attn_out) + exposed(gather, mlp_in) +
           exposed(scatter, mlp_out))
    bwd = (exposed(gather, attn_out) + exposed(scatter, attn_in) + exposed(gather, mlp_out) +
           exposed(scatter, mlp_in))
    work = 2 * (gather.transfer + scatter.transfer)
    if not tr.partitioner_sp:
        return CommTerm(fwd, bwd, work, work)
    small = collective_parts("all_reduce", 4 * tr.shape.hidden, group, hw)
    n_small = sp_param_reads(tr.shape)
    bwd += exposed(gather, attn_in) + exposed(gather, mlp_in) + n_small * small.seconds
    return CommTerm(fwd, bwd, work, work + 2 * gather.transfer + n_small * small.transfer)


def pair(tr: Traits, nbytes: float) -> CollectiveCost:
    """One tensor-parallel f/g collective: an all-reduce, or with sequence parallelism its
    all-gather + reduce-scatter halves (the same ring traffic on NCCL; not on gloo)."""
    if tr.plan.tp == 1:
        return CollectiveCost(0.0, 0.0)
    if not tr.plan.sp:
        return collective_parts("all_reduce", nbytes, tr.groups.tp, tr.hw)
    gather = collective_parts("all_gather", nbytes, tr.groups.tp, tr.hw)
    scatter = collective_parts("reduce_scatter", nbytes, tr.groups.tp, tr.hw)
    return CollectiveCost(gather.latency + scatter.latency, gather.transfer + scatter.transfer)


def sp_param_reads(shape: TransformerShape) -> int:
    """Parameters a block reads in the sequence zone that broadcast over the tokens: each norm's
    weight (and bias), and the bias a row-parallel linear adds after its reduce-scatter."""
    per_norm = 2 if shape.norm == "layernorm" and shape.bias else 1
    return 2 * per_norm + (2 if shape.bias else 0)


def embedding(tr: Traits) -> Extra:
    """The first stage's embedding: a vocab-parallel one sums the rank that holds each id (an
    all-reduce, or under sequence parallelism a reduce-scatter in the block's first pair); a
    whole one needs no sum."""
    p, hw = tr.plan, tr.hw
    fwd, bwd = embedding_time(tr.shape, hw, tr.vocab_split, p.cp, tr.mbs, p.sp)
    summed = collective_parts("all_reduce", hw.elem_bytes * tr.tokens * tr.shape.hidden,
                              tr.groups.tp, hw) if tr.vocab_parallel else CollectiveCost(0.0, 0.0)
    work_fwd, work_bwd = fwd + summed.transfer, bwd + (0.0 if p.sp else summed.transfer)
    comm = summed.seconds + (summed.seconds if not p.sp else 0.0)
    return Extra(fwd + summed.seconds, bwd + (summed.seconds if not p.sp else 0.0),
                 work_fwd, work_bwd, comm)


def head(tr: Traits) -> Extra:
    """The last stage's final norm, LM head and loss. Under this package's sequence
    parallelism the last norm's weight (and bias) gradients are summed over tp and the head's
    input is gathered over the sequence (its backward keeps this rank's slice, or
    reduce-scatters the gradient of a vocab-parallel head)."""
    p, hw, group = tr.plan, tr.hw, tr.groups.tp
    fwd, bwd = head_time(tr.shape, hw, tr.vocab_split, p.cp, tr.mbs, p.sp)
    if not tr.partitioner_sp:
        return Extra(fwd, bwd, fwd, bwd)
    activation = hw.elem_bytes * tr.tokens * tr.shape.hidden
    final = collective_parts("all_reduce", 4 * tr.shape.hidden, group, hw)
    n_final = 2 if tr.shape.norm == "layernorm" and tr.shape.bias else 1
    gather = collective_parts("all_gather", activation, group, hw)
    back = collective_parts("reduce_scatter", activation, group, hw) if tr.vocab_parallel \
        else CollectiveCost(0.0, 0.0)
    fwd += gather.seconds
    bwd += n_final * final.seconds + back.seconds
    return Extra(fwd, bwd, fwd - gather.latency, bwd - n_final * final.latency - back.latency,
                 gather.seconds + n_final * final.seconds + back.seconds)
