"""passes.lowering.collectives: graph-level (no process group: the names are made up)."""

from __future__ import annotations

import functools
import operator

import pytest
import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from core import meta, ops
from core.ops import CheckpointedRegion
from core.plan import Plan
from partitioner import models
from partitioner.capture import capture
from partitioner.compiler import compile_rank
from passes import PassContext
from passes.lowering.collectives import LoweredCollectives, lower_collectives


@functools.lru_cache(maxsize=None)
def _captured():
    model, (ids,) = models.tiny(batch=2)
    return capture(model, (ids,))


def _stage(plan: str):
    plan = Plan.parse(plan).resolve(2)
    return compile_rank(_captured(), plan, 0, "meta").stages[0].gm, plan


def _collective_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for m in gm.modules() if isinstance(m, fx.GraphModule) for n in m.graph.nodes
            if n.op == "call_function" and n.target in ops.COLLECTIVES]


def test_without_group_names_the_graph_is_left_as_it_is():
    gm, plan = _stage("tp=2")
    code = gm.code
    assert lower_collectives(gm, PassContext(plan=plan, coords={}, group_names=None)) is gm
    assert gm.code == code and meta.LOWERED_COLLECTIVES not in gm.meta


def test_each_collective_names_its_group_and_the_sized_ones_their_size():
    gm, plan = _stage("tp=2")
    before = len(_collective_nodes(gm))
    lower_collectives(gm, PassContext(plan=plan, coords={}, group_names={"tp": "5"}))
    record = gm.meta[meta.LOWERED_COLLECTIVES]
    fused = [n for n in gm.graph.nodes if n.target is ops.copy_matmul]
    nodes = _collective_nodes(gm)
    # each column entry read by linears is now one copy_matmul (test below), naming its group
    assert len(nodes) + len(fused) == before > 0 and len(fused) == len(record.overlapped) > 0
    assert {n.args[1] for n in nodes} == {"5"} == {n.args[3] for n in fused}
    for node in nodes:
        assert node.kwargs == ({"group_size": 2} if node.target in ops.SIZED else {})
    assert record == LoweredCollectives(groups=(("tp", "5"),), fixed=before, removed=(),
                                        overlapped=record.overlapped)
    with pytest.raises(ValueError, match="lowered twice"):
        lower_collectives(gm, PassContext(plan=plan, coords={}, group_names={"tp": "5"}))


@pytest.mark.parametrize("plan, fused", [("tp=2", True), ("tp=2,compile=on", False),
                                          ("tp=2,pp=2,mb=2,schedule=zb-h1", False)])
def test_running_programs_overlap_each_column_entrys_gradient_all_reduce(plan, fused):
    """A copy_to_region read only by linears (q, k, v; the MLP's up) becomes one copy_matmul
    taking their weights and biases, in eager programs whose backward runs in one piece."""
    parsed = Plan.parse(plan)
    world = parsed.tp * parsed.pp
    gm = compile_rank(_captured(), parsed.resolve(world), 0, "meta").stages[0].gm
    copies = {n.name: [u.args[1].name for u in n.users] for n in gm.graph.nodes
              if n.target is ops.copy_to_region and n.args[1] == "tp"
              and all(u.target is torch.ops.aten.linear.default for u in n.users)}
    lower_collectives(gm, PassContext(plan=parsed.resolve(world), coords={},
                                      group_names={"tp": "5", "pp": "6"}))
    record = gm.meta[meta.LOWERED_COLLECTIVES]
    if not fused:
        assert record.overlapped == () and not any(n.target is ops.copy_matmul
                                                   for n in gm.graph.nodes)
        return
    assert sorted(record.overlapped) == sorted(copies) and len(copies) >= 2
    weights = sorted([w.name for w in n.args[1]] for n in gm.graph.nodes
                     if n.target is ops.copy_matmul)
    assert weights == sorted(copies.values())
    assert not any(n.target is torch.ops.aten.linear.default and n.args[0].target is
                   ops.copy_to_region for n in gm.graph.nodes)
    gm.graph.lint()


