"""Tensor parallelism: graph-level unit tests of the pass, bad inputs, and equivalence with the
single-device model on real gloo ranks (one spawn per world size, cases batched)."""

from __future__ import annotations

import functools
from collections import Counter

import pytest
import torch

from partitioner import models
from partitioner.capture import capture
from partitioner.lower import ShardSpec, collective_kind, compile_rank
from partitioner.plan import Plan
from passes import PassContext, PassError, pass_pipeline
from passes.tensor_parallel import tensor_parallel
from runtime import spawn
from model_zoo import hf_gpt2, hf_llama
from runtime.collectives import copy_to_region


@functools.lru_cache(maxsize=None)
def _captured(factory: str, **overrides):
    model, (ids,) = getattr(models, factory)(**overrides)
    return capture(model, (ids,))


def _program(factory: str, plan: Plan, rank: int = 0, **overrides):
    captured = _captured(factory, **overrides)
    return compile_rank(captured, plan, rank, "meta")


def _collectives(program) -> Counter:
    return Counter(collective_kind(n) for _, n in program.nodes() if collective_kind(n))


def _copies(program) -> int:
    return sum(n.target is copy_to_region for _, n in program.nodes())


# --- graph-level ----------------------------------------------------------------------------

def test_gpt_regions_collectives_and_layouts():
    program = _program("tiny", Plan(tp=2).resolve(2), rank=1)
    gm = program.stages[0].gm
    gm.graph.lint()
    layers = 2
    # one all-reduce per row-parallel linear (attention out, MLP down), one copy per region
    assert _collectives(program) == Counter({"all_reduce": 2 * layers})
    assert _copies(program) == 2 * layers
    layouts = program.layouts
    assert layouts["blocks.0.attn.q_proj.weight"].shards == (ShardSpec(0, "tp"),)
    assert layouts["blocks.0.attn.q_proj.bias"].shards == (ShardSpec(0, "tp"),)
    assert layouts["blocks.0.attn.o_proj.weight"].shards == (ShardSpec(1, "tp"),)
    assert layouts["blocks.0.attn.o_proj.bias"].shards == ()  # added once, after the reduction
    assert layouts["blocks.1.mlp.up_proj.weight"].local_shape(program.sizes) == (128, 64)
    # tied wte/lm_head: one placement, replicated, both names kept
    assert layouts["wte.weight"].shards == ()
    assert "lm_head.weight" in layouts["wte.weight"].aliases
    # every view inside attention counts local heads
    views = [n for _, n in program.nodes() if n.target is torch.ops.aten.view.default]
    assert views and all(list(n.args[1])[2] == 2 for n in views)
    placements = {n.meta.get("tp.placement") for _, n in program.nodes()}
    assert {"S(2)@tp", "S(1)@tp", "P(sum)@tp", "R"} <= placements
    # the row bias is added after the all-reduce
    for _, node in program.nodes():
        if collective_kind(node) == "all_reduce":
            (user,) = node.users
            assert user.target is torch.ops.aten.add.Tensor


