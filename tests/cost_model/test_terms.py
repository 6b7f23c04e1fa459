"""The time terms per strategy (cost_model/terms/), each against its closed form."""

import pytest

from core.plan import Plan
from cost_model import comm
from cost_model.hardware import Cluster, Hardware
from cost_model.layer_costs import block_costs
from cost_model.shapes import TransformerShape
from cost_model.terms import cp, dp, ep, pp, tp
from cost_model.traits import CommTerm, Groups, Traits

SHAPE = TransformerShape(layers=4, hidden=256, heads=8, vocab=2048, seq=128)
MOE = TransformerShape(layers=4, hidden=256, heads=8, vocab=2048, seq=128, experts=4, topk=2)
FAST = 1e30
HW = Hardware(name="test", peak_flops=50e9, memory_bytes=64e9, hbm_bw=FAST, intra_bw=1e9,
              inter_bw=1e8, gemm_eff=1.0, gemm_half=0.0, mem_eff=1.0, intra_eff=1.0,
              inter_eff=1.0, intra_latency=1e-4, inter_latency=1e-3, kernel_latency=0.0,
              reserved_bytes=0.0, elem_bytes=4)


def traits(plan: Plan, shape=SHAPE, runtime="megatron", mbs=2, gpus_per_node=8) -> Traits:
    world = plan.tp * plan.cp * plan.pp * (plan.dp or 1)
    plan = plan.resolve(world)
    cluster = Cluster(hardware=HW, num_gpus=world, gpus_per_node=gpus_per_node)
    return Traits(shape=shape, hw=HW, plan=plan, mbs=mbs, groups=Groups.of(plan, cluster),
                  runtime=runtime, vocab_parallel=True)


def test_groups_follow_the_rank_layout():
    groups = traits(Plan(tp=4, dp=4), gpus_per_node=4).groups
    assert groups.tp == comm.GroupPlacement(4, 4)  # tp fastest: one node
    assert groups.dp == comm.GroupPlacement(4, 1)  # dp strides over tp: a node each
    assert groups.dpcp == groups.dp


def test_tensor_parallel_block_is_two_all_reduces_each_way():
    tr = traits(Plan(tp=4))
    bc = block_costs(SHAPE, HW)
    ar = comm.collective_parts("all_reduce", bc.tp_bytes(*tr.args), tr.groups.tp, HW)
    assert tp.block(tr, bc) == pytest.approx(
        (2 * ar.seconds, 2 * ar.seconds, 2 * ar.transfer, 2 * ar.transfer))
    assert tp.block(traits(Plan()), bc) == CommTerm()


def test_partitioner_sequence_parallelism_regathers_in_backward():
    tr = traits(Plan(tp=4, sp=True), runtime="partitioner")
    bc = block_costs(SHAPE, HW)
    msg = bc.tp_bytes(*tr.args)
    megatron = tp.block(traits(Plan(tp=4, sp=True)), bc)
    regather = comm.collective_parts("all_gather", msg, tr.groups.tp, HW)
    small = comm.collective_parts("all_reduce", 4 * SHAPE.hidden, tr.groups.tp, HW)
    ours = tp.block(tr, bc)
    assert ours.fwd == megatron.fwd
    assert ours.bwd - megatron.bwd == pytest.approx(
        2 * regather.seconds + tp.sp_param_reads(SHAPE) * small.seconds)


def test_ring_context_parallelism_hides_behind_attention():
    bc = block_costs(SHAPE, HW)
    tr = traits(Plan(cp=4))
    hop = comm.collective_parts("send", bc.cp_bytes(*tr.args), tr.groups.cp, HW)
    attention = bc.attention_fwd(*tr.args)
    term = cp.block(tr, bc)
    assert term.fwd == pytest.approx(max(0.0, 3 * hop.seconds - attention))
    assert term.work_bwd == pytest.approx(2 * 3 * hop.transfer)
    assert cp.block(traits(Plan()), bc) == CommTerm()


def test_expert_all_to_alls_only_on_moe_blocks():
    tr = traits(Plan(ep=4, dp=4), shape=MOE)
    bc = block_costs(MOE, HW, True)
    a2a = comm.collective_parts("all_to_all", bc.ep_bytes(*tr.args), tr.groups.ep, HW)
    assert ep.block(tr, bc, moe=True) == pytest.approx(
        (2 * a2a.seconds, 2 * a2a.seconds, 2 * a2a.transfer, 2 * a2a.transfer))
    assert ep.block(tr, bc, moe=False) == CommTerm()


