"""Closed-form checks of the cost model where ranks share CPU cores, of the collective split into
latency and transfer, of library-specific collectives (gloo) and of the element size."""

import dataclasses
import os

import pytest

from core.plan import Plan
from cost_model import comm
from cost_model.hardware import PROFILES, Cluster, Hardware, available_cores, local_cpu
from cost_model.layer_costs import block_costs, embedding_time, head_time
from cost_model.shapes import TransformerShape
from cost_model.shared_cores import ranks_per_core, shared_core_seconds
from cost_model.step_time import estimate

SHAPE = TransformerShape(layers=4, hidden=256, heads=8, vocab=2048, seq=128)
FAST = 1e30  # a rate so high that what it bounds costs nothing


def cpu(**kw) -> Hardware:
    """A CPU-like profile: every term off unless a test switches it on."""
    base = dict(name="test-cpu", peak_flops=50e9, memory_bytes=64e9, hbm_bw=FAST,
                intra_bw=FAST, inter_bw=FAST, gemm_eff=1.0, gemm_half=0.0, mem_eff=1.0,
                intra_eff=1.0, inter_eff=1.0, intra_latency=0.0, inter_latency=0.0,
                kernel_latency=0.0, reserved_bytes=0.0, elem_bytes=4)
    return Hardware(**{**base, **kw})


def on_one_host(hw: Hardware, ranks: int = 4) -> Cluster:
    return Cluster(hardware=hw, num_gpus=ranks, gpus_per_node=ranks)


def test_collective_splits_into_latency_and_transfer():
    hw = cpu(intra_bw=1e9, intra_latency=1e-4)
    group = comm.GroupPlacement(4, 4)
    S = 1e6
    ar = comm.collective_parts("all_reduce", S, group, hw)
    assert ar.latency == pytest.approx(2 * 3 * 1e-4)  # 2(n-1) ring steps
    assert ar.transfer == pytest.approx(S / 1e9 * 2 * 3 / 4)
    assert comm.collective_time("all_reduce", S, group, hw) == pytest.approx(ar.seconds)
    send = comm.collective_parts("send", S, group, hw)
    assert (send.latency, send.transfer) == pytest.approx((1e-4, S / 1e9))


def test_gloo_reduce_scatter_costs_an_all_reduce_and_all_gather_its_own_bandwidth():
    group = comm.GroupPlacement(4, 4)
    S = 1e6
    ring = cpu(intra_bw=1e9, intra_latency=1e-4)
    gloo = dataclasses.replace(ring, reduce_scatter_is_all_reduce=True, all_gather_eff=0.5)
    rs = comm.collective_parts("reduce_scatter", S, group, ring)
    assert (rs.latency, rs.transfer) == pytest.approx((3e-4, S / 1e9 * 3 / 4))
    assert comm.collective_parts("reduce_scatter", S, group, gloo) == \
        comm.collective_parts("all_reduce", S, group, gloo)
    ag = comm.collective_parts("all_gather", S, group, gloo)
    assert (ag.latency, ag.transfer) == pytest.approx((3e-4, S / 0.5e9 * 3 / 4))


def test_sequence_parallel_pair_costs_what_its_collectives_cost():
    # one tp f/g pair is an all-reduce, or all-gather + reduce-scatter with sp: the same time
    # on NCCL's rings, an all-reduce plus a slow all-gather on gloo
    plans = Plan(tp=2, dp=2), Plan(tp=2, dp=2, sp=True)
    msg = 4 * 8 * SHAPE.seq * SHAPE.hidden  # float32 [microbatch 16 / dp, seq, hidden]
    group = comm.GroupPlacement(2, 2)
    for hw, sp_over_plain in (
            (cpu(intra_bw=1e9, intra_latency=1e-4), 1.0),
            (cpu(intra_bw=1e9, intra_latency=1e-4, reduce_scatter_is_all_reduce=True,
                 all_gather_eff=0.5), None)):
        plain, seq_par = (estimate(SHAPE, p, on_one_host(hw), 16).comm_s["tp"] for p in plans)
        ar = comm.collective_time("all_reduce", msg, group, hw)
        assert plain == pytest.approx(SHAPE.layers * 4 * ar)  # 2 pairs forward, 2 backward
        expected = sp_over_plain or (ar + comm.collective_time("all_gather", msg, group, hw)) / ar
        assert seq_par / plain == pytest.approx(expected)