def test_fused_qkv_gate_up_blocks_and_local_split_sizes():
    program = _program("tiny_llama", Plan(tp=2).resolve(2), fused_qkv=True, fused_gate_up=True)
    program.stages[0].gm.graph.lint()
    qkv = program.layouts["blocks.0.attn.qkv_proj.weight"]
    assert qkv.shards == (ShardSpec(0, "tp", blocks=(64, 32, 32)),)
    gate_up = program.layouts["blocks.0.mlp.gate_up_proj.weight"]
    assert gate_up.shards == (ShardSpec(0, "tp", blocks=(256, 256)),)
    splits = [n for _, n in program.nodes()
              if n.target is torch.ops.aten.split_with_sizes.default]
    assert splits and all(list(n.args[1]) == [32, 16, 16] for n in splits)
    assert _collectives(program) == Counter({"all_reduce": 4})
    sdpa = [n for _, n in program.nodes()
            if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert all(tuple(n.meta["val"].shape) == (4, 2, 16, 16) for n in sdpa)


def test_gqa_tp4_and_shards_cover_the_weight():
    plan = Plan(tp=4).resolve(4)
    programs = [_program("tiny_llama", plan, rank=r, n_kv_head=4) for r in range(4)]
    for program in programs:
        program.stages[0].gm.graph.lint()
        assert program.layouts["blocks.0.attn.k_proj.weight"].local_shape(program.sizes) == (
            16, 64)
    assert [p.coords["tp"] for p in programs] == [0, 1, 2, 3]


def test_lm_head_vocab_rule_gathers_logits():
    plan = Plan(tp=2, rules="lm_head:vocab").resolve(2)
    program = _program("tiny_llama", plan)
    assert program.layouts["lm_head.weight"].shards == (ShardSpec(0, "tp"),)
    assert _collectives(program)["all_gather"] == 1
    out = program.stages[0].gm.graph.find_nodes(op="output")[0]
    (logits,) = out.args[0]
    assert collective_kind(logits) == "all_gather"
    assert tuple(logits.meta["val"].shape) == (4, 16, 512)


def test_vocab_rule_pads_a_vocabulary_tp_does_not_divide():
    plan = Plan(tp=2, rules="lm_head:vocab").resolve(2)
    program = _program("tiny_llama", plan, vocab_size=511)
    program.stages[0].gm.graph.lint()
    head = program.layouts["lm_head.weight"]
    assert head.shards == (ShardSpec(0, "tp", padded=512),)
    assert head.local_shape(program.sizes) == (256, 64)
    out = program.stages[0].gm.graph.find_nodes(op="output")[0]
    (logits,) = out.args[0]
    assert logits.target is torch.ops.aten.slice.Tensor and logits.args[3] == 511
    assert tuple(logits.meta["val"].shape) == (4, 16, 511)


def test_replicate_rule_keeps_mlp_whole():
    plan = Plan(tp=2, rules="blocks.*.mlp.*:replicate").resolve(2)
    program = _program("tiny", plan)
    assert program.layouts["blocks.0.mlp.up_proj.weight"].shards == ()
    assert program.layouts["blocks.0.mlp.down_proj.weight"].shards == ()
    assert _collectives(program) == Counter({"all_reduce": 2})


def test_pipeline_wires_the_pass_and_refuses_sp():
    names = [name for name, _ in pass_pipeline(Plan(tp=2).resolve(2))]
    assert names == ["tensor_parallel"]
    with pytest.raises(NotImplementedError, match="sequence parallelism"):
        _program("tiny", Plan(tp=2, sp=True).resolve(2))


# --- bad input ------------------------------------------------------------------------------

def test_heads_not_divisible_names_node_module_and_fix():
    with pytest.raises(PassError) as info:
        _program("tiny", Plan(tp=8).resolve(8), n_head=4, n_embd=64)
    message = str(info.value)
    assert "tp=8" in message and "blocks.0.attn" in message and "view" in message
    assert "rules=" in message
    # every broken rule is listed, not only the first
    assert message.count("blocks.1.attn") >= 1


def test_kv_heads_not_divisible():
    with pytest.raises(PassError) as info:
        _program("tiny_llama", Plan(tp=4).resolve(4), n_kv_head=2)
    assert "kv heads" in str(info.value) and "blocks.0.attn" in str(info.value)


def test_hidden_not_divisible():
    with pytest.raises(PassError, match="do not divide by tp=3"):
        _program("tiny", Plan(tp=3).resolve(3), n_head=3, n_embd=48, ffn_hidden=128)


def test_no_region_is_an_error():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x).softmax(-1)

    captured = capture(Head(), (torch.randn(2, 8),))
    gm = captured.gm
    with pytest.raises(PassError, match="no column/row-parallel region"):
        tensor_parallel(gm, PassContext(plan=Plan(tp=2).resolve(2), coords={"tp": 0}))


def test_vocab_rule_on_tied_weight_is_an_error():
    with pytest.raises(PassError, match="tied"):
        _program("tiny", Plan(tp=2, rules="lm_head:vocab").resolve(2))


