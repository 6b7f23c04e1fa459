"""The pass registry: one ordered pipeline, a record per pass, failures named like PassManager."""

import dataclasses

import pytest
import torch

from core import meta
from core.layout import rank_coords
from core.plan import NotLanded, Plan
from partitioner.capture import capture
from partitioner.models import tiny
from passes import PassContext, PassError
from passes import registry
from passes.registry import PIPELINE, PassEntry, planned, run_passes


def _graph():
    with torch.device("meta"):
        model, (ids,) = tiny()
    return capture(model, (ids,)).gm


def _context(plan: Plan) -> PassContext:
    return PassContext(plan=plan, coords=rank_coords(plan, 0), device=torch.device("meta"))


def test_the_pipeline_is_one_ordered_list_of_the_design_card():
    assert [entry.name for entry in PIPELINE] == [
        "batch_statistics", "causal_mask", "tensor_parallel", "sequence_parallel",
        "context_parallel", "expert_parallel", "dropout", "mixed_precision", "pipeline_split",
        "recompute", "kernels", "device", "async_tp", "collectives", "lowering"]
    assert [entry.name for entry in PIPELINE if entry.run is None] == []  # every pass landed
    assert [entry.name for entry in planned(Plan(pp=2, recompute="full").resolve(2))] == [
        "causal_mask", "dropout", "pipeline_split", "recompute", "kernels", "device",
        "collectives", "lowering"]


def test_every_entry_is_logged_with_its_record():
    gm = run_passes(_graph(), _context(Plan().resolve(1)))
    log = {outcome.name: outcome for outcome in gm.meta[meta.PASS_LOG]}
    assert list(log) == [entry.name for entry in PIPELINE]
    assert log["causal_mask"].status == "ran" and "attention calls" in log["causal_mask"].summary
    assert log["device"].summary.startswith("device arguments set to meta")
    assert log["pipeline_split"].status == "skipped" and "pp*vpp > 1" in \
        log["pipeline_split"].summary
    assert log["expert_parallel"].status == "skipped"


def test_an_entry_without_its_pass_is_logged_as_not_landed(monkeypatch):
    monkeypatch.setattr(registry, "PIPELINE", _replace("expert_parallel", None))
    gm = run_passes(_graph(), _context(Plan().resolve(1)))
    log = {outcome.name: outcome for outcome in gm.meta[meta.PASS_LOG]}
    assert log["expert_parallel"].status == "not landed"
    assert "ep > 1 is refused by the plan until it lands" in log["expert_parallel"].summary


def _replace(name: str, run) -> tuple[PassEntry, ...]:
    return tuple(dataclasses.replace(entry, run=run) if entry.name == name else entry
                 for entry in PIPELINE)


def test_a_failing_pass_is_named_with_the_passes_before_it(monkeypatch):
    def broken(gm, ctx):
        raise RuntimeError("no such op")

    monkeypatch.setattr(registry, "PIPELINE", _replace("kernels", broken))
    with pytest.raises(PassError, match=r"An error occurred when running the 'kernels' pass "
                                        r"after causal_mask, dropout: RuntimeError: no such op"):
        run_passes(_graph(), _context(Plan().resolve(1)))


def test_pass_errors_pass_through_and_records_may_be_strings(monkeypatch):
    def refusing(gm, ctx):
        raise PassError("device: rule x does not apply; use rules=...")

    monkeypatch.setattr(registry, "PIPELINE", _replace("device", refusing))
    with pytest.raises(PassError, match=r"^device: rule x does not apply"):
        run_passes(_graph(), _context(Plan().resolve(1)))

    def noting(gm, ctx):
        gm.meta[meta.DEVICE_RECORD] = "nothing to move"
        return gm

    monkeypatch.setattr(registry, "PIPELINE", _replace("device", noting))
    gm = run_passes(_graph(), _context(Plan().resolve(1)))
    assert [o.summary for o in gm.meta[meta.PASS_LOG] if o.name == "device"] == [
        "nothing to move"]


def test_plans_asking_for_passes_not_landed_are_refused_before_any_pass():
    with pytest.raises(NotLanded, match="expert tensor parallelism other than 1 or tp"):
        run_passes(_graph(), _context(Plan(tp=4, ep=2, etp=2).resolve(4)))


def _seeded_graph():
    """The captured graph with the parameter layouts compile_rank seeds (tp and the pipeline
    split read them)."""
    from partitioner.compiler import layouts_from_capture

    with torch.device("meta"):
        model, (ids,) = tiny()
    captured = capture(model, (ids,))
    captured.gm.meta[meta.LAYOUTS] = layouts_from_capture(captured)
    return captured.gm


def _fresh_code(gm: torch.fx.GraphModule) -> str:
    return gm.graph.python_code(root_module="self").src


def test_each_graph_is_compiled_once_at_the_end_with_current_code(monkeypatch):
    """Passes mark the graphs they rewrite; run_passes generates their code once, at the end,
    for every graph module of the result (stage submodules and checkpointed regions too)."""
    flat, staged = _seeded_graph(), _seeded_graph()
    compiled = []
    real = torch.fx.GraphModule.recompile
    monkeypatch.setattr(torch.fx.GraphModule, "recompile",
                        lambda self: compiled.append(self) or real(self))
    gm = run_passes(flat, _context(Plan(tp=2).resolve(2)))
    assert compiled == [gm]  # tp, kernels, device and causal_mask rewrote it: one codegen
    assert gm.code == _fresh_code(gm)

    plan = Plan(pp=2, microbatches=2, recompute="full").resolve(2)
    compiled.clear()
    lowered = run_passes(staged, PassContext(plan=plan, coords=rank_coords(plan, 1),
                                               device=torch.device("meta")))
    graphs = [m for m in lowered.modules() if isinstance(m, torch.fx.GraphModule)]
    assert len(graphs) > 3  # parent, 2 stages, checkpointed blocks
    for module in graphs:
        assert module.code == _fresh_code(module), module
    assert staged not in compiled  # the flat graph the stages were cut from is never run


def test_a_pass_called_on_its_own_still_recompiles():
    from passes.kernels import use_kernels

    gm = use_kernels(_graph())
    assert gm.code == _fresh_code(gm)


def test_each_pass_that_ran_logs_its_wall_time():
    gm = run_passes(_seeded_graph(), _context(Plan(tp=2).resolve(2)))
    for outcome in gm.meta[meta.PASS_LOG]:
        assert (outcome.seconds > 0) == (outcome.status == "ran"), outcome
        assert (" ms " in str(outcome)) == (outcome.status == "ran")
