"""Closed-form checks of what a CPU host adds to the cost model: the schedule run on shared cores,
per-op framework overhead, per-element math, attention efficiency, and how this package's runtime
differs from Megatron-Core's (sequence-parallel collectives, gradient accumulation, loss sum)."""

import dataclasses
import math

import pytest

from core.plan import Plan
from core.schedules import Action, schedule
from cost_model import comm
from cost_model.fit import (fit_attention_eff, fit_gemm, fit_math_rate, fit_op_overhead,
                            profile_from_measurements, tiny_block_shape)
from cost_model.hardware import Cluster, Hardware
from cost_model.layer_costs import block_costs, embedding_time, head_time
from cost_model.shapes import TransformerShape
from cost_model.shared_cores import Phases, simulate
from cost_model.step_time import estimate
from cost_model.terms.tp import sp_param_reads

SHAPE = TransformerShape(layers=4, hidden=256, heads=8, vocab=2048, seq=128, fused_qkv=False)
FAST = 1e30
ARGS = (1, 1, 2, 0, 1, 1)  # t, c, b, sp, e, et


def cpu(**kw) -> Hardware:
    """Every term off unless a test switches it on."""
    base = dict(name="test-cpu", peak_flops=FAST, memory_bytes=64e9, hbm_bw=FAST, intra_bw=FAST,
                inter_bw=FAST, gemm_eff=1.0, gemm_half=0.0, mem_eff=1.0, intra_eff=1.0,
                inter_eff=1.0, intra_latency=0.0, inter_latency=0.0, kernel_latency=0.0,
                reserved_bytes=0.0, elem_bytes=4)
    return Hardware(**{**base, **kw})


def host(hw: Hardware, ranks: int = 4) -> Cluster:
    return Cluster(hardware=hw, num_gpus=ranks, gpus_per_node=ranks)


# --- the schedule on shared cores ---------------------------------------------------------------
def _two_stages(cores, load, hop=0.5):
    orders = schedule("1f1b", 2, 2)
    cost = {"F": Phases(1.0), "B": Phases(2.0)}
    return simulate(orders, lambda a: cost[a.kind], hop, [load], cores)


def test_own_cores_give_the_critical_path_with_its_hops():
    # rank 0: F0 [0,1] F1 [1,2] B0 [5,7] B1 [8,10]; rank 1: F0 [1.5,2.5] B0 [2.5,4.5]
    # F1 [4.5,5.5] B1 [5.5,7.5]: every hop between the ranks waits 0.5
    assert _two_stages(cores=2, load=[1, 1]) == pytest.approx(10.0)


def test_shared_core_runs_the_ranks_at_half_speed_while_both_have_work():
    # one core: rank 0 F1 and rank 1 F0 share it from 1.5 (F1 ends 2.5, F0 3.0); rank 1 B0
    # [3,5] alone; rank 1 F1 alone [5,5.5], then with rank 0 B0 until 6.5; rank 1 B1 and
    # rank 0 B0 share until 9.5, B1 ends alone at 10.0; rank 0 B1 [10.5,12.5]
    step = _two_stages(cores=1, load=[1, 1])
    assert step == pytest.approx(12.5)
    assert step > max(10.0, 12.0)  # above both bounds: critical path, work over the core


def test_lockstep_replicas_pay_their_work_over_the_cores_and_every_wait():
    orders = [[Action("F", 0, 0), Action("B", 0, 0), Action("S", 0, 0)]]
    cost = {"F": Phases(1.0, 0.25), "B": Phases(2.0, 0.5), "S": Phases(0.5, 1.0)}
    # four replicas on two cores: work at half speed, waits in full
    step = simulate(orders, lambda a: cost[a.kind], 0.0, [[4]], 2)
    assert step == pytest.approx(2 * (1.0 + 2.0 + 0.5) + 0.25 + 0.5 + 1.0)


def test_a_rank_goes_at_the_pace_of_its_most_crowded_node():
    orders = [[Action("F", 0, 0)], [Action("F", 0, 0)]]  # two independent one-action ranks
    cost = lambda a: Phases(1.0)  # noqa: E731
    # node 0 runs 3 ranks of pipeline rank 0, node 1 one of each: rank 1 is slowed on node 1
    # only while rank 0 works there too (both end at 3 on 1 core each)
    assert simulate(orders, cost, 0.0, [[3, 0], [1, 1]], 1) == pytest.approx(3.0)


