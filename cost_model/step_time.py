"""Step time, memory and efficiency of one plan.

step = pipeline (per-rank compute + exposed TP/CP/EP comm + p2p, over the schedule with its
bubble) + exposed data-parallel gradient sync + tied-embedding sync + optimizer.

Each strategy's time terms live in terms/ (tp, cp, ep, pp, dp), functions of one `Traits`; this
module adds them up: a block of each kind (`block_time`), each pipeline rank of a distinct
layer mix (`rank_time`), then the schedule's span (terms/pp.py) and the step.

That is the step of ranks with a device (or core) each. Where a node runs more ranks than it has
cores (`Hardware.cores`: CPU hosts), the ranks also share the cores: the schedule is run on them
(shared_cores.py), each action's work - compute and collective transfers (the cores copy the
bytes) - sharing the cores with the other ranks' work, its waits - collective latencies,
p2p hops, bubbles - taking none. The result lies between the two lower bounds, the critical path
and the node's work over its cores, and reaches the larger where the other never binds:
    max(critical path, sum over the node's ranks of work_r / cores) <= step
A latency every rank waits on at once (tensor-parallel collectives, in lockstep across the
data-parallel replicas) adds to the work; a bubble another stage's work fills does not.

FLOPs (DESIGN.md): model FLOPs = (6 x active parameters + 12 x layers x hidden x seq) per token;
hardware FLOPs add what recomputation executes again. MFU and HFU are over the dense 16-bit peak.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

from core.plan import Plan, PlanError, coerce_plan, layout_text
from cost_model import memory as mem
from cost_model.comm import CollectiveCost
from cost_model.hardware import Cluster, GiB
from cost_model.layer_costs import BlockCosts, block_costs
from cost_model.shapes import TransformerShape
from cost_model.shared_cores import (Phases, RankPhases, ranks_per_core, shared_core_seconds,
                                     shared_core_step)
from cost_model.terms import cp, dp, ep, tp
from cost_model.terms import pp as pipeline
from cost_model.traits import Extra, Groups, Runtime, Traits


@dataclass(frozen=True)
class Estimate:
    plan: Plan
    """The plan estimated, with dp resolved for the cluster."""
    world_size: int
    global_batch: int
    seq: int
    micro_batch_size: int
    step_time_s: float
    pipeline_s: float
    bubble_s: float
    dp_exposed_s: float
    optimizer_s: float
    comm_s: dict
    """Exposed seconds per step by kind: tp, cp, ep, pp (p2p), dp, embedding."""
    stage_fwd_s: tuple
    """Per pipeline rank, seconds of forward per microbatch (all its virtual stages)."""
    stage_bwd_s: tuple
    stage_memory: tuple
    """Per pipeline rank, total bytes (only ranks of distinct layer mixes are exact; others copy
    the nearest computed rank)."""
    memory: mem.MemoryBreakdown
    device_memory_bytes: float
    model_flops: float
    hardware_flops: float
    peak_flops: float
    critical_path_s: float = 0.0
    """The slowest rank's step with a core or device of its own: pipeline with its bubble,
    exposed syncs, optimizer."""
    shared_cores_s: float = 0.0
    """Where ranks outnumber a node's cores: the step with the schedule run on the shared cores
    (at least the busiest node's work over its cores); 0.0 where every rank has its own core or
    device."""
    stage_work_s: tuple = ()
    """Per pipeline rank, seconds of work per step (compute and collective transfers, no
    waiting): what ranks sharing a core compete for."""
    step_terms_s: dict = field(default_factory=dict)
    """The step split by term, seconds summing to `step_time_s` (STEP_TERMS, every key present):
    the pipeline ranks' mean busy time per step split into compute, recompute (compute run
    again; its collectives stay under their strategy) and exposed tp / cp / ep / pp (p2p)
    seconds (tp includes the vocab-parallel embedding and head), then the bubble, the exposed
    dp gradient sync, the tied-embedding sync, the loss sum, the optimizer, and shared_cores:
    where ranks share a node's cores, the step beyond all these (other ranks' work fills the
    bubble there). Only where layers split unevenly do tp/cp/ep differ from `comm_s`, which
    are the slowest rank's."""
    stage_memory_parts: tuple = ()
    """Per pipeline rank, its MemoryBreakdown (totals in `stage_memory`)."""

    @property
    def memory_gib(self) -> float:
        return self.memory.total / GiB

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.device_memory_bytes

    @property
    def oom_by_gib(self) -> float:
        return max(0.0, (self.memory.total - self.device_memory_bytes) / GiB)

    @property
    def tflops_per_gpu(self) -> float:
        return self.model_flops / self.step_time_s / self.world_size / 1e12

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.step_time_s * self.world_size * self.peak_flops)

    @property
    def hfu(self) -> float:
        return self.hardware_flops / (self.step_time_s * self.world_size * self.peak_flops)

    @property
    def bubble_fraction(self) -> float:
        return self.bubble_s / self.step_time_s

    @property
    def comm_fraction(self) -> float:
        return sum(self.comm_s.values()) / self.step_time_s

    def to_json(self) -> dict:
        """The per-plan record of `partitioner plan --json` (DESIGN.md)."""
        return {"plan": self.plan.to_dict(), "step_time_s": self.step_time_s,
                "tflops_per_gpu": self.tflops_per_gpu, "mfu": self.mfu,
                "memory_gib_per_gpu": self.memory_gib, "bubble_fraction": self.bubble_fraction,
                "comm_fraction": self.comm_fraction, "hfu": self.hfu, "fits": self.fits,
                "micro_batch_size": self.micro_batch_size,
                "comm_breakdown_s": dict(self.comm_s), "step_terms_s": dict(self.step_terms_s),
                "memory_breakdown_gib": {"rank": self.memory.rank, **_gib(self.memory)},
                "stages": [{"stage": r, "fwd_s": f, "bwd_s": b, "memory_gib": _gib(mb)}
                           for r, (f, b, mb) in enumerate(zip(
                               self.stage_fwd_s, self.stage_bwd_s, self.stage_memory_parts,
                               strict=True))]}


