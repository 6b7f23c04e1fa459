"""Closed-form checks of every cost-model formula (no torch.distributed, no capture)."""

import math

import pytest
import sympy

from core import schedules
from core.layout import RankLayout
from core.plan import Plan
from cost_model import comm, memory
from cost_model.hardware import GiB, Hardware, get_hardware, load_cluster_file, parse_cluster
from cost_model.layer_costs import activation_bytes, b, c, e, et, sp, t
from cost_model.shapes import TransformerShape
from cost_model.step_time import PlanRejected, estimate

GPT = TransformerShape.megatron_gpt(layers=4, hidden=1024, heads=16, seq=2048)


def test_gemm_roofline_closed_form():
    hw = Hardware("x", peak_flops=100e12, memory_bytes=1, hbm_bw=1e12, intra_bw=1, inter_bw=1,
                  gemm_eff=0.5, gemm_half=0.0, mem_eff=1.0, kernel_latency=0.0)
    # compute bound: 2*4096^3 / (100e12 * 0.5)
    assert hw.gemm_time(4096, 4096, 4096) == pytest.approx(2 * 4096 ** 3 / 50e12)
    # memory bound: a thin GEMM moves (m k + k n + m n) * 2 bytes at 1 TB/s
    assert hw.gemm_time(8192, 8192, 1) == pytest.approx(2 * (8192 + 8192 + 8192 ** 2) / 1e12)


def test_gemm_efficiency_curve_penalizes_small_shapes():
    hw = get_hardware("A100-80G")
    g = hw.gemm_half
    assert hw.gemm_shape_eff(g, 1e9, 1e9) == pytest.approx(hw.gemm_eff / 2, rel=1e-6)
    assert hw.gemm_shape_eff(64, 64, 64) < 0.3 * hw.gemm_shape_eff(8192, 8192, 8192)


@pytest.mark.parametrize("kind,factor", [("all_reduce", 2 * 7 / 8), ("reduce_scatter", 7 / 8),
                                         ("all_gather", 7 / 8), ("all_to_all", 7 / 8)])
def test_nccl_bus_bandwidth_formulas_inside_a_node(kind, factor):
    hw = Hardware("x", 1, 1, 1, intra_bw=100e9, inter_bw=10e9, intra_eff=1.0, inter_eff=1.0,
                  intra_latency=0.0, inter_latency=0.0)
    group = comm.GroupPlacement(8, 8)
    S = 1e9
    assert comm.collective_time(kind, S, group, hw) == pytest.approx(S / 100e9 * factor)
    assert comm.ring_time(kind, S, 8, 100e9, 0.0) == pytest.approx(S / 100e9 * factor)


def test_hierarchical_all_reduce_and_latency():
    hw = Hardware("x", 1, 1, 1, intra_bw=100e9, inter_bw=10e9, intra_eff=1.0, inter_eff=1.0,
                  intra_latency=1e-6, inter_latency=2e-6)
    S = 8e9
    # 2 nodes x 8: intra RS+AG over 8 ranks, inter AR of S/8 per rail over 2 nodes
    expected = 2 * (S / 100e9 * 7 / 8 + 7e-6) + 2 * (S / 8 / 10e9 * 1 / 2 + 2e-6)
    assert comm.collective_time("all_reduce", S, comm.GroupPlacement(16, 8), hw) == \
        pytest.approx(expected)
    assert comm.collective_time("send", S, comm.GroupPlacement(2, 1), hw) == \
        pytest.approx(2e-6 + S / 10e9)
    assert comm.collective_time("all_reduce", S, comm.GroupPlacement(1, 1), hw) == 0.0


def test_placement_follows_rank_order():
    layout = RankLayout.dense(Plan(tp=8, dp=4, pp=2, order="tp-cp-ep-dp-pp"))
    assert comm.group_placement(layout, "tp", 8) == comm.GroupPlacement(8, 8)
    assert comm.group_placement(layout, "dp", 8) == comm.GroupPlacement(4, 1)
    # dp fastest: the dp group is inside a node, tp spans nodes
    swapped = RankLayout.dense(Plan(tp=8, dp=4, pp=2, order="dp-cp-ep-tp-pp"))
    assert comm.group_placement(swapped, "dp", 8) == comm.GroupPlacement(4, 4)
    assert comm.group_placement(swapped, "tp", 8).nodes == 4
    # experts over etp-ep-edp-pp from the same order: ep=4 strides over etp=2
    experts = RankLayout.expert(Plan(tp=2, ep=4, dp=8))
    assert comm.group_placement(experts, "ep", 8) == comm.GroupPlacement(4, 4)
    assert comm.group_placement(experts, "edp", 8) == comm.GroupPlacement(2, 1)


