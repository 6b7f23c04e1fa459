import copy

import pytest
import torch

from core import meta
from core.layout import rank_coords
from core.plan import Plan
from partitioner.capture import capture
from partitioner.compiler import compile_rank, layouts_from_capture
from partitioner.models import tiny, tiny_llama
from partitioner.report.program import cut_summary
from partitioner.state import set_tensor
from passes import PassContext, PassError
from passes.registry import run_passes
from passes.pipeline_split import block_prefix, segment_of_nodes
from model_zoo import hf_gpt2, hf_llama


def _captured(factory, **kw):
    with torch.device("meta"):
        model, (ids,) = factory(**kw)
    return capture(model, (ids,))


@pytest.mark.parametrize("factory, prefix", [(tiny, "blocks"), (hf_llama, "model.layers"),
                                             (hf_gpt2, "transformer.h")])
def test_segments_are_pre_blocks_post(factory, prefix):
    gm = _captured(factory).gm
    assert block_prefix(gm) == prefix
    names, assignment = segment_of_nodes(gm)
    assert names == ["pre", f"{prefix}.0", f"{prefix}.1", "post"]
    order = [assignment[n] for n in gm.graph.nodes if n in assignment]
    assert order == sorted(order)  # contiguous in graph order


def test_one_block_is_a_segment_and_pp_puts_parameters_on_every_stage():
    """A one-layer model has segments pre, blocks.0, post (it was cut after its first node,
    leaving stage 0 without parameters: a rank whose optimizer got an empty list)."""
    captured = _captured(tiny, n_layer=1, n_embd=8, n_head=2, tie_embeddings=False)
    names, _ = segment_of_nodes(captured.gm)
    assert names == ["pre", "blocks.0", "post"]
    for plan in (Plan(pp=2).resolve(2), Plan(tp=2, sp=True, pp=2).resolve(4)):
        for rank in range(plan.world_size):
            program = compile_rank(captured, plan, rank, "meta")
            held = [n for stage in program.stages for n in stage.gm.graph.nodes
                    if n.op == "get_attr"]
            assert held, (plan, rank)


def test_stages_hold_their_blocks_and_values_cross_cuts():
    captured = _captured(tiny, n_layer=4)
    plan = Plan(pp=2).resolve(2)
    first, second = (compile_rank(captured, plan, r, "meta") for r in range(2))
    pipeline = first.pipeline
    assert [s.index for s in first.stages] == [0] and [s.index for s in second.stages] == [1]
    names0 = {n.target for n in first.stages[0].gm.graph.find_nodes(op="get_attr")}
    names1 = {n.target for n in second.stages[0].gm.graph.find_nodes(op="get_attr")}
    assert "blocks.0.attn.q_proj.weight" in names0 and "blocks.3.attn.q_proj.weight" in names1
    assert "wte.weight" in names0 and "wte.weight" in names1  # tied embedding / LM head
    assert pipeline.holders("wte.weight") == [0, 1]
    assert pipeline.holders("blocks.0.ln_1.weight") == [0]
    crossing = [v for v in pipeline.values.values() if v.producer == 0]
    assert len(crossing) == 1 and crossing[0].shape == (4, 16, 64)  # the residual stream
    assert set(first.layouts) < set(first.all_layouts)
    for stage in first.stages + second.stages:
        stage.gm.graph.lint()


def test_values_made_from_constants_cross_without_gradients():
    """Llama's RoPE tables are computed from positions alone: the second stage must not
    differentiate through them nor send their gradients back; the residual stream carries
    one."""
    captured = _captured(tiny_llama, n_layer=4)
    program = compile_rank(captured, Plan(pp=2).resolve(2), 0, "meta")
    crossing = {value.name: value for value in program.pipeline.values.values()
                if value.producer == 0}
    residual = next(name for name, value in crossing.items() if value.shape == (4, 16, 64))
    assert crossing.pop(residual).differentiable
    assert crossing and all(value.dtype.is_floating_point and not value.differentiable
                            for value in crossing.values()), crossing
    lines = cut_summary(program)
    assert [line for line in lines if "no gradient" in line] == \
        [line for line in lines if line.split(":")[0].strip() in crossing]