def test_a_dimension_without_a_group_name_is_an_error():
    gm, plan = _stage("tp=2")
    with pytest.raises(ValueError, match="group_names has no group"):
        lower_collectives(gm, PassContext(plan=plan, coords={}, group_names={}))


def test_collectives_over_a_dimension_of_size_one_are_removed():
    graph = fx.Graph()
    x = graph.placeholder("x")
    summed = graph.call_function(ops.all_reduce, (x, "dp"))  # dp is 1 under tp=2 on 2 ranks
    copied = graph.call_function(ops.copy_to_region, (summed, "tp"))
    graph.output(graph.call_function(operator.mul, (copied, 2)))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    plan = Plan(tp=2).resolve(2)
    lower_collectives(gm, PassContext(plan=plan, coords={}, group_names={"tp": "3"}))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [ops.copy_to_region, operator.mul]
    assert next(n for n in gm.graph.nodes if n.target is ops.copy_to_region).args == (x, "3")
    assert gm.meta[meta.LOWERED_COLLECTIVES].removed == ("all_reduce_default",)


def test_sp_gathers_are_saved_as_shards_only_in_programs_that_run():
    gm, plan = _stage("tp=2,sp=on")
    gathers = [n.name for n in gm.graph.nodes if n.target is ops.gather_for_region]
    assert gathers  # unlowered (what reports show): the gathers are in the stage graph
    lower_collectives(gm, PassContext(plan=plan, coords={}, group_names={"tp": "5"}))
    assert gm.meta[meta.LOWERED_COLLECTIVES].saved_as_shards == tuple(gathers)
    assert not [n for n in gm.graph.nodes if n.target is ops.gather_for_region]
    regions = [m for m in gm.modules() if isinstance(m, CheckpointedRegion)]
    assert len(regions) == len(gathers)
    for region in regions:
        inner = [n.target for n in region.region.graph.nodes if n.op == "call_function"]
        assert inner[0] is ops.gather_for_region
        assert set(inner[1:]) == {torch.ops.aten.linear.default}
        # q, k, v: only the gather is recomputed, the linears' outputs are kept; one reader
        # (fc1, the LM head): plain checkpoint, whose early stop never reruns the linear
        assert region.recomputed == ((ops.gather_for_region,) if len(inner) > 2 else ())
        assert region.region.graph.find_nodes(op="call_function",
                                              target=ops.gather_for_region)[0].args[1] == "5"
    assert sorted(len(r.region.graph.find_nodes(op="call_function",
                                                target=torch.ops.aten.linear.default))
                  for r in regions) == [1, 1, 1, 3, 3]  # 2 blocks: qkv and fc1; the LM head


def test_lowered_collectives_have_shapes_without_a_group():
    with FakeTensorMode():
        x = torch.empty(2, 4)
        assert ops.all_gather(x, "5", 1, group_size=2).shape == (2, 8)
        assert ops.gather_for_region(x, "5", 0, group_size=2).shape == (4, 4)
        assert ops.reduce_scatter(x, "5", 1, group_size=2).shape == (2, 2)
        assert ops.scatter(x, "5", 0, group_size=2).shape == (1, 4)
        assert ops.all_to_all(x, "5", 1, 0, group_size=2).shape == (4, 2)
        with pytest.raises(ValueError, match="passes.lowering.collectives"):
            ops.all_gather(x, "tp", 1)


def test_the_lowered_code_is_current_and_graphs_without_collectives_keep_theirs(monkeypatch):
    gm, plan = _stage("tp=2")
    lower_collectives(gm, PassContext(plan=plan, coords={}, group_names={"tp": "5"}))
    assert gm.code == gm.graph.python_code(root_module="self").src
    assert "'5'" in gm.code

    compiled = []
    monkeypatch.setattr(fx.GraphModule, "recompile", lambda self: compiled.append(self))
    gm, plan = _stage("dp=2")  # (compiled while recompile is stubbed: code is not checked)
    compiled.clear()
    lower_collectives(gm, PassContext(plan=plan, coords={}, group_names={"dp": "5"}))
    assert compiled == [] and gm.meta[meta.LOWERED_COLLECTIVES].fixed == 0