def test_expert_dispatch_beside_cp_sends_this_ranks_share_and_gathers_over_cp():
    """Under cp each rank dispatches 1/cp of the (gathered) sequence; this package's runtime
    also gathers the block's tokens and the returned rows whole over cp: two (B, S, h)
    all-gathers forward, two reduce-scatters backward. Megatron-Core routes the local shard."""
    plan = Plan(cp=2, ep=2, dp=2)
    bc = block_costs(MOE, HW, True)
    mbs = 2
    megatron = traits(plan, shape=MOE, mbs=mbs)
    k, h = MOE.topk, MOE.hidden
    share = HW.elem_bytes * mbs * MOE.seq / 2 * k * h  # this cp rank's tokens, top-k copies
    assert bc.ep_bytes(*megatron.args) == pytest.approx(share)
    a2a = comm.collective_parts("all_to_all", share, megatron.groups.ep, HW)
    assert ep.block(megatron, bc, moe=True) == pytest.approx(
        CommTerm(2 * a2a.seconds, 2 * a2a.seconds, 2 * a2a.transfer, 2 * a2a.transfer))
    ours = traits(plan, shape=MOE, mbs=mbs, runtime="partitioner")
    whole = HW.elem_bytes * mbs * MOE.seq * h
    gather = comm.collective_parts("all_gather", whole, ours.groups.cp, HW)
    scatter = comm.collective_parts("reduce_scatter", whole, ours.groups.cp, HW)
    assert ep.block(ours, bc, moe=True) == pytest.approx(CommTerm(
        2 * a2a.seconds + 2 * gather.seconds, 2 * a2a.seconds + 2 * scatter.seconds,
        2 * a2a.transfer + 2 * gather.transfer, 2 * a2a.transfer + 2 * scatter.transfer))
    assert ep.block(traits(Plan(ep=2, dp=2), shape=MOE, mbs=mbs, runtime="partitioner"), bc,
                    moe=True).fwd == pytest.approx(2 * comm.collective_parts(
                        "all_to_all", 2 * share, traits(Plan(ep=2, dp=2), shape=MOE).groups.ep,
                        HW).seconds)  # cp=1: the whole sequence's tokens, no gathers


def test_pipeline_span_is_the_published_formula():
    # equal stages: (m + p - 1) x for 1F1B; the interleaved bubble shrinks by v
    assert pp.span([1.0] * 4, 8, 1) == pytest.approx((8 + 4 - 1) * 1.0)
    assert pp.span([1.0] * 4, 8, 2) == pytest.approx(8 * (1 + 3 / (2 * 8)))
    assert pp.hop(traits(Plan())) == (0.0, 0.0)
    assert pp.tied_embedding_sync(traits(Plan())) == (0.0, 0.0)


def test_data_parallel_sync_and_the_loss_sum():
    tr = traits(Plan(dp=4))
    ar = comm.collective_parts("all_reduce", 4 * 1e6, tr.groups.dpcp, HW)
    assert dp.gradient_sync(tr, 1e6, 0.0)[0] == ar
    zero = traits(Plan(dp=4, zero=1))
    scatter, gather = dp.gradient_sync(zero, 1e6, 0.0)[:2]
    assert scatter == comm.collective_parts("reduce_scatter", 4e6, zero.groups.dpcp, HW)
    assert gather == comm.collective_parts("all_gather", 4 * 1e6, zero.groups.dpcp, HW)
    assert dp.exposed(4.0, 4, 10.0) == 1.0 and dp.exposed(4.0, 4, 2.0) == 2.0
    assert dp.loss_sum(tr) == (0.0, 0.0)  # Megatron-Core sums no loss over dp
    ours = dp.loss_sum(traits(Plan(dp=4), runtime="partitioner"))
    assert ours == comm.collective_parts("all_reduce", 24, tr.groups.dp, HW)