def test_interleaved_virtual_stages_and_pinned_cuts():
    captured = _captured(tiny_llama, n_layer=6)
    plan = Plan(pp=2, vpp=2, schedule="interleaved-1f1b", microbatches=2).resolve(2)
    program = compile_rank(captured, plan, 1, "meta")
    assert [s.index for s in program.stages] == [1, 3]
    pinned = Plan.parse("pp=2,rules=blocks.5:pp_split").resolve(2)
    program = compile_rank(captured, pinned, 1, "meta")
    targets = {n.target for n in program.stages[0].gm.graph.find_nodes(op="get_attr")}
    assert not any(t.startswith(("blocks.4.", "blocks.3.")) for t in targets)
    assert any(t.startswith("blocks.5.") for t in targets)


def test_zb_v_places_its_stages_in_a_v():
    """Rank r runs stages r and 2p-1-r: rank 0 the embedding and the head (one tied tensor, held
    on one pp rank), rank 1 the two middle stages, whose crossing value stays on the rank."""
    captured = _captured(tiny, n_layer=4)
    plan = Plan(pp=2, vpp=2, schedule="zb-v", microbatches=2).resolve(2)
    first, second = (compile_rank(captured, plan, r, "meta") for r in range(2))
    assert [s.index for s in first.stages] == [0, 3] and [s.index for s in second.stages] == [1, 2]
    pipeline = first.pipeline
    assert pipeline.placement == (0, 1, 1, 0) and pipeline.rank_of(3) == 0
    assert pipeline.holders("wte.weight") == [0]  # embedding (stage 0) and head (stage 3)


def test_given_stage_starts_fix_the_cut():
    """The cut follows costs, which depend on the input shape; parameters must not move between
    the programs of one model, so ParallelModel compiles later shapes with the first program's
    stage starts, which override the cost model's own choice."""
    plan = Plan.parse("pp=2").resolve(2)
    model, (ids,) = tiny_llama(n_layer=3)
    captured = capture(model, (ids,))
    own = compile_rank(captured, plan, 0, "meta").pipeline
    assert own.stage_starts == ("pre", "blocks.2")
    given = compile_rank(captured, plan, 0, "meta", stage_starts=("pre", "blocks.1")).pipeline
    assert given.stage_starts == ("pre", "blocks.1")
    assert any(name.startswith("blocks.1.") for name in given.stage_params[1])
    assert not any(name.startswith("blocks.1.") for name in own.stage_params[1])
    with pytest.raises(PassError, match="do not hold the stage starts"):
        compile_rank(captured, plan, 0, "meta", stage_starts=("pre", "blocks.7"))


def test_more_stages_than_segments_is_a_clear_error():
    captured = _captured(tiny)  # pre, 2 blocks, post
    with pytest.raises(PassError, match=r"pp\*vpp=4\*2=8 stages but the model has only 4"):
        compile_rank(captured, Plan(pp=4, vpp=2, schedule="interleaved-1f1b",
                                    microbatches=4).resolve(4), 0, "meta")
    with pytest.raises(PassError, match=r"zb-v puts two stages on every rank: use pp <= 2"):
        compile_rank(captured, Plan(pp=4, vpp=2, schedule="zb-v", microbatches=4).resolve(4),
                     0, "meta")
    with pytest.raises(PassError, match="matches no cuttable segment"):
        compile_rank(captured, Plan.parse("pp=2,rules=decoder.*:pp_split").resolve(2), 0,
                     "meta")


