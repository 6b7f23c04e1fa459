"""Sequence parallelism: graph-level checks of the pass, bad input, equivalence with the
single-device model on real gloo ranks, and the activation memory it saves."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections import Counter

import pytest
import torch

from partitioner import models
from core.meta import LAYOUTS, SP_RECORD, TP_PLACEMENT, TP_RECORD
from core.placement import Placements, Shard
from partitioner.compiler import compile_rank, layouts_from_capture
from partitioner.report.program import collective_kind
from core.plan import Plan
from passes import PassContext, PassError
from passes.sequence_parallel import SequenceNotDivisible, sequence_parallel
from passes.tensor_parallel import tensor_parallel
from passes.tensor_parallel.record import LOOKUP_SUM, REGION_ENTRY, REGION_EXIT
from ranks import on_ranks
from core.ops import copy_to_region, scatter
from equivalence import assert_passed, equivalence_worker
from model_zoo import capture_once, hf_gpt2, hf_llama

aten = torch.ops.aten


def _program(factory, plan: str, rank: int = 0, **overrides):
    plan = Plan.parse(plan)
    world = plan.tp * plan.pp * (plan.dp or 1)
    return compile_rank(capture_once(factory, **overrides), plan.resolve(world), rank, "meta")


def _collectives(program) -> Counter:
    return Counter(collective_kind(n) for _, n in program.nodes() if collective_kind(n))


def _residual_adds(program) -> list[torch.fx.Node]:
    return [n for _, n in program.nodes() if n.target is aten.add.Tensor
            and n.meta["val"].dim() == 3 and n.meta["val"].shape[-1] == 64]


# --- graph-level ----------------------------------------------------------------------------

def test_llama_all_reduces_become_reduce_scatters_and_the_residual_stream_is_split():
    off = _program("tiny_llama", "tp=2")
    on = _program("tiny_llama", "tp=2,sp=on", rank=1)
    blocks = 2
    # (the vocab-parallel word embedding's all-reduce and the LM head's logits all-gather)
    assert _collectives(off) == Counter({"all_reduce": 2 * blocks + 1, "all_gather": 1})
    # One reduce-scatter per row region and after the embedding, one all-gather per column
    # region entry (the LM head's included) and the logits' all-gather over the vocabulary.
    assert _collectives(on) == Counter({"reduce_scatter": 2 * blocks + 1,
                                        "all_gather": 2 * blocks + 2})
    adds = _residual_adds(on)
    assert adds and all(tuple(n.meta["val"].shape) == (4, 8, 64) for n in adds)
    assert all(n.meta[TP_PLACEMENT] == Placements.of(tp=Shard(1)) for n in adds)
    assert all(tuple(n.meta["val"].shape) == (4, 16, 64) for n in _residual_adds(off))
    # Norm weights broadcast over the tokens: read through copy_to_region so their gradients
    # are summed over the sequence shards.
    copied = {n.args[0].target for _, n in on.nodes() if n.target is copy_to_region
              and n.args[0].op == "get_attr"}
    assert copied == {"ln_f.weight"} | {
        f"blocks.{i}.ln_{j}.weight" for i in range(blocks) for j in (1, 2)}
    assert not any(n.target is scatter for _, n in on.nodes())
    # A replicated embedding runs whole (its table's gradient stays complete on every rank);
    # its output is sliced locally, without communication, where the zone reads it.
    whole = _program("tiny_llama", "tp=2,sp=on,rules=wte:replicate;lm_head:replicate")
    scatters = [n for _, n in whole.nodes() if n.target is scatter]
    assert [n.args[0].target for n in scatters] == [aten.embedding.default]


def test_the_pass_reads_the_tensor_parallel_record_and_writes_its_own():
    program = _program("tiny_llama", "tp=2,sp=on")
    gm = program.stages[0].gm
    tp_record, sp_record = gm.meta[TP_RECORD], gm.meta[SP_RECORD]
    # every region entry and exit (and the vocab-parallel lookup's sum) the TP pass recorded
    assert set(sp_record.replaced) == {c.node for c in tp_record.inserted(
        REGION_ENTRY, REGION_EXIT, LOOKUP_SUM)}
    nodes = {n.name: n for n in gm.graph.nodes}
    assert not set(sp_record.replaced) & set(nodes)  # gone from the graph
    # one reduce-scatter per row region and the embedding, one gather per column region entry
    # (the LM head's included), one gradient-summing copy per norm weight
    assert Counter(c.kind for c in sp_record.collectives) == Counter(
        {"reduce_scatter": 5, "gather_for_region": 5, "copy_to_region": 5})
    assert all(c.node in nodes for c in sp_record.collectives)
    # (the kernels pass, which runs later, fuses some zone nodes away)
    zone = [nodes[name] for name in sp_record.zone if name in nodes]
    assert len(zone) >= 4 + 4 * 2  # the reduce-scatters, the residual adds and norm outputs
    assert all(n.meta[TP_PLACEMENT] == Placements.of(tp=Shard(1)) for n in zone
               if n.meta["val"].dim() == 3)
    assert sp_record.stepped_aside is None


def test_the_pass_needs_the_tensor_parallel_record():
    captured = capture_once("tiny_llama")
    plan = Plan.parse("tp=2,sp=on").resolve(2)
    gm = torch.fx.GraphModule(captured.gm, captured.gm.graph)  # the graph, no records
    with pytest.raises(PassError, match="runs after tensor_parallel"):
        sequence_parallel(gm, PassContext(plan=plan, coords={"tp": 0}))


def test_gpt2_flattened_tokens_are_viewed_around_the_collectives():
    """HF Conv1D views (batch, seq, h) as (batch*seq, h): the flattened values stay split along
    the sequence, and their collectives act on a (batch, seq, h) view."""
    program = _program(hf_gpt2, "tp=2,sp=on")
    kinds = _collectives(program)
    assert kinds["reduce_scatter"] == 4 + 1 and "all_reduce" not in kinds
    for _, node in program.nodes():
        if collective_kind(node) in ("reduce_scatter", "all_gather") and node.args[2] != -1:
            # (-1: the logits' all-gather over the vocabulary)
            assert node.args[2] == 1 and node.args[0].meta["val"].dim() == 3, node.name
    flat = [n for _, n in program.nodes() if n.op == "call_function"
            and n.meta.get(TP_PLACEMENT) == Placements.of(tp=Shard(0))]
    assert flat and all(n.meta["val"].shape[0] == 4 * 16 // 2 for n in flat)


def test_pipeline_sends_sequence_shards():
    program = _program("tiny_llama", "tp=2,pp=2,mb=2,sp=on")
    crossing = [v for v in program.pipeline.values.values() if v.producer >= 0]
    assert crossing and all(v.shape[1] == 16 // 2 for v in crossing)


def test_sequence_not_divisible_by_tp_is_a_clear_error():
    with pytest.raises(PassError, match=r"sequence length 15 is not divisible by tp=2.*sp=off"):
        _program("tiny_llama", "tp=2,sp=on", seq=15)


def test_a_forward_only_program_of_a_length_sp_cannot_split_keeps_the_tp_graph(caplog):
    captured = capture_once("tiny_llama", seq=15)
    plan = Plan.parse("tp=2,sp=on").resolve(2)
    gm = copy.deepcopy(captured.gm)
    gm.meta[LAYOUTS] = layouts_from_capture(captured)
    ctx = PassContext(plan=plan, coords={"tp": 0}, forward_only=True)
    gm = tensor_parallel(gm, ctx)
    before = [(n.name, n.target) for n in gm.graph.nodes]
    with caplog.at_level(logging.WARNING):
        gm = sequence_parallel(gm, ctx)
    assert [(n.name, n.target) for n in gm.graph.nodes] == before
    record = gm.meta[SP_RECORD]
    assert "sequence length 15 is not divisible by tp=2" in record.stepped_aside
    assert not record.zone and not record.collectives
    assert "this forward runs without sp" in caplog.text
    with pytest.raises(SequenceNotDivisible, match="sequence length 15"):  # training refuses
        sequence_parallel(gm, dataclasses.replace(ctx, forward_only=False))


def test_sp_off_leaves_the_tensor_parallel_graph_alone():
    assert "reduce_scatter" not in _collectives(_program("tiny", "tp=2"))


# --- equivalence on gloo ranks --------------------------------------------------------------

def test_equivalence_two_ranks():
    f64 = torch.float64
    cases = [
        ("gpt tp=2 sp f64", "tiny", {}, "tp=2,sp=on", f64),
        ("gpt tp=2 sp f32", "tiny", {}, "tp=2,sp=on", torch.float32),
        ("llama tp=2 sp f64", "tiny_llama", {}, "tp=2,sp=on", f64),
        ("llama fused tp=2 sp f64", "tiny_llama", dict(fused_qkv=True, fused_gate_up=True),
         "tp=2,sp=on", f64),
        ("llama vocab lm_head, padded, sp, full recompute f64", "tiny_llama",
         dict(vocab_size=511), "tp=2,sp=on,rules=lm_head:vocab,recompute=full", f64),
    ]
    try:
        import transformers  # noqa: F401
    except ImportError:
        pass
    else:
        cases += [("hf gpt2 tp=2 sp f64", hf_gpt2, {}, "tp=2,sp=on", f64),
                  ("hf llama tp=2 sp f32", hf_llama, {}, "tp=2,sp=on", torch.float32)]
    assert_passed(on_ranks(2, equivalence_worker, cases, timeout=300), cases)


def test_equivalence_four_ranks():
    f64 = torch.float64
    cases = [
        ("llama tp=4 sp f64", "tiny_llama", dict(n_kv_head=4), "tp=4,sp=on", f64),
        ("gpt tp=4 sp f32", "tiny", {}, "tp=4,sp=on", torch.float32),
        ("gpt tp=2 x dp=2 sp f64", "tiny", {}, "tp=2,dp=2,sp=on", f64),
        ("llama fused tp=2 x dp=2 sp f32", "tiny_llama",
         dict(fused_qkv=True, fused_gate_up=True), "tp=2,dp=2,sp=on", torch.float32),
        ("llama tp=2 x pp=2 sp f64", "tiny_llama", {}, "tp=2,pp=2,mb=2,sp=on", f64),
    ]
    try:
        import transformers  # noqa: F401
    except ImportError:
        pass
    else:
        cases += [("hf llama kv=2 tp=4 sp, vocab rules f64", hf_llama,
                   dict(num_key_value_heads=2), "tp=4,sp=on,rules=model.embed_tokens:vocab;"
                   "lm_head:vocab", f64),
                  ("hf llama tp=2 x pp=2 sp zero full f64", hf_llama, {},
                   "tp=2,pp=2,mb=2,sp=on,zero=1,recompute=full", f64),
                  ("hf gpt2 tp=2 x dp=2 sp f32", hf_gpt2, {}, "tp=2,dp=2,sp=on",
                   torch.float32)]
    assert_passed(on_ranks(4, equivalence_worker, cases, timeout=300), cases)


# --- activation memory ----------------------------------------------------------------------

def _saved_activation_bytes(plans):
    """Bytes of distinct tensors autograd saves during one step's forward, per plan."""
    from partitioner import parallelize
    from partitioner.check import lm_loss

    out = {}
    for plan in plans:
        torch.manual_seed(0)
        model, (ids,) = models.tiny(batch=2, seq=64, n_layer=2, vocab_size=64)
        pm = parallelize(model, plan, (ids,), loss_fn=lm_loss)
        params = {p.data_ptr() for p in pm.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            pm.step(ids, target=torch.roll(ids, -1, 1))
        out[plan] = sum(seen.values())
    return out


def test_sequence_parallel_cuts_activation_memory():
    """Korthikanti et al.: sp stores the 10 sbh per layer that tp alone replicates split over
    tp; with tp=2 the per-rank activations must fall well below tp alone."""
    for by_plan in on_ranks(2, _saved_activation_bytes, ["tp=2", "tp=2,sp=on"]):
        assert by_plan["tp=2,sp=on"] < 0.85 * by_plan["tp=2"], by_plan


def _forward_of_any_length():
    """`pm(ids)` of a length sp cannot split runs without sp (same numbers); `step` refuses."""
    from partitioner import parallelize
    from partitioner.check import lm_loss

    torch.manual_seed(0)
    model, (ids,) = models.tiny_llama(seq=16)
    model = model.double()
    pm = parallelize(model, "tp=2,sp=on", (ids,), loss_fn=lm_loss)
    odd = ids[:, :15]
    error = (pm(odd) - model(odd)).abs().max().item()
    try:
        pm.step(odd, target=odd)
    except PassError as refused:
        return error, str(refused)
    return error, None


def test_forward_of_a_length_sp_cannot_split_runs_without_sp():
    for error, refused in on_ranks(2, _forward_of_any_length):
        assert error < 1e-12
        assert refused is not None and "sequence length 15 is not divisible by tp=2" in refused