def _gib(mb: mem.MemoryBreakdown) -> dict:
    """A rank's memory in GiB by part, and its total."""
    return {k: v / GiB for k, v in mb.as_dict().items() if k != "rank"}


class PlanRejected(PlanError):
    """The plan breaks a divisibility rule for this model or cluster (the plan's own rules are
    core.plan's, whose PlanError this extends)."""


def check_plan(shape: TransformerShape, plan: Plan, world: int, global_batch: int,
               seq: int) -> tuple[Plan, int]:
    """(the plan with dp resolved for `world`, micro-batch size), or PlanRejected naming the
    broken rule. The plan's own rules (sp needs tp, vpp needs interleaving, etp*ep divides
    tp*cp*dp, the degrees dividing the world) are core.plan's; these are the model's and the
    batch's."""
    try:
        p = plan.resolve(world)
    except PlanError as exc:
        raise PlanRejected(str(exc)) from None
    # kv heads tp does not divide are replicated on tp/kv ranks when they divide tp (as the TP
    # pass does); a vocabulary tp does not divide is padded (the pass pads it too)
    if shape.heads % p.tp or shape.n_kv % p.tp and p.tp % shape.n_kv:
        raise PlanRejected(f"tp={p.tp} must divide heads={shape.heads}, and divide or be a "
                           f"multiple of kv_heads={shape.n_kv}")
    if shape.ffn_dim % p.tp:
        raise PlanRejected(f"tp={p.tp} must divide ffn={shape.ffn_dim}")
    if seq % (p.cp * (2 if p.cp > 1 else 1)):
        raise PlanRejected(f"seq={seq} must divide into 2*cp={2 * p.cp} chunks "
                           f"(load-balanced causal context parallelism)")
    if p.cp_algo == "a2a" and shape.heads % (p.tp * p.cp):
        raise PlanRejected(f"cp_algo=a2a needs tp*cp={p.tp * p.cp} to divide heads")
    if p.stage_layers is not None and sum(p.stage_layers) != shape.layers:
        raise PlanRejected(f"stage_layers={layout_text(p.stage_layers)} places "
                           f"{sum(p.stage_layers)} layers but the model has {shape.layers}; "
                           f"give pp*vpp={p.stages} counts summing to {shape.layers}")
    if p.stage_layers is None and p.stages > shape.layers:
        raise PlanRejected(f"pp*vpp={p.pp * p.vpp} exceeds {shape.layers} layers")
    if p.ep > 1 and not shape.experts:
        raise PlanRejected(f"ep={p.ep} on a model without MoE layers")
    if shape.experts and shape.experts % p.ep:
        raise PlanRejected(f"ep={p.ep} must divide experts={shape.experts}")
    if shape.experts and shape.expert_ffn_dim % p.expert_tp:
        raise PlanRejected(f"etp={p.expert_tp} must divide expert ffn={shape.expert_ffn_dim}")
    if global_batch % (p.dp * p.microbatches):
        raise PlanRejected(f"global batch {global_batch} is not divisible by dp*microbatches="
                           f"{p.dp}*{p.microbatches}")
    return p, global_batch // (p.dp * p.microbatches)


