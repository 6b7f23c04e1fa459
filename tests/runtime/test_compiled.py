"""compile=on: every rank's stage graphs through inductor, checked against one device.

One spawn runs every plan on one-layer models (each rank pays torch's import and every compile,
tens of seconds per graph on a cold inductor cache, so the suite checks each strategy once:
tp, sp with selective recompute inside the compiled graph, pp 1F1B and dp with ZeRO-1 on the
in-repo GPT, tp with sp on Hugging Face Llama), then reports the graph breaks dynamo counted over
all of them and one program's compile records. PARTITIONER_COMPILE_TESTS=full adds every plan
on both models, two layers, and float64 (a 15-minute run on two cores)."""

from __future__ import annotations

import importlib.util
import logging
import os

import torch
from torch import fx

from equivalence import assert_passed, equivalence_worker
from model_zoo import hf_llama
from runtime import spawn
from runtime.compiled import CompiledGraphs

PLANS = ("tp=2", "tp=2,sp=on", "pp=2,mb=2,schedule=1f1b", "dp=2,zero=1")


def _cases():
    f32 = torch.float32
    hf = importlib.util.find_spec("transformers") is not None
    if os.environ.get("PARTITIONER_COMPILE_TESTS") == "full":
        cases = [(f"gpt {plan} compile f32", "tiny", {}, f"{plan},compile=on", f32)
                 for plan in PLANS]
        cases.append(("gpt tp=2,sp=on compile f64", "tiny", {}, "tp=2,sp=on,compile=on",
                      torch.float64))
        cases.append(("gpt tp=2 recompute=selective compile f32", "tiny", {},
                      "tp=2,recompute=selective,compile=on", f32))
        return cases + ([(f"hf llama {plan} compile f32", hf_llama, {}, f"{plan},compile=on",
                          f32) for plan in PLANS] if hf else [])
    one_layer = {"n_layer": 1}
    cases = [
        ("gpt tp=2 compile f32", "tiny", one_layer, "tp=2,compile=on", f32),
        # checkpointed attention inside the compiled graph (our node marks must not read as
        # torch's own "recompute" policy key)
        ("gpt tp=2,sp=on,recompute=selective compile f32", "tiny", one_layer,
         "tp=2,sp=on,recompute=selective,compile=on", f32),
        ("gpt pp=2 1f1b compile f32", "tiny", {"n_layer": 2}, "pp=2,mb=2,schedule=1f1b,compile=on",
         f32),
        ("gpt dp=2,zero=1 compile f32", "tiny", one_layer, "dp=2,zero=1,compile=on", f32),
    ]
    if hf:
        cases.append(("hf llama tp=2,sp=on compile f32", hf_llama, {"num_hidden_layers": 1},
                      "tp=2,sp=on,compile=on", f32))
    return cases


def _compiled_worker(cases):
    """Every case, then: dynamo's graph-break counts over all of them, the compile records
    and explain() of one tp=2,sp=on program (its graphs are in inductor's cache by then: how
    many it found there), and every line logged about a graph run eagerly."""
    from torch._dynamo.utils import counters

    from partitioner import models, parallelize
    from partitioner.check import lm_loss

    eager_lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: eager_lines.append(record.getMessage())
    logging.getLogger("partitioner.compile").addHandler(handler)
    reports = equivalence_worker(cases)
    breaks = {reason: count for reason, count in counters["graph_break"].items()}
    inductor = counters["inductor"]
    hits_before = inductor["fxgraph_cache_hit"]
    model, (ids,) = models.tiny(n_layer=1)
    pm = parallelize(model, "tp=2,sp=on,compile=on", example_inputs=(ids,), loss_fn=lm_loss)
    pm.step(ids, target=ids.roll(-1, 1))
    records = [(r.graphs, r.collectives, r.eager, r.compile_s)
               for r in pm.executor.compiled.records()]
    cache = {"bypassed": inductor["fxgraph_cache_bypass"],
             "hits_in_last": inductor["fxgraph_cache_hit"] - hits_before}
    return reports, breaks, records, pm.explain(), eager_lines, cache


def test_compiled_ranks_match_one_device_without_graph_breaks():
    cases = _cases()
    # fresh ranks, not the session's pool: dynamo's counters and inductor's state are
    # process-wide, and a pool rank would carry them into (and out of) this test
    results = spawn(2, _compiled_worker, cases, timeout=1500)
    assert_passed([reports for reports, *_ in results], cases)
    for _, breaks, records, explained, eager_lines, cache in results:
        # inductor's FX graph cache keys every graph (none bypassed it), and the last program,
        # whose graphs a case compiled earlier in this process, found both there
        assert cache["bypassed"] == 0 and cache["hits_in_last"] == 2, cache
        assert eager_lines == [], eager_lines  # every graph of every case ran compiled
        assert breaks == {}, f"graph breaks: {breaks}"
        assert records, "no graph ran compiled"
        for graphs, collectives, eager, compile_s in records:
            assert eager is None
            assert graphs == 1  # the whole stage, collectives inside: no break at them
            assert collectives > 0 and compile_s > 0
        assert "compile=on:" in explained and "s compiling" in explained


def _breaking_graph() -> fx.GraphModule:
    """x * 2 + 1 with a dynamo graph break between (fullgraph cannot take it)."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    doubled = graph.call_function(torch.mul, (x, 2))
    graph.call_function(torch._dynamo.graph_break)
    graph.output(graph.call_function(torch.add, (doubled, 1)))
    return fx.GraphModule(torch.nn.Module(), graph)


def test_a_graph_that_cannot_compile_runs_eagerly_with_one_logged_line(caplog):
    gm = _breaking_graph()
    compiled = CompiledGraphs()
    x = torch.arange(4.0)
    with caplog.at_level(logging.WARNING, logger="partitioner.compile"):
        first = compiled(gm, lambda: "stage 0 4", x)
        second = compiled(gm, lambda: "stage 0 4", x)
    torch.testing.assert_close(first, x * 2 + 1)
    torch.testing.assert_close(second, first)
    lines = [r.getMessage() for r in caplog.records if r.name == "partitioner.compile"]
    assert len(lines) == 1 and "stage 0 4 runs eagerly" in lines[0], lines
    (record,) = compiled.records()
    assert record.eager is not None and "eager" in record.summary()
