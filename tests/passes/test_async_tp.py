"""Async TP (passes/async_tp.py): graph-level checks of the fusion, the plan's refusals, and
equivalence with the single-device model on real gloo ranks (float64: outputs, loss, every
gradient; one spawn per world size). The cases are few (each costs the suite seconds): the ops
themselves are checked against their plain composition in tests/runtime/test_async_tp.py."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from core import meta, ops
from core.plan import Plan, PlanError
from equivalence import assert_passed, equivalence_worker
from model_zoo import capture_once, hf_gpt2, hf_llama
from partitioner.compiler import compile_rank
from partitioner.report.program import collective_kind
from ranks import on_ranks

aten = torch.ops.aten


def _program(factory, plan: str, **overrides):
    plan = Plan.parse(plan)
    world = plan.tp * plan.pp * (plan.dp or 1)
    return compile_rank(capture_once(factory, **overrides), plan.resolve(world), 0, "meta")


def _record(program):
    return program.stages[0].gm.meta[meta.ASYNC_TP_RECORD]


def _targets(program) -> Counter:
    return Counter(n.target for _, n in program.nodes() if n.op == "call_function")


# --- graph-level ----------------------------------------------------------------------------

def test_llama_gathers_fuse_with_their_column_linears_and_reduce_scatters_with_row_linears():
    program = _program("tiny_llama", "tp=2,sp=on,async_tp=on")
    record = _record(program)
    # per block: q, k, v share one ring, gate and up another; o_proj and down_proj reduce;
    # the LM head reads the last gather
    assert [len(readers) for _, readers in record.gathers] == [3, 2, 3, 2, 1]
    assert len(record.scatters) == 4
    # the embedding's partial sums are no linear's: that reduce-scatter stays as it was
    assert [why for _, why in record.left] == [
        "it reduces masked_fill_scalar_1, which is no linear"]
    targets = _targets(program)
    assert targets[ops.all_gather_matmul] == 5 and targets[ops.matmul_reduce_scatter] == 4
    assert targets[ops.gather_for_region] == 0 and targets[ops.reduce_scatter] == 1
    assert targets[aten.linear.default] == 0  # every linear of the model is fused
    for _, node in program.nodes():
        if node.target is ops.all_gather_matmul:  # the column linears' weights, their biases
            assert node.args[3] == "tp" and node.args[4] == 1 and len(node.args[1]) == \
                len(node.args[2]) == len(node.meta["val"])
    program.stages[0].gm.graph.lint()


def test_reports_still_name_the_collectives_the_fused_ops_perform():
    plain = _program("tiny", "tp=2,sp=on")
    fused = _program("tiny", "tp=2,sp=on,async_tp=on")

    def kinds(program):
        return Counter(collective_kind(n) for _, n in program.nodes() if collective_kind(n))

    assert kinds(fused) == kinds(plain)  # one all_gather per gather, one reduce_scatter each
    # the fused ops' outputs have the shapes of what they replace
    reduced = sorted(tuple(n.meta["val"].shape) for _, n in plain.nodes()
                     if n.target is ops.reduce_scatter and n.args[0].target is aten.linear.default)
    assert sorted(tuple(n.meta["val"].shape) for _, n in fused.nodes()
                  if n.target is ops.matmul_reduce_scatter) == reduced
    gathered = sorted(tuple(n.meta["val"].shape) for _, n in plain.nodes()
                      if n.target is aten.linear.default
                      and n.args[0].target is ops.gather_for_region)
    assert sorted(tuple(v.shape) for _, n in fused.nodes() if n.target is ops.all_gather_matmul
                  for v in n.meta["val"]) == gathered


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def test_readers_that_are_no_linear_leave_the_collective_unfused_with_the_reason():
    pytest.importorskip("transformers")
    record = _record(_program(hf_gpt2, "tp=2,sp=on,async_tp=on"))
    reasons = dict(record.left)
    # GPT-2's Conv1D reads a flattened view (addmm): only the LM head's gather fuses
    assert len(record.gathers) == 1 and record.scatters == ()
    assert reasons["gather_for_region_default"] == (
        "view_default_1 (aten.view.default) reads the gathered value and is no linear")
    assert reasons["reduce_scatter_default_1"] == "it reduces view_default_8, which is no linear"


def test_async_tp_off_leaves_the_sequence_parallel_graph_alone():
    program = _program("tiny", "tp=2,sp=on")
    assert meta.ASYNC_TP_RECORD not in program.stages[0].gm.meta
    assert _targets(program)[ops.all_gather_matmul] == 0


def test_the_plan_refuses_async_tp_without_sp_and_where_it_has_not_landed():
    with pytest.raises(PlanError, match=r"async_tp=on needs sp=on .* into tp=2 ring steps.*"
                                        r"set sp=on or async_tp=off"):
        Plan.parse("tp=2,async_tp=on")
    # parallelize calls refuse_pending before any collective (tests/partitioner/test_api.py)
    with pytest.raises(NotImplementedError, match="async tensor parallelism with compile=on"):
        Plan.parse("tp=2,sp=on,async_tp=on,compile=on").refuse_pending()


# --- equivalence on gloo ranks --------------------------------------------------------------

def test_equivalence_two_ranks():
    f64 = torch.float64
    cases = [
        ("gpt tp=2 sp async f64", "tiny", {}, "tp=2,sp=on,async_tp=on", f64),
        ("llama tp=2 sp async, full recompute f64", "tiny_llama", {},
         "tp=2,sp=on,async_tp=on,recompute=full", f64),
    ]
    if _has_transformers():
        cases.append(("hf llama tp=2 sp async f64", hf_llama, {}, "tp=2,sp=on,async_tp=on",
                      f64))
    assert_passed(on_ranks(2, equivalence_worker, cases, timeout=400), cases)


def test_equivalence_four_ranks():
    f64 = torch.float64
    cases = [
        ("llama tp=4 sp async f64", "tiny_llama", dict(n_kv_head=4), "tp=4,sp=on,async_tp=on",
         f64),
        ("gpt tp=4 sp async f64", "tiny", {}, "tp=4,sp=on,async_tp=on", f64),
        ("llama tp=2 x pp=2 sp async 1f1b f64", "tiny_llama", {},
         "tp=2,pp=2,mb=2,sp=on,async_tp=on", f64),
    ]
    assert_passed(on_ranks(4, equivalence_worker, cases, timeout=400), cases)