def test_element_size_scales_messages_and_memory_traffic():
    memory_bound = cpu(peak_flops=FAST, hbm_bw=1e10)  # every op is its bytes over 10 GB/s
    two, four = (block_costs(SHAPE, dataclasses.replace(memory_bound, elem_bytes=e))
                 for e in (2, 4))
    args = (1, 1, 2, 0, 1, 1)  # t, c, b, sp, e, et
    assert two.tp_bytes(*args) == 2 * 2 * SHAPE.seq * SHAPE.hidden
    assert four.tp_bytes(*args) == 4 * 2 * SHAPE.seq * SHAPE.hidden
    assert four.fwd(*args) == pytest.approx(2 * two.fwd(*args), rel=1e-12)
    assert four.bwd(*args) == pytest.approx(2 * two.bwd(*args), rel=1e-12)


def test_ranks_per_core():
    assert ranks_per_core(on_one_host(cpu(cores=2), 4)) == 2.0
    assert ranks_per_core(on_one_host(cpu(cores=8), 4)) == 0.5
    assert ranks_per_core(on_one_host(cpu(cores=None), 4)) == 1.0
    # a GPU is a device per rank: no profile shares one
    assert all(hw.cores is None for hw in PROFILES.values())


def test_shared_cores_follow_the_rank_layout():
    hw = cpu(cores=2)
    cluster = Cluster(hardware=hw, num_gpus=8, gpus_per_node=4)
    stage_work = [1.0, 3.0]
    # pp slowest (default order): ranks 0-3 are stage 0, ranks 4-7 stage 1, a node each
    assert shared_core_seconds(stage_work, Plan(pp=2, dp=4), cluster) == \
        pytest.approx(4 * 3.0 / 2)
    # pp fastest: every node holds two ranks of each stage
    mixed = Plan(pp=2, dp=4, order="pp-tp-cp-ep-dp")
    assert shared_core_seconds(stage_work, mixed, cluster) == \
        pytest.approx((2 * 1.0 + 2 * 3.0) / 2)
    assert shared_core_seconds(stage_work, Plan(pp=2, dp=4),
                               Cluster(dataclasses.replace(hw, cores=4), 8, 4)) == 0.0


def test_data_parallel_ranks_on_half_the_cores_take_twice_as_long():
    plan = Plan(dp=4)
    own = estimate(SHAPE, plan, on_one_host(cpu(cores=None)), 16, include_optimizer=False)
    shared = estimate(SHAPE, plan, on_one_host(cpu(cores=2)), 16, include_optimizer=False)
    enough = estimate(SHAPE, plan, on_one_host(cpu(cores=4)), 16, include_optimizer=False)
    assert shared.step_time_s == pytest.approx(2 * own.step_time_s, rel=1e-12)
    assert shared.shared_cores_s == pytest.approx(4 * own.step_time_s / 2, rel=1e-12)
    assert enough.step_time_s == own.step_time_s and enough.shared_cores_s == 0.0


def test_shared_cores_fill_pipeline_bubbles():
    m = 8
    plan = Plan(pp=4, microbatches=m)
    own = estimate(SHAPE, plan, on_one_host(cpu(cores=None)), 16, include_optimizer=False)
    shared = estimate(SHAPE, plan, on_one_host(cpu(cores=2)), 16, include_optimizer=False)
    x = [f + b for f, b in zip(own.stage_fwd_s, own.stage_bwd_s, strict=True)]
    # (m + p - 1) x on own cores; m * sum(x) of work on 2 cores
    assert own.step_time_s == pytest.approx(m * max(x) + sum(x) - max(x))
    work = m * sum(x) / 2
    # m sum(x) / 2 > (m - 1) max(x) + sum(x) here: the cores, not the bubble, bound the step,
    # and another rank runs on the core while one waits in its bubble ...
    assert work > own.step_time_s and shared.bubble_s == 0.0
    # ... except while the pipeline fills and drains, when fewer ranks than cores have work
    assert work < shared.step_time_s < work + own.bubble_s
    assert shared.shared_cores_s == shared.step_time_s > shared.critical_path_s