def test_async_tp_hides_each_collective_behind_the_gemm_beside_it():
    """Each all-gather / reduce-scatter of sp runs as tp ring steps under its GEMM: of its
    transfer X beside G seconds of GEMM, max(0, X - G) + min(X, G) / tp shows; latencies stay."""
    assert comm.overlapped_transfer(comm.CollectiveCost(0.5, 2.0), 3.0, 4) == 0.5  # 2/4
    assert comm.overlapped_transfer(comm.CollectiveCost(0.5, 3.0), 1.0, 4) == 2.25  # 2 + 1/4
    bc = block_costs(SHAPE, HW)
    plain, tr = traits(Plan(tp=4, sp=True)), traits(Plan(tp=4, sp=True, async_tp=True))
    msg = bc.tp_bytes(*tr.args)
    gather = comm.collective_parts("all_gather", msg, tr.groups.tp, HW)
    scatter = comm.collective_parts("reduce_scatter", msg, tr.groups.tp, HW)
    attn_in, attn_out, mlp_in, mlp_out = (w(*tr.args) for w in bc.tp_windows)
    assert attn_in == pytest.approx(HW.gemm_time(2 * 128, 3 * 256 / 4, 256))  # qkv, b=2

    def shown(cost, window):
        return cost.latency + max(0.0, cost.transfer - window) + min(cost.transfer, window) / 4

    term = tp.block(tr, bc)
    assert term.fwd == pytest.approx(shown(gather, attn_in) + shown(scatter, attn_out) +
                                     shown(gather, mlp_in) + shown(scatter, mlp_out))
    assert term.bwd == pytest.approx(shown(gather, attn_out) + shown(scatter, attn_in) +
                                     shown(gather, mlp_out) + shown(scatter, mlp_in))
    # the same bytes cross the wire: the work (a shared core's copies) does not shrink
    assert term.work_fwd == pytest.approx(tp.block(plain, bc).work_fwd)
    assert term.fwd < tp.block(plain, bc).fwd and term.bwd < tp.block(plain, bc).bwd
    # an MoE block's experts run after the dispatch: its MLP pair has no GEMM beside it
    assert block_costs(MOE, HW, True).tp_windows[2](*tr.args) == 0.0


def test_all_gather_context_parallelism_is_exposed():
    """Llama 3's CP: every rank's k and v gathered before attention and their gradients
    reduce-scattered after it, on the critical path (no ring to hide behind attention)."""
    tr = traits(Plan(cp=4, cp_algo="allgather"), mbs=1)
    bc = block_costs(SHAPE, HW)
    kv = 4 * bc.cp_bytes(*tr.args)
    gather = comm.collective_parts("all_gather", kv, tr.groups.cp, HW)
    scatter = comm.collective_parts("reduce_scatter", kv, tr.groups.cp, HW)
    assert cp.block(tr, bc) == pytest.approx(
        (gather.seconds, scatter.seconds, gather.transfer, scatter.transfer))
    assert cp.block(tr, bc).fwd > cp.block(traits(Plan(cp=4), mbs=1), bc).fwd


def test_gradients_cross_the_wire_in_the_reduction_dtype():
    tr = traits(Plan(dp=4, param_dtype="bf16", reduce_dtype="bf16"))
    assert dp.gradient_sync(tr, 1e6, 0.0)[0] == comm.collective_parts(
        "all_reduce", 2e6, tr.groups.dpcp, HW)


def test_megatron_syncs_hide_behind_every_virtual_stage_and_the_first_forward():
    """Megatron-Core reduces a virtual stage's gradients once its last microbatch is done, while
    the other v-1 stages still run min(p, m) microbatches each, and gathers ZeRO-1's parameters
    behind the next step's forward; this package's runtime syncs after the last backward."""
    inter = Plan(pp=4, dp=2, schedule="interleaved-1f1b", vpp=2, microbatches=8, zero=1)
    tr = traits(inter)
    assert dp.overlap_window(tr, 2.0) == pytest.approx(1.0 * (1 + 1 * 4))
    assert dp.overlap_window(traits(inter, runtime="partitioner"), 2.0) == 2.0
    assert dp.overlap_window(traits(Plan(pp=4, dp=2, microbatches=8)), 2.0) == 2.0
    sync = (comm.CollectiveCost(0.0, 8.0), comm.CollectiveCost(0.0, 6.0))  # reduce, gather
    # the reductions behind the backward's 5 s window, the gather behind the forward's 3.75 s
    assert dp.exposed_sync(tr, sync, 4, 1.5, 2.0) == pytest.approx((8 - 5) + (6 - 3.75))
    ours = traits(inter, runtime="partitioner")
    assert dp.exposed_sync(ours, sync, 4, 1.5, 2.0) == pytest.approx(14.0 - 2.0)