@pytest.mark.parametrize("tp,use_sp,rc", [(1, False, "none"), (8, False, "none"),
                                          (8, True, "none"), (4, False, "selective"),
                                          (8, True, "selective"), (1, False, "full"),
                                          (2, True, "full")])
def test_activation_memory_matches_korthikanti(tp, use_sp, rc):
    s, h, a, mbs = 2048, 12288, 96, 1
    shape = TransformerShape.megatron_gpt(layers=1, hidden=h, heads=a, seq=s)
    expr = activation_bytes(shape, moe=False)[rc]
    got = float(expr.subs({t: tp, c: 1, b: mbs, sp: int(use_sp), e: 1, et: 1}))
    want = memory.korthikanti_activation_bytes(s, mbs, h, a, tp, use_sp, rc)
    assert got == pytest.approx(want, rel=1e-9)


def test_korthikanti_table_closed_form():
    s, bb, h, a, tt = 2048, 1, 12288, 96, 8
    assert memory.korthikanti_activation_bytes(s, bb, h, a) == s * bb * h * (34 + 5 * a * s / h)
    assert memory.korthikanti_activation_bytes(s, bb, h, a, tt, True, "selective") == \
        34 * s * bb * h / tt
    assert memory.korthikanti_activation_bytes(s, bb, h, a, tt, False, "full") == 2 * s * bb * h


def test_in_flight_microbatches_per_schedule():
    assert memory.in_flight("1f1b", 0, 8, 64, 1) == 8
    assert memory.in_flight("1f1b", 7, 8, 64, 1) == 1
    assert memory.in_flight("1f1b", 0, 8, 3, 1) == 3
    assert memory.in_flight("gpipe", 0, 8, 64, 1) == 64
    p, v = 8, 4  # Korthikanti: p (1 + (p-1)/(p v))
    assert memory.in_flight("interleaved-1f1b", 0, p, 64, v) == pytest.approx(
        p * (1 + (p - 1) / (p * v)))


def test_interleaved_peak_follows_the_chunk_order():
    p, v, m = 8, 4, 64
    even = tuple([3.0] * v)  # equal chunks: Korthikanti's p (1 + (p-1)/(p v)) of the rank's layers
    for rank in (0, 3, p - 1):
        assert memory.interleaved_peak(rank, p, m, even) == pytest.approx(
            memory.in_flight("interleaved-1f1b", rank, p, m, v) * 3.0 * v)
    # Llama 3's first rank: 8 one-layer chunks, the first holding only the embedding. Megatron's
    # warm-up of 2*15 + 7*16 = 142 forwards (+1) runs chunks 0..7 on 16 microbatches each, then
    # chunk 0 again: 7 layers x 16 microbatches held, not 143/8 of the rank's 7 layers
    llama_first = (0.0,) + (1.0,) * 7
    assert memory.interleaved_peak(0, 16, 32, llama_first) == 112
    assert memory.in_flight("interleaved-1f1b", 0, 16, 32, 8) * 7 == pytest.approx(125.125)
    # fewer microbatches than the warm-up: every forward is held
    assert memory.interleaved_peak(1, 16, 16, (1.0,) * 8) == 128
    # against the whole schedule simulated action by action (core.schedules' interleaved order)
    for pp, v, m, sizes in ((4, 2, 8, (0.0, 3.0)), (4, 3, 12, (1.0, 0.0, 2.5)),
                            (2, 4, 10, (2.0, 1.0, 1.0, 0.5))):
        for rank in range(pp):
            held = peak = 0.0
            for action in schedules.schedule("interleaved-1f1b", pp, m, v)[rank]:
                chunk = action.stage // pp  # stage s of the pp*v runs on rank s % pp
                held += sizes[chunk] if action.kind == "F" else -sizes[chunk]
                peak = max(peak, held)
            assert memory.interleaved_peak(rank, pp, m, sizes) == pytest.approx(peak)