@dataclass(frozen=True)
class BlockTime:
    """One block of a kind (dense or MoE) over one microbatch: compute plus the exposed
    collectives of every strategy, and its activations."""

    fwd: float
    bwd: float
    """Backward, with what recomputation runs again."""
    work_fwd: float
    """Of `fwd`, what keeps a core busy: compute and collective transfers (latencies are
    waits). It matters only where ranks share cores (shared_cores.py)."""
    work_bwd: float
    work: float
    """Forward and backward work together."""
    tp: float
    """Exposed tensor-parallel seconds, forward, backward and recomputed forward."""
    cp: float
    ep: float
    recompute: float
    """Of `bwd`, the compute run again (the collectives run again are in tp, cp and ep)."""
    act: float
    """Activation bytes kept until backward."""
    full_act: float
    """Bytes of the block's activations while full recomputation rebuilds them (else 0)."""


def block_time(tr: Traits, bc: BlockCosts, moe: bool) -> BlockTime:
    p, args = tr.plan, tr.args
    fwd, bwd = bc.fwd(*args), bc.bwd(*args)
    t, c, e = tp.block(tr, bc), cp.block(tr, bc), ep.block(tr, bc, moe)
    full = p.recompute == "full"
    rec = rec_work = 0.0
    if p.recompute == "selective":
        rec = rec_work = bc.recompute_selective(*args)
    elif full:
        rec = fwd + t.fwd + c.fwd + e.fwd
        rec_work = fwd + t.work_fwd + c.work_fwd + e.work_fwd
    return BlockTime(
        fwd=fwd + t.fwd + c.fwd + e.fwd, bwd=bwd + t.bwd + c.bwd + e.bwd + rec,
        work_fwd=fwd + t.work_fwd + c.work_fwd + e.work_fwd,
        work_bwd=bwd + t.work_bwd + c.work_bwd + e.work_bwd + rec_work,
        work=fwd + bwd + t.work_fwd + t.work_bwd + c.work_fwd + c.work_bwd +
        (e.work_fwd + e.work_bwd) + rec_work,
        tp=t.fwd + t.bwd + (t.fwd if full else 0.0), cp=c.fwd + c.bwd + (c.fwd if full else 0.0),
        ep=e.fwd + e.bwd + (e.fwd if full else 0.0), recompute=fwd if full else rec,
        act=bc.activation(p.recompute, *args),
        full_act=bc.act_none(*args) if full else 0.0)


class StrategySeconds(NamedTuple):
    """Exposed seconds by strategy (p2p hops for pp)."""

    tp: float
    cp: float
    ep: float
    pp: float


class MicrobatchSplit(NamedTuple):
    """A pipeline rank's seconds per microbatch (fwd + bwd) by term: exposed collectives by
    strategy (tp with the stage ends' vocab-parallel collectives), the compute run again, and
    compute: the rest (blocks, embedding, head and loss, gradient accumulation)."""

    compute: float
    recompute: float
    tp: float
    cp: float
    ep: float
    pp: float