@pytest.mark.parametrize("plan, starts, held", [
    # stage starts and the blocks of rank 0's stages
    ("pp=2,stage_layers=2/3", ("pre", "blocks.2"), [{"blocks.0", "blocks.1"}]),
    ("pp=2,vpp=2,schedule=interleaved-1f1b,mb=2,stage_layers=1/2/1/1",
     ("pre", "blocks.1", "blocks.3", "blocks.4"), [{"blocks.0"}, {"blocks.3"}]),
    ("pp=2,vpp=2,schedule=interleaved-1f1b,mb=2,stage_layers=0/2/3/0",
     ("pre", "blocks.0", "blocks.2", "post"), [set(), {"blocks.2", "blocks.3", "blocks.4"}]),
])
def test_stage_layers_fix_the_cut(plan, starts, held):
    """The layout, not the costs, places the blocks; the embedding stays with the first stage
    and the head with the last, a stage of 0 layers holding only them."""
    captured = _captured(tiny_llama, n_layer=5)
    resolved = Plan.parse(plan).resolve(2)
    first, last = (compile_rank(captured, resolved, r, "meta") for r in (0, 1))
    assert first.pipeline.stage_starts == starts
    blocks = [{".".join(n.target.split(".")[:2]) for n in stage.gm.graph.find_nodes(op="get_attr")
               if n.target.startswith("blocks.")} for stage in first.stages]
    assert blocks == held
    assert any(n.target == "wte.weight" for n in first.stages[0].gm.graph.find_nodes(
        op="get_attr"))
    assert any(n.target == "lm_head.weight" for n in last.stages[-1].gm.graph.find_nodes(
        op="get_attr"))


def test_stage_layers_that_do_not_fit_the_model_are_clear_errors():
    captured = _captured(tiny_llama, n_layer=5)
    with pytest.raises(PassError, match=r"stage_layers=1/2 places 3 layers but the model has 5 "
                                        r"\(blocks.0..blocks.4\); give 2 counts summing to 5"):
        compile_rank(captured, Plan.parse("pp=2,stage_layers=1/2").resolve(2), 0, "meta")
    with pytest.raises(PassError, match="gives both stage_layers and pp_split rules"):
        compile_rank(captured, Plan.parse("pp=2,stage_layers=1/4,rules=blocks.3:pp_split")
                     .resolve(2), 0, "meta")


def test_full_recompute_wraps_each_block():
    captured = _captured(tiny, n_layer=3)
    program = compile_rank(captured, Plan(recompute="full").resolve(1), 0, "meta")
    calls = [n for n in program.stages[0].gm.graph.nodes if n.op == "call_module"]
    assert [c.target for c in calls] == [f"recompute_blocks_{i}" for i in range(3)]
    program = compile_rank(captured, Plan(recompute="selective").resolve(1), 0, "meta")
    assert sum(n.meta.get(meta.RECOMPUTE) == "selective"
               for n in program.stages[0].gm.graph.nodes) == 3


def test_lowering_returns_a_parent_with_one_submodule_per_stage_that_runs_like_the_model():
    """The lowered graph has split_module's shape: the parent calls stage_0, stage_1 and keeps
    the model's calling convention, so with real weights bound it equals the model."""
    torch.manual_seed(0)
    model, (ids,) = tiny(n_layer=4)
    captured = capture(model, (ids,))
    gm = copy.deepcopy(captured.gm)
    gm.meta[meta.LAYOUTS] = layouts_from_capture(captured)
    plan = Plan(pp=2).resolve(2)
    parent = run_passes(gm, PassContext(plan=plan, coords=rank_coords(plan, 0)))
    assert [name for name, _ in parent.named_children()] == ["stage_0", "stage_1"]
    assert [n.target for n in parent.graph.find_nodes(op="call_module")] == ["stage_0",
                                                                             "stage_1"]
    pipeline = parent.meta[meta.PIPELINE_RECORD]
    assert pipeline.stage_starts == parent.meta[meta.PP_SPLIT_RECORD].stage_starts
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for stage in parent.children():
        for node in stage.graph.find_nodes(op="get_attr"):
            set_tensor(stage, node.target, tensors[node.target], node.target not in
                       dict(model.named_parameters()))
    with torch.no_grad():
        torch.testing.assert_close(parent(ids), model(ids), rtol=0, atol=0)
    log = {outcome.name: outcome.status for outcome in parent.meta[meta.PASS_LOG]}
    assert log["pipeline_split"] == log["lowering"] == "ran"
    assert log["tensor_parallel"] == "skipped" and log["context_parallel"] == "skipped"