def test_stage_layers_balanced_and_complete():
    per = memory.stage_layers(105, 0, False, 35, 1)
    assert [n for n, _ in per] == [3] * 35
    per = memory.stage_layers(10, 0, False, 4, 1)
    assert sum(n for n, _ in per) == 10 and per[0][0] <= per[1][0]
    per = memory.stage_layers(61, 3, True, 4, 1)
    assert sum(d for d, _ in per) == 3 and sum(m for _, m in per) == 58


def test_parameter_count_matches_gpt_config_formula():
    models = pytest.importorskip("partitioner.models")
    for name, cfg in models.PRESETS.items():
        assert TransformerShape.from_gpt_config(cfg).num_parameters() == cfg.num_parameters(), name


def test_model_flops_equal_korthikanti_formula():
    L, h, s, v = 96, 12288, 2048, 51200
    shape = TransformerShape(layers=L, hidden=h, heads=96, seq=s, vocab=v, bias=False,
                             learned_positions=False, norm="rmsnorm")
    # without biases/positions/norm weights, 6 N + 12 L h s == 72 L s h^2 (1 + s/6h + v/12hL)
    norms = (2 * L + 1) * h
    got = 6 * (shape.num_parameters() - norms) * s + 12 * L * h * s * s
    want = 72 * L * s * h * h * (1 + s / (6 * h) + v / (12 * h * L))
    assert got == pytest.approx(want, rel=1e-12)


def test_bubble_matches_published_formula_for_equal_stages():
    shape = TransformerShape.megatron_gpt(layers=16, hidden=1024, heads=16, vocab=1024)
    cl = parse_cluster("8xA100-80G")
    for sched, v, m in (("1f1b", 1, 16), ("interleaved-1f1b", 2, 16)):
        est = estimate(shape, Plan(pp=8, microbatches=m, schedule=sched, vpp=v), cl, m)
        p = 8
        x = [f + bw for f, bw in zip(est.stage_fwd_s, est.stage_bwd_s, strict=True)]
        mid = x[3]
        ideal = m * mid
        if sched == "1f1b":
            assert est.pipeline_s == pytest.approx((m - 1) * max(x) + sum(x))
            # equal middle stages: bubble close to (p-1)/(m+p-1) of the pipeline
            assert (est.pipeline_s - ideal) / est.pipeline_s == pytest.approx(
                (p - 1) / (m + p - 1), rel=0.15)
        else:
            assert est.pipeline_s == pytest.approx(m * max(x) + (sum(x) - max(x)) / v)


def test_recompute_and_sp_move_memory_the_right_way():
    shape = TransformerShape.megatron_gpt(layers=8, hidden=4096, heads=32)
    cl = parse_cluster("8xA100-80G")
    mem = {rc: estimate(shape, Plan(tp=8, sp=True, recompute=rc), cl, 8).memory.activations
           for rc in ("none", "selective", "full")}
    assert mem["none"] > mem["selective"] > mem["full"]
    times = {rc: estimate(shape, Plan(tp=8, sp=True, recompute=rc), cl, 8).step_time_s
             for rc in ("none", "selective", "full")}
    assert times["none"] < times["selective"] < times["full"]


def test_plan_rules_are_enforced():
    shape = TransformerShape.megatron_gpt(layers=8, hidden=1024, heads=16)
    cl = parse_cluster("8xA100-80G")
    with pytest.raises(PlanRejected, match=r"not divisible by tp\*pp\*cp=3\*1\*1=3"):
        estimate(shape, Plan(tp=3), cl, 8)
    with pytest.raises(PlanRejected, match="without MoE"):
        estimate(shape, Plan(ep=2), cl, 8)
    with pytest.raises(PlanRejected, match="global batch"):
        estimate(shape, Plan(tp=2, microbatches=3), cl, 8)