def test_hf_gpt2_conv1d_addmm_and_fused_c_attn():
    pytest.importorskip("transformers")
    model, (ids,) = hf_gpt2()
    program = compile_rank(capture(model, (ids,)), Plan(tp=2).resolve(2), 1, "meta")
    program.stages[0].gm.graph.lint()
    layouts = program.layouts
    # Conv1D weights are (in, out): column splits dim 1, row splits dim 0
    assert layouts["transformer.h.0.attn.c_attn.weight"].shards == (
        ShardSpec(1, "tp", blocks=(64, 64, 64)),)
    assert layouts["transformer.h.0.attn.c_attn.bias"].shards == (
        ShardSpec(0, "tp", blocks=(64, 64, 64)),)
    assert layouts["transformer.h.0.mlp.c_proj.weight"].shards == (ShardSpec(0, "tp"),)
    assert layouts["transformer.h.0.mlp.c_proj.bias"].shards == ()
    assert "lm_head.weight" in layouts["transformer.wte.weight"].aliases
    assert _collectives(program) == Counter({"all_reduce": 4})
    splits = [n for _, n in program.nodes() if n.target is torch.ops.aten.split.Tensor]
    assert splits and all(n.args[1] == 32 for n in splits)
    rows = [n for _, n in program.nodes() if n.target is torch.ops.aten.mm.default]
    assert len(rows) == 4  # addmm(b, x, w) -> mm(x, w) -> all_reduce -> + b
    assert not any(n.target is torch.ops.aten.addmm.default
                   and n.meta.get("tp.placement") == "P(sum)@tp" for _, n in program.nodes())


# --- equivalence on gloo ranks --------------------------------------------------------------

def _equivalence_worker(cases):
    from partitioner.check import check_rank

    reports = []
    for name, factory, kwargs, plan, dtype in cases:
        factory = getattr(models, factory) if isinstance(factory, str) else factory
        report = check_rank(factory, plan, dtype=dtype, factory_kwargs=kwargs)
        reports.append((name, report))
    return reports


def _assert_passed(results, cases):
    assert [len(reports) for reports in results] == [len(cases)] * len(results)
    failures = [f"{name}:\n{report}" for reports in results for name, report in reports
                if not report.passed]
    assert not failures, "\n".join(failures)


def test_equivalence_two_ranks():
    f64 = torch.float64
    cases = [
        ("gpt tp=2 f64", "tiny", {}, "tp=2", f64),
        ("gpt tp=2 f32", "tiny", {}, "tp=2", torch.float32),
        ("llama gqa tp=2 f64", "tiny_llama", {}, "tp=2", f64),
        ("llama fused tp=2 f64", "tiny_llama", dict(fused_qkv=True, fused_gate_up=True),
         "tp=2", f64),
        ("llama vocab lm_head tp=2 f64", "tiny_llama", {}, "tp=2,rules=lm_head:vocab", f64),
        ("llama padded vocab 511 tp=2 f64", "tiny_llama", dict(vocab_size=511),
         "tp=2,rules=lm_head:vocab", f64),
        ("gpt attention replicated by rule tp=2 f64", "tiny", {},
         "tp=2,rules=blocks.*.attn.*:replicate", f64),
    ]
    try:
        import transformers  # noqa: F401
    except ImportError:
        pass
    else:
        cases += [("hf gpt2 tp=2 f64", hf_gpt2, {}, "tp=2", f64),
                  ("hf llama tp=2 f64", hf_llama, {}, "tp=2", f64)]
    _assert_passed(spawn(2, _equivalence_worker, cases, timeout=300), cases)


def test_equivalence_four_ranks():
    f64 = torch.float64
    cases = [
        ("llama tp=4 f64", "tiny_llama", dict(n_kv_head=4), "tp=4", f64),
        ("gpt tp=2 x dp=2 f64", "tiny", {}, "tp=2,dp=2", f64),
        ("llama fused tp=2 x dp=2 f32", "tiny_llama", dict(fused_qkv=True, fused_gate_up=True),
         "tp=2,dp=2", torch.float32),
    ]
    _assert_passed(spawn(4, _equivalence_worker, cases, timeout=300), cases)
