"""Step time, memory and efficiency of one plan.

step = pipeline (per-rank compute + exposed TP/CP/EP comm + p2p, over the schedule with its
bubble) + exposed data-parallel gradient sync + tied-embedding sync + optimizer.

Pipeline time with per-rank microbatch time x_r = F_r + B_r (forward, backward incl.
recomputation) over m microbatches and v virtual stages per rank:
    T = m max_r x_r + (sum_r x_r - max_r x_r) / v
which for equal stages is (m + p - 1) x (1F1B, GPipe) and m x (1 + (p-1)/(v m)) (interleaved):
the bubble fractions (p-1)/(m+p-1) and (p-1)/(v m) of published-runs.md.

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
from typing import Literal

from core.layout import RankLayout
from core.plan import Plan, PlanError, coerce_plan
from core.schedules import Action, schedule
from cost_model import memory as mem
from cost_model.comm import CollectiveCost, GroupPlacement, collective_parts, group_placement
from cost_model.hardware import Cluster, GiB
from cost_model.layer_costs import block_costs, embedding_time, head_time
from cost_model.shared_cores import Phases, simulate
from cost_model.shapes import TransformerShape

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
                "comm_breakdown_s": dict(self.comm_s)}


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
    if p.stages > shape.layers:
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


def _groups(p: Plan, cluster: Cluster) -> dict[str, GroupPlacement]:
    g = cluster.gpus_per_node
    dense, expert = RankLayout.dense(p), RankLayout.expert(p)
    out = {d: group_placement(dense, d, g) for d in ("tp", "cp", "dp", "pp")}
    out["ep"] = group_placement(expert, "ep", g)
    out["edp"] = group_placement(expert, "edp", g)
    # gradients of dense weights are reduced over dp*cp: the cp ranks sit between tp and dp
    dpcp = GroupPlacement(p.dp * p.cp, max(1, min(out["dp"].per_node * out["cp"].per_node,
                                                  p.dp * p.cp)))
    out["dpcp"] = dpcp
    return out


def estimate(shape: TransformerShape, plan, cluster: Cluster, global_batch: int,
             seq: int | None = None, include_optimizer: bool = True,
             vocab_parallel: bool = True,
             runtime: Literal["megatron", "partitioner"] = "megatron") -> Estimate:
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
    hw = cluster.hardware
    world = cluster.num_gpus
    try:
        plan = coerce_plan(plan)
    except PlanError as exc:
        raise PlanRejected(str(exc)) from None
    p, mbs = check_plan(shape, plan, world, global_batch, seq)
    dp = p.dp
    m, v, pp = p.microbatches, p.vpp, p.pp
    groups = _groups(p, cluster)
    args = (p.tp, p.cp, mbs, 1 if p.sp else 0, p.ep, p.expert_tp)
    kinds = [(False, block_costs(shape, hw, False))]
    if shape.experts:
        kinds.append((True, block_costs(shape, hw, True)))

    # --- one block of each kind: compute, exposed comm, activations --------------------------
    # "work" is what keeps a core busy: compute, and the transfer part of every collective (on a
    # CPU host the cores copy the bytes); latencies are waits. It matters only where ranks
    # share cores (see shared_core_seconds).
    per_kind = []
    for moe, bc in kinds:
        fwd, bwd = bc.fwd(*args), bc.bwd(*args)
        tp_msg = bc.tp_bytes(*args)
        tp_one = _tp_pair(p, tp_msg, groups["tp"], hw)
        tp_f = tp_b = 2 * tp_one.seconds
        tp_work = 2 * tp_one.transfer  # per direction
        cp_f = cp_b = cp_work_f = cp_work_b = 0.0
        if p.cp > 1:
            if p.cp_algo == "ring":
                hop = collective_parts("send", bc.cp_bytes(*args), groups["cp"], hw)
                ring = (p.cp - 1) * hop.seconds
                attn = bc.attention_fwd(*args)
                cp_f = max(0.0, ring - attn)
                cp_b = max(0.0, 2 * ring - 2.5 * attn)
                cp_work_f, cp_work_b = (p.cp - 1) * hop.transfer, 2 * (p.cp - 1) * hop.transfer
            else:
                a2a = collective_parts("all_to_all", 2 * tp_msg / p.tp, groups["cp"], hw)
                cp_f = cp_b = 4 * a2a.seconds
                cp_work_f = cp_work_b = 4 * a2a.transfer
        ep_f = ep_b = ep_work = 0.0
        if moe and p.ep > 1:
            a2a = collective_parts("all_to_all", bc.ep_bytes(*args), groups["ep"], hw)
            ep_f = ep_b = 2 * a2a.seconds
            ep_work = 2 * a2a.transfer  # per direction
        if p.sp and p.tp > 1 and runtime == "partitioner":
            # backward: each column region's input gathered again (2 a block), and one small
            # all-reduce per norm weight/bias and row-parallel bias gradient
            regather = collective_parts("all_gather", tp_msg, groups["tp"], hw)
            small = collective_parts("all_reduce", 4 * shape.hidden, groups["tp"], hw)
            n_small = sp_param_reads(shape)
            tp_b += 2 * regather.seconds + n_small * small.seconds
            tp_work_b = tp_work + 2 * regather.transfer + n_small * small.transfer
        else:
            tp_work_b = tp_work
        rec = rec_work = 0.0
        if p.recompute == "selective":
            rec = rec_work = bc.recompute_selective(*args)
        elif p.recompute == "full":
            rec = fwd + tp_f + cp_f + ep_f
            rec_work = fwd + tp_work + cp_work_f + ep_work
        act = bc.activation(p.recompute, *args)
        full_act = bc.act_none(*args) if p.recompute == "full" else 0.0
        per_kind.append(dict(
            F=fwd + tp_f + cp_f + ep_f, B=bwd + tp_b + cp_b + ep_b + rec,
            work_f=fwd + tp_work + cp_work_f + ep_work,
            work_b=bwd + tp_work_b + cp_work_b + ep_work + rec_work,
            work=fwd + bwd + tp_work + tp_work_b + cp_work_f + cp_work_b + 2 * ep_work + rec_work,
            comm_f=tp_f + cp_f + ep_f, comm_b=tp_b + cp_b + ep_b + (rec and tp_f + cp_f + ep_f
                                                                    if p.recompute == "full"
                                                                    else 0.0),
            tp=(tp_f + tp_b + (tp_f if p.recompute == "full" else 0.0)),
            cp=cp_f + cp_b + (cp_f if p.recompute == "full" else 0.0),
            ep=ep_f + ep_b + (ep_f if p.recompute == "full" else 0.0),
            act=act, full_act=full_act, flops=bc.flops_fwd(*args),
            attn_flops=4 * mbs * seq * seq * shape.hidden / (p.tp * p.cp)))
    dense = per_kind[0]
    moe_k = per_kind[1] if len(per_kind) > 1 else per_kind[0]

    vocab_split = p.tp if vocab_parallel else 1  # ways the embedding and LM head are split
    emb_f, emb_b = embedding_time(shape, hw, vocab_split, p.cp, mbs, p.sp)
    head_f, head_b = head_time(shape, hw, vocab_split, p.cp, mbs, p.sp)
    T = mbs * seq / p.cp
    # a vocab-parallel embedding sums the rank that holds each id; a whole one needs no sum
    vocab_ar = collective_parts("all_reduce", hw.elem_bytes * T * shape.hidden, groups["tp"],
                                hw) if vocab_parallel else CollectiveCost(0.0, 0.0)
    emb_work_f, emb_work_b = emb_f + vocab_ar.transfer, emb_b + (0.0 if p.sp else
                                                                  vocab_ar.transfer)
    emb_work = emb_work_f + emb_work_b
    if p.sp and p.tp > 1 and runtime == "partitioner":
        # the last norm's weight (and bias) gradients summed over tp; the head's input gathered
        # over the sequence (its backward keeps this rank's slice, or reduce-scatters the
        # gradient of a vocab-parallel head)
        final = collective_parts("all_reduce", 4 * shape.hidden, groups["tp"], hw)
        n_final = 2 if shape.norm == "layernorm" and shape.bias else 1
        gather = collective_parts("all_gather", hw.elem_bytes * T * shape.hidden, groups["tp"],
                                  hw)
        back = collective_parts("reduce_scatter", hw.elem_bytes * T * shape.hidden,
                                groups["tp"], hw) if vocab_parallel else CollectiveCost(0.0, 0.0)
        head_f += gather.seconds
        head_b += n_final * final.seconds + back.seconds
        head_work_f = head_f - gather.latency
        head_work_b = head_b - n_final * final.latency - back.latency
    else:
        head_work_f, head_work_b = head_f, head_b
    head_work = head_work_f + head_work_b
    emb_f += vocab_ar.seconds  # vocab-parallel embedding output
    emb_b += vocab_ar.seconds if not p.sp else 0.0

    # pipeline p2p: activations (scattered over tp, as Megatron's scatter-gather) each way
    p2p_one = collective_parts("send", hw.elem_bytes * T * shape.hidden / p.tp, groups["pp"],
                               hw) if pp > 1 else CollectiveCost(0.0, 0.0)
    p2p_per_mb = 2 * v * p2p_one.seconds * (1 - hw.p2p_overlap)
    p2p_work_per_mb = 2 * v * p2p_one.transfer  # overlapped or not, the bytes are copied

    # --- per-rank microbatch time and memory --------------------------------------------------
    params_dense = shape.dense_block_params() / p.tp
    params_moe = shape.moe_block_params() / p.tp + shape.expert_params() / (p.ep * p.expert_tp)
    emb_params = shape.embedding_params() / vocab_split
    head_params = shape.head_params() / vocab_split + (
        shape.vocab * shape.hidden / vocab_split if shape.tie_embeddings and pp > 1 else 0.0)
    dense_shards = dp * p.cp
    edp = p.tp * p.cp * dp // (p.ep * p.expert_tp)

    emb_sync = CollectiveCost(0.0, 0.0)
    if pp > 1 and shape.tie_embeddings:
        pair = GroupPlacement(2, 1 if not groups["pp"].intra_node else 2)
        emb_sync = collective_parts("all_reduce", 4 * shape.vocab * shape.hidden / vocab_split,
                                    pair, hw)

    ranks = mem.distinct_ranks(shape.layers, shape.dense_layers, bool(shape.experts), pp, v)
    times: dict[int, tuple[float, float]] = {}
    work: dict[int, float] = {}
    phases: dict[int, dict[str, Phases]] = {}  # per microbatch and tail, for shared cores
    mems: dict[int, mem.MemoryBreakdown] = {}
    comm_mb: dict[int, dict] = {}
    opt_time = 0.0
    dp_exposed = 0.0
    # the loss of the step summed over pp and dp: a few bytes, every rank waits on it
    loss_sync = CollectiveCost(0.0, 0.0)
    if runtime == "partitioner":
        for dim in ("pp", "dp"):
            part = collective_parts("all_reduce", 24, groups[dim], hw)
            loss_sync = CollectiveCost(loss_sync.latency + part.latency,
                                       loss_sync.transfer + part.transfer)
    for r, nd, nm in ranks:
        p_dense = nd * params_dense + (emb_params if r == 0 else 0.0) + (
            head_params if r == pp - 1 else 0.0)
        p_exp = nm * params_moe
        p_local = p_dense + p_exp
        F = nd * dense["F"] + nm * moe_k["F"]
        B = nd * dense["B"] + nm * moe_k["B"]
        work_mb = nd * dense["work"] + nm * moe_k["work"]
        work_f = nd * dense["work_f"] + nm * moe_k["work_f"]
        work_b = nd * dense["work_b"] + nm * moe_k["work_b"]
        if r == 0:
            F, B = F + emb_f, B + emb_b
            work_mb += emb_work
            work_f, work_b = work_f + emb_work_f, work_b + emb_work_b
        if r == pp - 1:
            F, B = F + head_f, B + head_b
            work_mb += head_work
            work_f, work_b = work_f + head_work_f, work_b + head_work_b
        if runtime == "partitioner" and m > 1:
            # microbatches 2..m add their weight gradients into .grad: read both, write one
            accumulate = hw.memory_time(3 * hw.elem_bytes * p_local) * (m - 1) / m
            B, work_b, work_mb = B + accumulate, work_b + accumulate, work_mb + accumulate
        # per microbatch: p2p latencies are the schedule's hops, not the rank's waits (a ring
        # hidden behind attention can leave less exposed than its transfer: no wait then)
        phases[r] = {"F": Phases(work_f + v * p2p_one.transfer, max(0.0, F - work_f)),
                     "B": Phases(work_b + v * p2p_one.transfer, max(0.0, B - work_b))}
        if pp > 1:
            F, B = F + p2p_per_mb / 2, B + p2p_per_mb / 2
            work_mb += p2p_work_per_mb
        times[r] = (F, B)
        comm_mb[r] = {k: nd * dense[k] + nm * moe_k[k] for k in ("tp", "cp", "ep")}
        comm_mb[r]["pp"] = p2p_per_mb

        weights = mem.PARAM_BYTES * p_local
        grads = mem.GRAD_BYTES * p_local
        optim = mem.ADAM_BYTES * (p_dense / (dense_shards if p.zero else 1) +
                                  p_exp / (edp if p.zero else 1))
        flight = mem.in_flight(p.schedule, r, pp, m, v)
        act = flight * (nd * dense["act"] + nm * moe_k["act"])
        temp = max(dense["full_act"], moe_k["full_act"])
        temp += 2 * 2 * T * shape.hidden  # gathered sequence-parallel input, its gradient
        if r == pp - 1:
            temp += T * shape.vocab / vocab_split * (2 + 4 + 4)  # logits, fp32 softmax, grad
        if r == 0 and pp > 1:
            act += flight * 2 * T * shape.hidden / (p.tp if p.sp else 1)
        mems[r] = mem.MemoryBreakdown(r, weights, grads, optim, act, temp, hw.reserved_bytes)

        # optimizer (fused AdamW reads grad, master, m, v and writes master, m, v, param) plus
        # grad-norm read and zeroing, over this rank's shard
        shard = p_dense / (dense_shards if p.zero else 1) + p_exp / (edp if p.zero else 1)
        opt_r = hw.memory_time(30 * shard + 8 * p_local, kernels=4) if include_optimizer else 0.0
        opt_time = max(opt_time, opt_r)
        # data-parallel gradient sync, overlapped with the last microbatch's backward
        if p.zero:
            sync = (collective_parts("reduce_scatter", 4 * p_dense, groups["dpcp"], hw),
                    collective_parts("all_gather", hw.elem_bytes * p_dense, groups["dpcp"], hw),
                    collective_parts("reduce_scatter", 4 * p_exp, groups["edp"], hw),
                    collective_parts("all_gather", hw.elem_bytes * p_exp, groups["edp"], hw))
        else:
            sync = (collective_parts("all_reduce", 4 * p_dense, groups["dpcp"], hw),
                    collective_parts("all_reduce", 4 * p_exp, groups["edp"], hw))
        sync_s = sum(c.seconds for c in sync)
        buckets = max(1, nd + nm)
        dp_exposed = max(dp_exposed, max(sync_s / buckets, sync_s - B))
        ends = r in (0, pp - 1)
        work[r] = (m * work_mb + sum(c.transfer for c in sync) + opt_r +
                   (emb_sync.transfer if ends else 0.0) + loss_sync.transfer)
        # the tail: the sync's bytes compete for the cores (no core is idle to hide them
        # behind backward), the latency of the buckets before the last is hidden
        phases[r]["S"] = Phases(
            sum(c.transfer for c in sync) + opt_r + (emb_sync.transfer if ends else 0.0) +
            loss_sync.transfer,
            sum(c.latency for c in sync) / buckets + (emb_sync.latency if ends else 0.0) +
            loss_sync.latency)

    x = {r: f + b_ for r, (f, b_) in times.items()}
    full_times = mem.stage_layers(shape.layers, shape.dense_layers, bool(shape.experts), pp, v)
    # every rank's time, from the computed rank with the same layer mix
    mix_time = {}
    for r, nd, nm in ranks:
        if 0 < r < pp - 1:
            mix_time.setdefault((nd, nm), x[r])
    all_x = [x.get(r, mix_time.get(mix, 0.0)) for r, mix in enumerate(full_times)]
    xmax, xsum = max(all_x), sum(all_x)
    pipeline = m * xmax + (xsum - xmax) / v
    ideal = m * xsum / pp
    slowest = max(x, key=x.get)

    critical_path = pipeline + dp_exposed + emb_sync.seconds + opt_time + loss_sync.seconds
    stage_work = [_by_mix(work, ranks, full_times, r) for r in range(pp)]
    shared = 0.0
    if ranks_per_core(cluster) > 1.0:
        stage_phases = [_by_mix(phases, ranks, full_times, r) for r in range(pp)]
        shared = max(shared_core_step(stage_phases, p, cluster, p2p_one.latency),
                     shared_core_seconds(stage_work, p, cluster))
    step = max(critical_path, shared)
    # a pipeline bubble is idle time only while the cores are not the bottleneck: on shared
    # cores the other ranks run in it
    bubble = max(0.0, pipeline - ideal) if critical_path >= shared else 0.0

    comm = {k: m * comm_mb[slowest][k] for k in ("tp", "cp", "ep", "pp")}
    comm["dp"] = dp_exposed
    comm["embedding"] = emb_sync.seconds

    tokens = global_batch * seq
    model_flops = shape.model_flops_per_token(seq) * tokens
    if p.recompute == "full":
        extra = model_flops / 3
    elif p.recompute == "selective" and shape.attention == "unfused":
        extra = 4 * shape.layers * global_batch * seq * seq * shape.hidden
    else:
        extra = 0.0
    worst = max(mems.values(), key=lambda mb: mb.total)
    stage_mem = tuple(_by_mix(mems, ranks, full_times, r).total for r in range(pp))
    return Estimate(
        plan=p, world_size=world, global_batch=global_batch, seq=seq, micro_batch_size=mbs,
        step_time_s=step, pipeline_s=pipeline, bubble_s=bubble,
        dp_exposed_s=dp_exposed, optimizer_s=opt_time, comm_s=comm,
        stage_fwd_s=tuple(_by_mix(times, ranks, full_times, r)[0] for r in range(pp)),
        stage_bwd_s=tuple(_by_mix(times, ranks, full_times, r)[1] for r in range(pp)),
        stage_memory=stage_mem, memory=worst, device_memory_bytes=hw.memory_bytes,
        model_flops=model_flops, hardware_flops=model_flops + extra, peak_flops=hw.peak_flops,
        critical_path_s=critical_path, shared_cores_s=shared, stage_work_s=tuple(stage_work))


def sp_param_reads(shape: TransformerShape) -> int:
    """Parameters a block reads in the sequence zone that broadcast over the tokens: each norm's
    weight (and bias), and the bias a row-parallel linear adds after its reduce-scatter."""
    per_norm = 2 if shape.norm == "layernorm" and shape.bias else 1
    return 2 * per_norm + (2 if shape.bias else 0)


def _tp_pair(p: Plan, nbytes: float, group: GroupPlacement, hw) -> CollectiveCost:
    """One tensor-parallel f/g collective: an all-reduce, or with sequence parallelism its
    all-gather + reduce-scatter halves (the same ring traffic on NCCL; not on gloo)."""
    if p.tp == 1:
        return CollectiveCost(0.0, 0.0)
    if not p.sp:
        return collective_parts("all_reduce", nbytes, group, hw)
    gather = collective_parts("all_gather", nbytes, group, hw)
    scatter = collective_parts("reduce_scatter", nbytes, group, hw)
    return CollectiveCost(gather.latency + scatter.latency, gather.transfer + scatter.transfer)


def ranks_per_core(cluster: Cluster) -> float:
    """Ranks each core of a node runs: above 1 only on hosts whose ranks share cores."""
    cores = cluster.hardware.cores
    if cores is None:
        return 1.0
    return min(cluster.num_gpus, cluster.gpus_per_node) / cores


def node_load(p: Plan, cluster: Cluster) -> list[list[int]]:
    """load[n][r]: how many ranks of pipeline rank r node n runs, from the rank layout."""
    stride = RankLayout.dense(p).stride("pp")  # rank g is on pipeline rank (g // stride) % pp
    per_node = min(cluster.num_gpus, cluster.gpus_per_node)
    load = [[0] * p.pp for _ in range(-(-cluster.num_gpus // per_node))]
    for g in range(cluster.num_gpus):
        load[g // per_node][(g // stride) % p.pp] += 1
    return load


def shared_core_step(stage_phases: list[dict], p: Plan, cluster: Cluster,
                     hop_latency: float) -> float:
    """The step of ranks sharing a node's cores: the schedule simulated on them (shared_cores.py)
    with each pipeline rank's per-microbatch forward and backward and its tail ("F", "B", "S"
    Phases, all its virtual stages together)."""
    v = p.vpp
    orders = [acts + [Action("S", 0, r)]
              for r, acts in enumerate(schedule(p.schedule, p.pp, p.microbatches, v))]

    def cost(action: Action) -> Phases:
        ph = stage_phases[action.stage % p.pp][action.kind]
        return ph if action.kind == "S" else Phases(ph.work / v, ph.wait / v)

    return simulate(orders, cost, hop_latency, node_load(p, cluster),
                    cluster.hardware.cores)


def shared_core_seconds(stage_work: list[float], p: Plan, cluster: Cluster) -> float:
    """Seconds the busiest node's cores need for its ranks' work, when ranks outnumber cores
    (0.0 otherwise): a lower bound of the step (Brent's), which shared_core_step reaches when
    no core ever idles."""
    if ranks_per_core(cluster) <= 1.0:
        return 0.0
    return max(sum(n * w for n, w in zip(node, stage_work, strict=True))
               for node in node_load(p, cluster)) / cluster.hardware.cores


def _by_mix(values: dict, ranks, per_rank, r: int):
    """The value computed for rank r, or for the computed rank with the same layer mix."""
    if r in values:
        return values[r]
    for q, nd, nm in ranks:
        if (nd, nm) == per_rank[r] and 0 < q < len(per_rank) - 1:
            return values[q]
    return values[min(values, key=lambda q: abs(q - r))]