def test_plans_the_tensor_parallel_pass_runs_are_accepted():
    """The pass pads a vocabulary tp does not divide (GPT-2's 50257) and replicates kv heads
    that divide tp; kv heads neither dividing nor divided by tp are refused by both."""
    cl = parse_cluster("8xA100-80G")
    gpt2 = TransformerShape.megatron_gpt(layers=8, hidden=1024, heads=16, vocab=50257)
    assert estimate(gpt2, Plan(tp=8), cl, 8).step_time_s > 0
    gqa = TransformerShape(layers=8, hidden=1024, heads=16, kv_heads=2, seq=2048, vocab=32000)
    assert estimate(gqa, Plan(tp=8), cl, 8).step_time_s > 0
    odd = TransformerShape(layers=8, hidden=1536, heads=12, kv_heads=3, seq=2048, vocab=32000)
    with pytest.raises(PlanRejected, match="kv_heads=3"):
        estimate(odd, Plan(tp=4), cl, 8)


def test_cluster_parsing_and_errors(tmp_path):
    cl = parse_cluster("64xH100")
    assert cl.num_gpus == 64 and cl.nodes == 8 and cl.hardware.peak_flops == 989e12
    assert parse_cluster("16xA100-40G").hardware.memory_bytes == 40 * GiB
    with pytest.raises(ValueError, match="unknown GPU 'B300'"):
        parse_cluster("8xB300")
    with pytest.raises(ValueError, match="NxGPU"):
        parse_cluster("H100")
    f = tmp_path / "c.json"
    f.write_text('{"num_gpus": 16, "gpus_per_node": 4, "gpu": "H100", '
                 '"overrides": {"inter_bw": 1e10}}')
    cl = load_cluster_file(f)
    assert cl.gpus_per_node == 4 and cl.nodes == 4 and cl.hardware.inter_bw == 1e10


def test_layer_costs_are_sympy_expressions_of_the_degrees():
    from cost_model.layer_costs import block_costs

    bc = block_costs(GPT, get_hardware("A100-80G"))
    assert isinstance(bc.expressions["fwd"], sympy.Expr)
    assert {str(s) for s in bc.expressions["fwd"].free_symbols} <= {"t", "c", "b", "sp"}
    f1, f2 = bc.fwd(1, 1, 1, 0, 1, 1), bc.fwd(2, 1, 1, 0, 1, 1)
    assert f2 < f1 and bc.fwd(1, 1, 2, 0, 1, 1) > f1
    assert math.isfinite(bc.bwd(8, 2, 4, 1, 1, 1))


def test_memory_and_time_follow_the_plans_dtypes():
    """Per parameter on partitioner's runtime: bf16 = 2 (compute copy) + 4 (fp32 main)
    weights, 4 fp32 gradient, 8 AdamW moments (+ 4 for ZeRO-1's fp32 shard, both split over
    dp); fp32 without the copy, at the fp32 (TF32) peak. Unset, or 16-bit on Megatron-Core's
    runtime: Megatron's 2 + 4 + 12, the gradient buffer in the reduction dtype."""
    assert memory.param_bytes("bf16", 0) == memory.ParamBytes(6, 4, 8)
    assert memory.param_bytes("fp16", 1) == memory.ParamBytes(6, 4, 12)
    assert memory.param_bytes("fp32", 0) == memory.ParamBytes(4, 4, 8)
    assert memory.param_bytes(None, 1) == memory.ParamBytes(2, 4, 12)
    assert memory.param_bytes("bf16", 1, runtime="megatron") == memory.ParamBytes(2, 4, 12)
    assert memory.param_bytes("bf16", 1, "bf16", "megatron") == memory.ParamBytes(2, 2, 12)
    assert memory.param_bytes("fp32", 1, runtime="megatron") == memory.ParamBytes(4, 4, 8)
    cl = parse_cluster("8xA100-80G")
    runs = {dtype: estimate(GPT, Plan(tp=2, dp=4, zero=1, param_dtype=dtype), cl, 8,
                            runtime="partitioner")
            for dtype in (None, "bf16", "fp32")}
    params = runs["bf16"].memory.grads / 4  # the fullest rank's parameters
    assert runs["bf16"].memory.weights == pytest.approx(6 * params)
    assert runs["bf16"].memory.optimizer == pytest.approx(12 * params / 4)
    assert runs["fp32"].memory.weights == pytest.approx(4 * params)
    assert runs[None].memory.weights == pytest.approx(2 * params)
    assert runs["fp32"].memory.activations == pytest.approx(2 * runs["bf16"].memory.activations)
    assert runs["fp32"].step_time_s > 1.3 * runs["bf16"].step_time_s
    assert runs["fp32"].peak_flops == runs["bf16"].peak_flops  # MFU over the 16-bit peak
    megatron = estimate(GPT, Plan(tp=2, dp=4, zero=1, param_dtype="bf16", reduce_dtype="bf16"),
                        cl, 8)
    assert megatron.memory.weights == pytest.approx(2 * params)
    assert megatron.memory.grads == pytest.approx(2 * params)
    assert megatron.memory.optimizer == pytest.approx(12 * params / 4)