@dataclass(frozen=True)
class RankTime:
    """One pipeline rank's share of the step."""

    fwd: float
    """Seconds of forward per microbatch, all its virtual stages and hops together."""
    bwd: float
    work: float
    """Seconds of work per step (compute and collective transfers, no waiting): what ranks
    sharing a core compete for."""
    phases: RankPhases
    comm: StrategySeconds
    """Exposed seconds per microbatch by strategy."""
    split: MicrobatchSplit
    """`fwd + bwd` by term."""
    memory: mem.MemoryBreakdown
    optimizer_s: float
    dp_exposed_s: float


@dataclass(frozen=True)
class StepParts:
    """What every pipeline rank's time is built from: the blocks, the stage ends and the
    step-wide collectives."""

    dense: BlockTime
    moe: BlockTime
    embedding: Extra
    head: Extra
    hop: CollectiveCost
    tied_sync: CollectiveCost
    loss_sync: CollectiveCost
    include_optimizer: bool


def rank_time(tr: Traits, step: StepParts, r: int, nd: int, nm: int) -> RankTime:
    """Pipeline rank r, holding nd dense and nm MoE blocks."""
    p, hw = tr.plan, tr.hw
    m, v, pp = p.microbatches, p.vpp, p.pp
    dense, moe = step.dense, step.moe
    p_dense, p_exp = _rank_params(tr, r, nd, nm)
    p_local = p_dense + p_exp
    F = nd * dense.fwd + nm * moe.fwd
    B = nd * dense.bwd + nm * moe.bwd
    work_mb = nd * dense.work + nm * moe.work
    work_f = nd * dense.work_fwd + nm * moe.work_fwd
    work_b = nd * dense.work_bwd + nm * moe.work_bwd
    for end in ([step.embedding] if r == 0 else []) + ([step.head] if r == tr.head_rank else []):
        F, B = F + end.fwd, B + end.bwd
        work_mb += end.work
        work_f, work_b = work_f + end.work_fwd, work_b + end.work_bwd
    if tr.runtime == "partitioner" and m > 1:
        # microbatches 2..m add their weight gradients into .grad: read both, write one
        accumulate = hw.memory_time(3 * hw.elem_bytes * p_local) * (m - 1) / m
        B, work_b, work_mb = B + accumulate, work_b + accumulate, work_mb + accumulate
    # per microbatch: p2p latencies are the schedule's hops, not the rank's waits (a ring
    # hidden behind attention can leave less exposed than its transfer: no wait then)
    forward = Phases(work_f + v * step.hop.transfer, max(0.0, F - work_f))
    backward = Phases(work_b + v * step.hop.transfer, max(0.0, B - work_b))
    p2p, p2p_work = pipeline.per_microbatch(tr, step.hop)
    if pp > 1:
        F, B = F + p2p / 2, B + p2p / 2
        work_mb += p2p_work
    comm = StrategySeconds(tp=nd * dense.tp + nm * moe.tp, cp=nd * dense.cp + nm * moe.cp,
                           ep=nd * dense.ep + nm * moe.ep, pp=p2p)
    ends_tp = (step.embedding.comm if r == 0 else 0.0) + (step.head.comm if r == pp - 1 else 0.0)
    exposed = MicrobatchSplit(0.0, nd * dense.recompute + nm * moe.recompute, comm.tp + ends_tp,
                              comm.cp, comm.ep, p2p if pp > 1 else 0.0)
    split = exposed._replace(compute=F + B - sum(exposed))

    # optimizer (fused AdamW reads grad, master, m, v and writes master, m, v, param) plus
    # grad-norm read and zeroing, over this rank's shard
    shard = _optimizer_shard(p, p_dense, p_exp)
    opt = hw.memory_time(30 * shard + 8 * p_local, kernels=4) if step.include_optimizer else 0.0
    # data-parallel gradient sync, overlapped with compute as terms/dp.exposed_sync says
    sync = dp.gradient_sync(tr, p_dense, p_exp)
    buckets = max(1, nd + nm)
    ends = r in (0, tr.head_rank)
    tied, loss = step.tied_sync, step.loss_sync
    work = (m * work_mb + sum(c.transfer for c in sync) + opt +
            (tied.transfer if ends else 0.0) + loss.transfer)
    # the tail: the sync's bytes compete for the cores (no core is idle to hide them behind
    # backward), the latency of the buckets before the last is hidden
    tail = Phases(
        sum(c.transfer for c in sync) + opt + (tied.transfer if ends else 0.0) + loss.transfer,
        sum(c.latency for c in sync) / buckets + (tied.latency if ends else 0.0) + loss.latency)
    return RankTime(fwd=F, bwd=B, work=work, phases=RankPhases(forward, backward, tail),
                    comm=comm, split=split, memory=_rank_memory(tr, step, r, nd, nm, p_dense, p_exp),
                    optimizer_s=opt, dp_exposed_s=dp.exposed_sync(tr, sync, buckets, F, B))