def test_pipeline_on_shared_cores_lies_above_both_bounds():
    hw = cpu(peak_flops=50e9, intra_latency=1e-4, intra_bw=1e9, cores=2)
    est = estimate(SHAPE, Plan(pp=4, microbatches=4), host(hw), 16,
                   include_optimizer=False)
    work = sum(est.stage_work_s) / 2
    assert est.step_time_s >= max(work, est.critical_path_s)
    assert est.step_time_s < work + est.critical_path_s


# --- per-op overhead ------------------------------------------------------------------------
def _ops(shape: TransformerShape) -> tuple[float, float]:
    """(graph ops of one block, of the ends but the loss) as the cost model counts them."""
    counting = cpu(op_overhead=1.0)  # every op costs 1 s forward, nothing else costs anything
    block = block_costs(shape, counting).fwd(*ARGS)
    ends = embedding_time(shape, counting, 1, 1, 2, False)[0] + \
        head_time(shape, counting, 1, 1, 2, False)[0] - 2  # log-softmax and NLL: in loss_fn
    return block, ends


def _graph_ops(torch, models, kernels, layers: int, **cfg) -> int:
    model, (ids,) = models.build(models.GPTConfig(n_layer=layers, n_embd=32, n_head=4,
                                                  vocab_size=64, seq_len=16, **cfg), batch=2,
                                 seq=16)
    gm = kernels.use_kernels(torch.export.export(model, (ids,)).graph_module)
    return sum(1 for n in gm.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("cfg", [
    {}, {"fused_qkv": True},
    {"norm": "rmsnorm", "position": "rope", "swiglu": True, "bias": False},
    {"norm": "rmsnorm", "position": "rope", "swiglu": True, "fused_gate_up": True,
     "n_kv_head": 2, "tie_embeddings": False}], ids=["gpt", "fused-qkv", "llama", "llama-gqa"])
def test_op_counts_are_the_captured_graphs(cfg):
    torch = pytest.importorskip("torch")
    models = pytest.importorskip("partitioner.models")
    kernels = pytest.importorskip("passes.kernels")
    one, two = (_graph_ops(torch, models, kernels, n, **cfg) for n in (1, 2))
    shape = TransformerShape.from_gpt_config(models.GPTConfig(n_embd=32, n_head=4, **cfg))
    block, ends = _ops(shape)
    assert block == two - one
    assert ends == one - (two - one)


def test_op_overhead_is_paid_forward_and_backward_per_op():
    hw = cpu(op_overhead=3e-6, op_overhead_bwd=5e-6)
    gpt = block_costs(SHAPE, hw)
    assert gpt.fwd(*ARGS) == pytest.approx(20 * 3e-6)  # 20 ops a GPT block
    assert gpt.bwd(*ARGS) == pytest.approx(20 * 5e-6)
    # many small microbatches pay it once each: dp=1 on one core, 4 microbatches
    one, four = (estimate(SHAPE, Plan(microbatches=m), host(hw, 1), 4,
                          include_optimizer=False).step_time_s for m in (1, 4))
    per_microbatch = (4 * 20 + 4 + 4) * 8e-6  # blocks, embedding (4 ops), head and loss (4)
    assert four - one == pytest.approx(3 * per_microbatch)


# --- per-element math and attention -----------------------------------------------------------
def test_math_rate_bounds_the_norms_activation_and_loss():
    hw = cpu(math_rate=1e9, hbm_bw=1e12)
    assert hw.math_time(8e6, 1e6) == pytest.approx(1e-3)   # math bound
    assert hw.math_time(8e9, 1e6) == pytest.approx(8e-3)   # memory bound
    assert cpu(hbm_bw=1e12).math_time(8e6, 1e6) == pytest.approx(8e-6)  # None: memory only
    T, h, f = 2 * SHAPE.seq, SHAPE.hidden, SHAPE.ffn_dim
    hw = cpu(math_rate=1e9)  # and memory free
    costs = block_costs(SHAPE, hw)
    # the two norms over T h elements, GeLU over T f: the rest is free at these rates
    assert costs.fwd(*ARGS) == pytest.approx((2 * T * h + T * f) / 1e9)
    assert costs.bwd(*ARGS) == pytest.approx((2 * 2.0 * T * h + 1.5 * T * f) / 1e9)
    assert head_time(SHAPE, hw, 1, 1, 2, False)[0] == pytest.approx((T * h + T * 2048) / 1e9)


def test_attention_efficiency_scales_flash_attention_only():
    base = cpu(peak_flops=1e11, gemm_half=8.0)
    half = dataclasses.replace(base, attention_eff=0.5)
    flops = 4 * (2 * 8) * 128 * 128 * 32 / 2
    assert half.attention_time(flops, 128, 128, 32) == \
        pytest.approx(2 * base.attention_time(flops, 128, 128, 32))
    gemms = block_costs(SHAPE, base).fwd(*ARGS) - base.attention_time(flops, 128, 128, 32)
    assert block_costs(SHAPE, half).fwd(*ARGS) == \
        pytest.approx(gemms + half.attention_time(flops, 128, 128, 32))


# --- calibration fits -------------------------------------------------------------------------
def test_gemm_fit_on_a_grid_of_thin_and_square_shapes():
    peak, half, latency = 1e11, 16.0, 3e-6
    points = []
    for m in (64, 256, 1024):
        for n in (64, 256, 1024):
            for k in (64, 256, 1024):
                eff = (m / (m + half)) * (n / (n + half)) * (k / (k + half))
                t = latency + 2 * m * n * k / (peak * eff)
                points.append({"m": m, "n": n, "k": k, "seconds": t,
                               "flops": 2 * m * n * k / t})
    fit = fit_gemm(points)
    assert fit.gemm_half == pytest.approx(half, rel=0.1)
    assert fit.call_latency == pytest.approx(latency, rel=0.1)
    assert fit.peak_flops == pytest.approx(peak, rel=0.02)


def test_attention_fit_recovers_the_efficiency():
    hw = cpu(peak_flops=1e11, gemm_half=8.0, kernel_latency=2e-6)
    points = []
    for heads, seq, hd in ((32, 128, 32), (8, 512, 64)):
        flops = 4 * heads * seq * seq * hd / 2
        fwd = dataclasses.replace(hw, attention_eff=0.4).attention_time(flops, seq, seq, hd)
        points.append({"heads": heads, "seq": seq, "head_dim": hd, "forward_s": fwd,
                       "forward_backward_s": 3.5 * fwd})
    assert fit_attention_eff(points, hw) == pytest.approx(0.4)
    assert fit_attention_eff([], hw) == 1.0


def test_math_rate_is_the_geometric_mean_of_the_kernels():
    points = [{"op": "gelu", "elements": 1e6, "seconds": 1e-3},
              {"op": "layer_norm", "elements": 1e6, "seconds": 4e-3}]
    assert fit_math_rate(points) == pytest.approx(1e6 / 2e-3)
    assert fit_math_rate([]) is None


def test_op_overhead_fit_makes_the_model_reproduce_the_tiny_block():
    hw = cpu(peak_flops=5e10, hbm_bw=2e10, kernel_latency=2e-6)
    shape = tiny_block_shape()
    bare = block_costs(shape, hw)
    args = (1, 1, 1, 0, 1, 1)
    nodes, fwd_over, bwd_over = 20, 10e-6, 15e-6
    measured = {"nodes": nodes, "batch": 1,
                "forward_s": bare.fwd(*args) + nodes * fwd_over,
                "forward_backward_s": bare.fwd(*args) + bare.bwd(*args) + nodes * (
                    fwd_over + bwd_over)}
    assert fit_op_overhead(measured, hw) == pytest.approx((fwd_over, bwd_over))
    fitted = dataclasses.replace(hw, op_overhead=fwd_over, op_overhead_bwd=bwd_over)
    assert block_costs(shape, fitted).fwd(*args) == pytest.approx(measured["forward_s"])
    assert fit_op_overhead(None, hw) == (0.0, 0.0)


def test_tiny_block_of_the_overhead_timing_is_the_models_block():
    pytest.importorskip("torch")
    from tools.calibrate import measure_op_overhead

    measured = measure_op_overhead(repeat=1)
    block, _ = _ops(tiny_block_shape())
    assert measured["nodes"] == block == 20


def test_profile_fits_the_new_measurements_and_keeps_defaults_without_them():
    alpha, bw, n = 50e-6, 2e9, 2
    coll = {f"all_reduce:{S}": 2 * (n - 1) * alpha + S / bw * 2 * (n - 1) / n
            for S in (4096, 65536, 1 << 20)}
    matmul = [{"m": d, "n": d, "k": d, "seconds": 2 * d ** 3 / 5e10, "flops": 5e10}
              for d in (64, 256)]
    base = {"matmul": matmul, "memcpy_bytes_per_s": 2e10, "collectives_s": coll, "ranks": n,
            "threads": 1, "cores": 2}
    old = profile_from_measurements(base)
    assert (old["attention_eff"], old["math_rate"], old["op_overhead"]) == (1.0, None, 0.0)
    new = profile_from_measurements({**base, "math": [
        {"op": "gelu", "elements": 1e6, "seconds": 1e-3}]})
    assert new["math_rate"] == pytest.approx(1e9)
    assert Hardware.from_dict(new).math_rate == pytest.approx(1e9)


# --- this package's runtime against Megatron-Core's -------------------------------------------
def test_partitioner_sequence_parallelism_regathers_and_sums_norm_gradients():
    hw = cpu(intra_bw=1e9, intra_latency=1e-4, reduce_scatter_is_all_reduce=True,
             all_gather_eff=0.5)
    plan = Plan(tp=2, dp=2, sp=True)
    ours, megatron = (estimate(SHAPE, plan, host(hw), 16, include_optimizer=False,
                               vocab_parallel=False, runtime=r) for r in ("partitioner",
                                                                          "megatron"))
    group = comm.GroupPlacement(2, 2)
    msg = 4 * 8 * SHAPE.seq * SHAPE.hidden  # float32 [8 sequences, seq, hidden]
    gather = comm.collective_time("all_gather", msg, group, hw)
    small = comm.collective_time("all_reduce", 4 * SHAPE.hidden, group, hw)
    assert sp_param_reads(SHAPE) == 6  # ln_1 and ln_2 weight and bias, o_proj and down biases
    assert ours.comm_s["tp"] - megatron.comm_s["tp"] == pytest.approx(
        SHAPE.layers * (2 * gather + 6 * small))
    # the last stage: ln_f's weight and bias gradients, the LM head's sequence all-gather
    dp_ar = comm.collective_time("all_reduce", 24, group, hw)  # the loss, over dp
    head = 2 * small + comm.collective_time("all_gather", msg, group, hw)
    assert ours.critical_path_s - megatron.critical_path_s == pytest.approx(
        SHAPE.layers * (2 * gather + 6 * small) + head + dp_ar)


def test_partitioner_accumulates_weight_gradients_after_the_first_microbatch():
    hw = cpu(hbm_bw=1e10)
    cluster = host(hw, 1)
    params = SHAPE.num_parameters()
    for m in (1, 4):
        ours, megatron = (estimate(SHAPE, Plan(microbatches=m), cluster, 4,
                                   include_optimizer=False, runtime=r).step_time_s
                          for r in ("partitioner", "megatron"))
        assert ours - megatron == pytest.approx((m - 1) * 3 * 4 * params / 1e10)


def test_partitioner_step_waits_on_the_loss_sum_over_pp_and_dp():
    hw = cpu(intra_latency=1e-3)
    plan = Plan(pp=2, dp=2, microbatches=2)
    ours, megatron = (estimate(SHAPE, plan, host(hw), 16, include_optimizer=False,
                               runtime=r) for r in ("partitioner", "megatron"))
    # 2 (n - 1) alpha over pp=2, then over dp=2
    assert ours.step_time_s - megatron.step_time_s == pytest.approx(2 * 2e-3)
    assert math.isfinite(ours.step_time_s)