def test_zero_bubble_spans_match_the_schedule_simulation_on_unit_costs():
    """terms.pp.span, the shared-cores simulation (a core per rank) and the report's timeline
    give the span of core.schedules' unit-time simulation (F = 1, B = 2, I = W = 1 per stage),
    for every schedule; and the bubble orders gpipe = 1f1b > zb-h1 > zb-v (GPipe's bubble is
    1F1B's; it differs in memory)."""
    from core.schedules import Action, schedule, unit_finish_times
    from cost_model.shared_cores import Phases, RankPhases, simulate
    from cost_model.terms import pp as pipeline
    from partitioner.report.planning import simulate_pipeline

    for p, m in ((2, 4), (4, 8), (4, 4)):
        bubbles = {}
        for name, v in (("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("zb-h1", 1),
                        ("zb-v", 2)):
            orders = schedule(name, p, m, v)
            unit = max(unit_finish_times(orders).values())
            # per rank and microbatch, all its v stages: forward v, backward 2v
            x, f = [3.0 * v] * p, [1.0 * v] * p
            assert pipeline.span(x, m, v, name, f) == pytest.approx(unit), name
            phases = RankPhases(Phases(1.0 * v), Phases(2.0 * v), Phases(0.0))
            cost = lambda a: Phases(phases.of(a).work / v)  # noqa: E731
            assert simulate(orders, cost, 0.0, [[1] * p], p) == pytest.approx(unit), name
            events = simulate_pipeline(f, [2.0 * v] * p, m, name, v)
            assert max(t1 for *_, t1 in events) == pytest.approx(unit), name
            bubbles[name] = 1 - m * x[0] / unit
        assert bubbles["gpipe"] == bubbles["1f1b"] > bubbles["zb-h1"] > bubbles["zb-v"] > 0
        assert bubbles["zb-h1"] == pytest.approx((p - 1) / (3 * m + p - 1))  # (p-1)(F+I-W)
        assert phases.of(Action("W", 0, 0)) == Phases(v * 1.0)  # half the backward


def test_zero_bubble_estimates_shrink_the_bubble_and_move_the_head_for_zb_v():
    shape = TransformerShape.megatron_gpt(layers=16, hidden=1024, heads=16, vocab=1024)
    cl = parse_cluster("8xA100-80G")
    est = {sched: estimate(shape, Plan(pp=8, microbatches=16, schedule=sched, vpp=v), cl, 16)
           for sched, v in (("gpipe", 1), ("1f1b", 1), ("zb-h1", 1), ("zb-v", 2))}
    bubble = {name: e.bubble_fraction for name, e in est.items()}
    assert bubble["gpipe"] == pytest.approx(bubble["1f1b"])
    assert bubble["1f1b"] > bubble["zb-h1"] > bubble["zb-v"]
    e = est["zb-h1"]
    x = [f + b for f, b in zip(e.stage_fwd_s, e.stage_bwd_s, strict=True)]
    assert e.pipeline_s == pytest.approx(16 * max(x) + sum(e.stage_fwd_s) - max(e.stage_fwd_s))
    # the V puts the LM head (its logits) on rank 0, beside the embedding; 1F1B on the last
    v, plain = est["zb-v"], est["1f1b"]
    assert v.stage_fwd_s[0] > v.stage_fwd_s[-1] and plain.stage_fwd_s[-1] > plain.stage_fwd_s[0]


def test_stage_layers_layout_places_the_blocks():
    assert memory.stage_layers(8, 0, False, 2, 1, None, (2, 6)) == ((2, 0), (6, 0))
    # interleaved: rank r holds stages r and r + pp
    assert memory.stage_layers(14, 0, False, 2, 2, None, (3, 4, 4, 3)) == ((7, 0), (7, 0))
    assert memory.stage_layers(14, 0, False, 2, 2, None, (1, 4, 4, 5)) == ((5, 0), (9, 0))
    # zb-v's V: rank 0 holds stages 0 and 3 (here the embedding and the head alone)
    assert memory.stage_layers(6, 0, False, 2, 2, (0, 1, 1, 0), (0, 3, 3, 0)) == (
        (0, 0), (6, 0))
    assert memory.stage_layers(6, 2, True, 2, 1, None, (1, 5)) == ((1, 0), (1, 4))
    with pytest.raises(ValueError, match="summing to the model's 6 layers"):
        memory.stage_layers(6, 0, False, 2, 1, None, (2, 3))


def test_uneven_layout_moves_stage_time_and_memory_and_the_slowest_stage_sets_the_span():
    shape = TransformerShape.megatron_gpt(layers=8, hidden=1024, heads=16, vocab=1024)
    cl = parse_cluster("2xA100-80G")
    m = 8
    even, uneven = (estimate(shape, Plan(pp=2, microbatches=m, stage_layers=layout), cl, m)
                    for layout in (None, (2, 6)))
    # two blocks move from rank 0 to rank 1: the same block time leaves one and joins the other
    fwd_moved = even.stage_fwd_s[0] - uneven.stage_fwd_s[0]
    assert fwd_moved > 0
    assert uneven.stage_fwd_s[1] - even.stage_fwd_s[1] == pytest.approx(fwd_moved)
    weights_moved = even.stage_memory_parts[0].weights - uneven.stage_memory_parts[0].weights
    assert weights_moved == pytest.approx(
        2 * memory.PARAM_BYTES * shape.dense_block_params())
    assert uneven.stage_memory_parts[1].weights - even.stage_memory_parts[1].weights == (
        pytest.approx(weights_moved))
    for est in (even, uneven):  # 1F1B: (m - 1) microbatches of the slowest, one of each
        x = [f + b for f, b in zip(est.stage_fwd_s, est.stage_bwd_s, strict=True)]
        assert est.pipeline_s == pytest.approx((m - 1) * max(x) + sum(x))
    x = [f + b for f, b in zip(uneven.stage_fwd_s, uneven.stage_bwd_s, strict=True)]
    assert x[1] == max(x) and uneven.pipeline_s > even.pipeline_s


def test_interleaved_uneven_layout_is_costed_and_checked_against_the_model():
    shape = TransformerShape.megatron_gpt(layers=6, hidden=1024, heads=16, vocab=1024)
    cl = parse_cluster("2xA100-80G")
    m, v = 4, 2
    plan = Plan(pp=2, vpp=v, schedule="interleaved-1f1b", microbatches=m,
                stage_layers=(1, 2, 2, 1))
    est = estimate(shape, plan, cl, m)
    x = [f + b for f, b in zip(est.stage_fwd_s, est.stage_bwd_s, strict=True)]
    assert est.pipeline_s == pytest.approx(m * max(x) + (sum(x) - max(x)) / v)
    # 1 + 2 and 2 + 1 blocks: the ranks hold what 3/3 without interleaving would
    flat = estimate(shape, Plan(pp=2, microbatches=m, stage_layers=(3, 3)), cl, m)
    assert [p.weights for p in est.stage_memory_parts] == pytest.approx(
        [p.weights for p in flat.stage_memory_parts])
    with pytest.raises(PlanRejected, match=r"stage_layers=1/2/2/3 places 8 layers but the "
                                           r"model has 6; give pp\*vpp=4 counts summing to 6"):
        estimate(shape, Plan(pp=2, vpp=v, schedule="interleaved-1f1b", microbatches=m,
                             stage_layers=(1, 2, 2, 3)), cl, m)