def _optimizer_shard(p: Plan, p_dense: float, p_exp: float) -> float:
    """Parameters whose optimizer state a rank holds: all its own, or under ZeRO-1 its share
    over dp x cp (dense) and over the expert data-parallel ranks (experts)."""
    if not p.zero:
        return p_dense + p_exp
    edp = p.tp * p.cp * p.dp // (p.ep * p.expert_tp)
    return p_dense / (p.dp * p.cp) + p_exp / edp


def _rank_params(tr: Traits, r: int, nd: int, nm: int) -> tuple[float, float]:
    """(dense, expert) parameters held by pipeline rank r: its blocks' shards, the embedding
    on the first rank, the head (and a tied embedding's copy) on the last."""
    p, shape, split = tr.plan, tr.shape, tr.vocab_split
    head = shape.head_params() / split + (  # a tied embedding's copy, unless on the same rank
        shape.vocab * shape.hidden / split if shape.tie_embeddings and tr.head_rank else 0.0)
    p_dense = nd * (shape.dense_block_params() / p.tp) + (
        shape.embedding_params() / split if r == 0 else 0.0) + (head if r == tr.head_rank
                                                                 else 0.0)
    params_moe = shape.moe_block_params() / p.tp + shape.expert_params() / (p.ep * p.expert_tp)
    return p_dense, nm * params_moe


def _rank_memory(tr: Traits, step: StepParts, r: int, nd: int, nm: int, p_dense: float,
                 p_exp: float) -> mem.MemoryBreakdown:
    p, shape, T = tr.plan, tr.shape, tr.tokens
    p_local = p_dense + p_exp
    per_param = mem.param_bytes(p.param_dtype, p.zero, p.reduce_dtype, tr.runtime)
    optim = per_param.optimizer * _optimizer_shard(p, p_dense, p_exp)
    flight = mem.in_flight(p.schedule, r, p.pp, p.microbatches, p.vpp)
    if p.schedule == "interleaved-1f1b" and p.vpp > 1:
        chunks = mem.chunk_layers(shape.layers, shape.dense_layers, bool(shape.experts), p.pp,
                                  p.vpp, None, p.stage_layers)[r]
        act = mem.interleaved_peak(r, p.pp, p.microbatches, tuple(
            d * step.dense.act + e * step.moe.act for d, e in chunks))
    else:
        act = flight * (nd * step.dense.act + nm * step.moe.act)
    act *= _activation_scale(p)
    temp = max(step.dense.full_act, step.moe.full_act)
    temp += 2 * 2 * T * shape.hidden  # gathered sequence-parallel input, its gradient
    if r == tr.head_rank:
        temp += T * shape.vocab / tr.vocab_split * (2 + 4 + 4)  # logits, fp32 softmax, grad
    if r == 0 and p.pp > 1:
        act += flight * 2 * T * shape.hidden / (p.tp if p.sp else 1)
    return mem.breakdown(r, per_param.weights * p_local, per_param.grads * p_local, optim, act,
                         temp, tr.hw.reserved_bytes, tr.hw.allocator_margin)


def _activation_scale(p: Plan) -> float:
    """Activations are counted in 16 bits; an fp32 run keeps twice the bytes."""
    return 2.0 if p.param_dtype == "fp32" else 1.0