def test_collective_latency_every_rank_waits_on_adds_to_the_work():
    # no compute at all: the step is the gradient all-reduce of 4 bytes per parameter
    hw = cpu(peak_flops=FAST, intra_bw=1e9, intra_latency=1e-3, cores=2)
    est = estimate(SHAPE, Plan(dp=4), on_one_host(hw), 16, include_optimizer=False)
    ar = comm.collective_parts("all_reduce", 4 * SHAPE.num_parameters(),
                               comm.GroupPlacement(4, 4), hw)
    assert est.critical_path_s == pytest.approx(ar.seconds)  # nothing to overlap it with
    # its bytes are work for the 2 cores; the latency of the last of its per-layer buckets is
    # waited by every rank at once (the others overlap backward)
    assert est.shared_cores_s == pytest.approx(4 * ar.transfer / 2 + ar.latency / SHAPE.layers)
    assert est.step_time_s == pytest.approx(est.shared_cores_s)


def test_tensor_parallel_latencies_in_lockstep_add_to_the_shared_work():
    # tp=2 x dp=2 on 2 cores, collectives of latency only: the four ranks wait on their
    # all-reduces together, so the step is the work twice over plus every wait
    hw = cpu(intra_latency=1e-3, cores=2)
    plan = Plan(tp=2, dp=2)
    alone = estimate(SHAPE, plan, on_one_host(cpu()), 16, include_optimizer=False,
                     vocab_parallel=False)  # no latencies: the compute
    shared = estimate(SHAPE, plan, on_one_host(hw), 16, include_optimizer=False,
                      vocab_parallel=False)
    ar = 2 * 1e-3  # all-reduce over 2 ranks: 2 (n - 1) steps of alpha
    tp_waits = SHAPE.layers * 4 * ar  # 2 pairs forward, 2 backward
    assert shared.comm_s["tp"] == pytest.approx(tp_waits)
    assert shared.step_time_s == pytest.approx(
        4 * alone.step_time_s / 2 + tp_waits + ar / SHAPE.layers, rel=1e-12)


def test_optimizer_is_left_out_on_request():
    from cost_model.hardware import parse_cluster

    cluster = parse_cluster("8xA100-80G")
    shape = TransformerShape.megatron_gpt(layers=8, hidden=2048, heads=16)
    plan = Plan(tp=2, pp=2, microbatches=4)
    full = estimate(shape, plan, cluster, 16)
    step_only = estimate(shape, plan, cluster, 16, include_optimizer=False)
    assert full.optimizer_s > 0 and step_only.optimizer_s == 0.0
    assert full.step_time_s - step_only.step_time_s == pytest.approx(full.optimizer_s)


def test_replicated_vocabulary_ends_cost_the_whole_head_on_every_rank():
    hw = cpu(intra_bw=1e9, intra_latency=1e-4, hbm_bw=2e10)
    plan = Plan(tp=4)
    split = estimate(SHAPE, plan, on_one_host(hw), 16)
    whole = estimate(SHAPE, plan, on_one_host(hw), 16, vocab_parallel=False)
    mbs = 16
    emb_split, emb_whole = (embedding_time(SHAPE, hw, tp, 1, mbs, False) for tp in (4, 1))
    head_split, head_whole = (head_time(SHAPE, hw, tp, 1, mbs, False) for tp in (4, 1))
    vocab_ar = comm.collective_time("all_reduce", 4 * mbs * SHAPE.seq * SHAPE.hidden,
                                    comm.GroupPlacement(4, 4), hw)
    fwd_delta = (emb_whole[0] - emb_split[0]) + (head_whole[0] - head_split[0]) - vocab_ar
    bwd_delta = (emb_whole[1] - emb_split[1]) + (head_whole[1] - head_split[1]) - vocab_ar
    assert whole.stage_fwd_s[0] - split.stage_fwd_s[0] == pytest.approx(fwd_delta)
    assert whole.stage_bwd_s[0] - split.stage_bwd_s[0] == pytest.approx(bwd_delta)
    ends = SHAPE.embedding_params() + SHAPE.head_params()
    assert whole.memory.weights - split.memory.weights == pytest.approx(2 * ends * 3 / 4)


def test_local_cpu_profile_knows_its_cores():
    cores = available_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    hw = local_cpu()
    assert hw.cores == cores and hw.elem_bytes == 4 and hw.reduce_scatter_is_all_reduce