def estimate(shape: TransformerShape, plan: Plan | str | dict, cluster: Cluster,
             global_batch: int, seq: int | None = None, include_optimizer: bool = True,
             vocab_parallel: bool = True, runtime: Runtime = "megatron") -> Estimate:
    """Predict one training step of `plan` on `cluster` (raises PlanRejected on a rule).

    `include_optimizer=False` leaves out the optimizer update: the part of a step that
    `ParallelModel.step` runs (forward, backward, gradient sync), the user's optimizer being
    outside it. `vocab_parallel=False` keeps the embedding, the LM head and the loss whole on
    every tensor-parallel rank, as the TP pass does for a model without `vocab` rules; True
    splits them over the vocabulary (Megatron-Core's vocab-parallel layers).

    `runtime` says whose runtime runs the plan where they differ. "megatron" (Megatron-Core):
    weight gradients accumulate over microbatches inside the wgrad GEMM (gradient accumulation
    fusion); with sequence parallelism a column linear's input, saved as its sequence shard, is
    gathered again in backward overlapped with the input-gradient GEMM, and norm weight and bias
    gradients are summed once per step. "partitioner" (this package's runtime/ and passes/):
    autograd adds every microbatch's weight gradients after the first into `.grad`; the step
    sums its loss over pp and dp (a latency-bound all-reduce every rank waits on); with sequence
    parallelism the gather runs before backward needs it, exposed, every norm weight and bias
    read in the sequence zone all-reduces its gradient over tp in backward, per microbatch, and
    a replicated LM head all-gathers the sequence first."""
    seq = seq or shape.seq
    if seq != shape.seq:
        shape = shape.with_seq(seq)
    hw = peak_hw = cluster.hardware
    world = cluster.num_gpus
    try:
        plan = coerce_plan(plan)
    except PlanError as exc:
        raise PlanRejected(str(exc)) from None
    p, mbs = check_plan(shape, plan, world, global_batch, seq)
    m, v, pp = p.microbatches, p.vpp, p.pp
    if p.param_dtype == "fp32":  # computes at the fp32 (TF32) peak; MFU stays over 16-bit's
        hw = dataclasses.replace(hw, peak_flops=hw.peak_flops * hw.fp32_peak_ratio)
    tr = Traits(shape=shape, hw=hw, plan=p, mbs=mbs, groups=Groups.of(p, cluster),
                runtime=runtime, vocab_parallel=vocab_parallel)
    dense = block_time(tr, block_costs(shape, hw, False), False)
    step = StepParts(dense=dense,
                 moe=block_time(tr, block_costs(shape, hw, True), True) if shape.experts
                 else dense,
                 embedding=tp.embedding(tr), head=tp.head(tr), hop=pipeline.hop(tr),
                 tied_sync=pipeline.tied_embedding_sync(tr), loss_sync=dp.loss_sum(tr),
                 include_optimizer=include_optimizer)

    # ranks of distinct layer mixes are computed; the others copy the one with the same mix
    chunks = None if p.schedule != "zb-v" else tr.placement
    ranks = mem.distinct_ranks(shape.layers, shape.dense_layers, bool(shape.experts), pp, v,
                               chunks, p.stage_layers)
    computed = {r: rank_time(tr, step, r, nd, nm) for r, nd, nm in ranks}
    full_times = mem.stage_layers(shape.layers, shape.dense_layers, bool(shape.experts), pp, v,
                                  chunks, p.stage_layers)
    x = {r: rt.fwd + rt.bwd for r, rt in computed.items()}
    f = {r: rt.fwd for r, rt in computed.items()}
    mix_x, mix_f = {}, {}
    for r, nd, nm in ranks:
        if 0 < r < pp - 1:
            mix_x.setdefault((nd, nm), x[r])
            mix_f.setdefault((nd, nm), f[r])
    all_x = [x.get(r, mix_x.get(mix, 0.0)) for r, mix in enumerate(full_times)]
    all_f = [f.get(r, mix_f.get(mix, 0.0)) for r, mix in enumerate(full_times)]
    span = pipeline.span(all_x, m, v, p.schedule, all_f)
    ideal = m * sum(all_x) / pp
    slowest = computed[max(x, key=x.get)]
    per_rank = [_by_mix(computed, ranks, full_times, r) for r in range(pp)]

    dp_exposed = max([0.0] + [rt.dp_exposed_s for rt in computed.values()])
    opt_time = max([0.0] + [rt.optimizer_s for rt in computed.values()])
    tied, loss = step.tied_sync, step.loss_sync
    critical_path = span + dp_exposed + tied.seconds + opt_time + loss.seconds
    shared = 0.0
    if ranks_per_core(cluster) > 1.0:
        shared = max(shared_core_step([rt.phases for rt in per_rank], p, cluster,
                                      step.hop.latency),
                     shared_core_seconds([rt.work for rt in per_rank], p, cluster))
    step_s = max(critical_path, shared)
    # a pipeline bubble is idle time only while the cores are not the bottleneck: on shared
    # cores the other ranks run in it
    bubble = max(0.0, span - ideal) if critical_path >= shared else 0.0

    comm = {k: m * seconds for k, seconds in slowest.comm._asdict().items()}
    comm["dp"] = dp_exposed
    comm["embedding"] = tied.seconds
    syncs = {"bubble": bubble, "dp": dp_exposed, "embedding": tied.seconds, "loss": loss.seconds,
             "optimizer": opt_time}

    tokens = global_batch * seq
    model_flops = shape.model_flops_per_token(seq) * tokens
    if p.recompute == "full":
        extra = model_flops / 3
    elif p.recompute == "selective" and shape.attention == "unfused":
        extra = 4 * shape.layers * global_batch * seq * seq * shape.hidden
    else:
        extra = 0.0
    worst = max((rt.memory for rt in computed.values()), key=lambda mb: mb.total)
    return Estimate(
        plan=p, world_size=world, global_batch=global_batch, seq=seq, micro_batch_size=mbs,
        step_time_s=step_s, pipeline_s=span, bubble_s=bubble,
        dp_exposed_s=dp_exposed, optimizer_s=opt_time, comm_s=comm,
        stage_fwd_s=tuple(rt.fwd for rt in per_rank),
        stage_bwd_s=tuple(rt.bwd for rt in per_rank),
        stage_memory=tuple(rt.memory.total for rt in per_rank), memory=worst,
        device_memory_bytes=hw.memory_bytes, model_flops=model_flops,
        hardware_flops=model_flops + extra, peak_flops=peak_hw.peak_flops,
        critical_path_s=critical_path, shared_cores_s=shared,
        stage_work_s=tuple(rt.work for rt in per_rank),
        step_terms_s=_step_terms([rt.split for rt in per_rank], m, syncs,
                                 step_s if critical_path < shared else None),
        stage_memory_parts=tuple(rt.memory for rt in per_rank))


STEP_TERMS = ("compute", "recompute", "tp", "cp", "ep", "pp", "dp", "embedding", "loss",
              "optimizer", "bubble", "shared_cores")
"""The keys of `Estimate.step_terms_s`, in the order reports draw them."""


def _step_terms(splits: list[MicrobatchSplit], m: int, syncs: dict,
                shared_step_s: float | None) -> dict:
    """Estimate.step_terms_s: the mean rank's m microbatches by term (the span less its bubble),
    the step-wide terms `syncs`, and where the shared cores set the step (`shared_step_s`),
    what they add beyond them."""
    pp = len(splits)
    terms = {k: m * sum(getattr(s, k) for s in splits) / pp for k in MicrobatchSplit._fields}
    for k, v in syncs.items():
        terms[k] = terms.get(k, 0.0) + v
    if shared_step_s is not None:
        terms["shared_cores"] = shared_step_s - sum(terms.values())
    return {k: terms.get(k, 0.0) for k in STEP_TERMS}


def _by_mix(values: dict, ranks, per_rank, r: int):
    """The value computed for rank r, or for the computed rank with the same layer mix."""
    if r in values:
        return values[r]
    for q, nd, nm in ranks:
        if (nd, nm) == per_rank[r] and 0 < q < len(per_rank) - 1:
            return values[q]
    return values[min(values, key=lambda q: abs(q - r))]
