"""Tensor parallelism: graph-level unit tests of the pass, bad inputs, and equivalence with the
single-device model on real gloo ranks (one spawn per world size, cases batched)."""

from __future__ import annotations

import functools
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from partitioner import models
from partitioner.capture import capture
from core.meta import LAYOUTS, TP_PLACEMENT, TP_RECORD
from core.placement import (Partial, Placements, Shard, StridedShard, local_size, take_shard,
                            unshard)
from partitioner.compiler import compile_rank, layouts_from_capture
from partitioner.report.program import collective_kind
from core.plan import Plan
from passes import PassContext, PassError
from passes.registry import planned
from passes.tensor_parallel import tensor_parallel
from passes.tensor_parallel.record import LOGITS_GATHER, LOOKUP_SUM, REGION_ENTRY, REGION_EXIT
from ranks import on_ranks
from equivalence import assert_passed, equivalence_worker
from model_zoo import hf_gpt2, hf_llama
from core.ops import copy_to_region

aten = torch.ops.aten


@functools.lru_cache(maxsize=None)
def _captured(factory: str, **overrides):
    model, (ids,) = getattr(models, factory)(**overrides)
    return capture(model, (ids,))


def _program(factory: str, plan: Plan, rank: int = 0, **overrides):
    captured = _captured(factory, **overrides)
    return compile_rank(captured, plan, rank, "meta")


def _seeded(captured) -> torch.fx.GraphModule:
    """The captured graph with the layouts compile_rank seeds, for running the pass alone."""
    captured.gm.meta[LAYOUTS] = layouts_from_capture(captured)
    return captured.gm


def _collectives(program) -> Counter:
    return Counter(collective_kind(n) for _, n in program.nodes() if collective_kind(n))


def _copies(program) -> int:
    return sum(n.target is copy_to_region for _, n in program.nodes())


def _nodes(program, target) -> list:
    return [n for _, n in program.nodes() if n.target is target]


class GqaSdpa(nn.Module):
    """One attention block whose kv heads reach SDPA unrepeated (enable_gqa=True), as Hugging
    Face's sdpa_attention does on GPUs when there is no mask."""

    def __init__(self, vocab=64, hidden=32, heads=4, kv_heads=1):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.wte = nn.Embedding(vocab, hidden)
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim)
        self.o_proj = nn.Linear(hidden, hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        x = self.wte(ids)
        B, S, H = x.shape
        q = self.q_proj(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, S, hd)
        k = self.k_proj(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, ..)
        v = self.v_proj(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o_proj(y.transpose(1, 2).reshape(B, S, H))  # (B, S, h)
        return self.lm_head(x)


def gqa_sdpa(batch: int = 4, seq: int = 8, **overrides):
    """Factory for the equivalence workers (module level, so spawned ranks import it)."""
    torch.manual_seed(0)
    model = GqaSdpa(**overrides)
    ids = torch.randint(0, model.wte.num_embeddings, (batch, seq),
                        generator=torch.Generator().manual_seed(7))
    return model, (ids,)


# --- graph-level ----------------------------------------------------------------------------

def test_gpt_regions_collectives_and_layouts():
    program = _program("tiny", Plan(tp=2).resolve(2), rank=1)
    gm = program.stages[0].gm
    gm.graph.lint()
    layers = 2
    # one all-reduce per row-parallel linear (attention out, MLP down), one copy per region;
    # by default the word embedding (all-reduce) and the LM head (copy, all-gather) are
    # vocab-parallel too
    assert _collectives(program) == Counter({"all_reduce": 2 * layers + 1, "all_gather": 1})
    assert _copies(program) == 2 * layers + 1
    assert program.layouts["wte.weight"].placements == Placements.of(tp=Shard(0))
    layouts = program.layouts
    assert layouts["blocks.0.attn.q_proj.weight"].placements == Placements.of(tp=Shard(0))
    assert layouts["blocks.0.attn.q_proj.bias"].placements == Placements.of(tp=Shard(0))
    assert layouts["blocks.0.attn.o_proj.weight"].placements == Placements.of(tp=Shard(1))
    assert layouts["blocks.0.attn.o_proj.bias"].placements.replicated  # added once, after the reduction
    assert layouts["blocks.1.mlp.up_proj.weight"].local_shape(program.sizes) == (128, 64)
    # tied wte/lm_head: one placement (the vocab row shard), both names kept
    assert "lm_head.weight" in layouts["wte.weight"].aliases
    # every view inside attention counts local heads
    views = [n for _, n in program.nodes() if n.target is torch.ops.aten.view.default]
    assert views and all(list(n.args[1])[2] == 2 for n in views)
    placements = {n.meta.get(TP_PLACEMENT, Placements()) for _, n in program.nodes()}
    assert {Placements.of(tp=Shard(2)), Placements.of(tp=Shard(1)),
            Placements.of(tp=Partial()), Placements()} <= placements
    # the row bias is added after the all-reduce
    for _, node in program.nodes():
        if collective_kind(node) == "all_reduce":
            (user,) = node.users
            assert user.target is torch.ops.aten.add.Tensor


def test_the_pass_records_what_it_split_and_inserted():
    program = _program("tiny_llama", Plan(tp=2, rules="lm_head:vocab").resolve(2),
                       vocab_size=511)
    gm = program.stages[0].gm
    record = gm.meta[TP_RECORD]
    nodes = {n.name: n for n in gm.graph.nodes}
    assert record.tp == 2 and len(record.regions) == 2 * 2  # attention and MLP per block
    for region in record.regions:
        assert [nodes[e].target for e in region.entries] == [copy_to_region]
        assert all(collective_kind(nodes[e]) == "all_reduce" for e in region.exits)
        assert len(region.exits) == len(region.rows) == 1
    roles = Counter(c.role for c in record.collectives)
    assert roles == Counter({REGION_ENTRY: 2 * 2 + 1, REGION_EXIT: 2 * 2, LOOKUP_SUM: 1,
                             LOGITS_GATHER: 1})
    assert all(nodes[c.node].args[0].name == c.value for c in record.collectives)
    params = {p.name: p.placement for p in record.params}
    assert params["lm_head.weight"] == Shard(0, padded=512)
    assert params["blocks.0.attn.o_proj.weight"] == Shard(1)
    assert params == {name: layout.placements.on("tp") for name, layout in program.layouts.items()
                      if not layout.placements.replicated}
    (logits,) = record.logits
    assert (logits.leaf, logits.vocab_size, logits.padded_vocab) == (0, 511, 512)
    assert nodes[logits.shard].target is aten.linear.default


def test_a_shard_held_by_several_ranks_takes_and_gives_back_its_chunk():
    """Shard.replicas (grouped-query kv heads fewer than tp): 4 ranks, 2 chunks, 2 ranks each."""
    full = torch.arange(8.0).view(4, 2)
    placement = Shard(0, replicas=2)
    pieces = [take_shard(full, placement, rank, 4) for rank in range(4)]
    assert local_size(placement, 4, 4) == 2 and all(p.shape == (2, 2) for p in pieces)
    assert torch.equal(pieces[1], full[:2]) and torch.equal(pieces[2], full[2:])
    assert torch.equal(unshard(pieces, placement, 4), full)
    assert str(Placements.of(tp=placement)) == "S(0,replicas=2)@tp"


def test_fused_qkv_gate_up_blocks_and_local_split_sizes():
    program = _program("tiny_llama", Plan(tp=2).resolve(2), fused_qkv=True, fused_gate_up=True)
    program.stages[0].gm.graph.lint()
    qkv = program.layouts["blocks.0.attn.qkv_proj.weight"]
    assert qkv.placements == Placements.of(tp=StridedShard(0, (64, 32, 32)))
    gate_up = program.layouts["blocks.0.mlp.gate_up_proj.weight"]
    assert gate_up.placements == Placements.of(tp=StridedShard(0, (256, 256)))
    splits = [n for _, n in program.nodes()
              if n.target is torch.ops.aten.split_with_sizes.default]
    assert splits and all(list(n.args[1]) == [32, 16, 16] for n in splits)
    assert _collectives(program) == Counter({"all_reduce": 4 + 1, "all_gather": 1})
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
    assert program.layouts["lm_head.weight"].placements == Placements.of(tp=Shard(0))
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
    assert head.placements == Placements.of(tp=Shard(0, padded=512))
    assert head.local_shape(program.sizes) == (256, 64)
    out = program.stages[0].gm.graph.find_nodes(op="output")[0]
    (logits,) = out.args[0]
    assert logits.target is torch.ops.aten.slice.Tensor and logits.args[3] == 511
    assert tuple(logits.meta["val"].shape) == (4, 16, 511)


def test_replicate_rule_keeps_mlp_whole():
    plan = Plan(tp=2, rules="blocks.*.mlp.*:replicate").resolve(2)
    program = _program("tiny", plan)
    assert program.layouts["blocks.0.mlp.up_proj.weight"].placements.replicated
    assert program.layouts["blocks.0.mlp.down_proj.weight"].placements.replicated
    assert _collectives(program) == Counter({"all_reduce": 2 + 1, "all_gather": 1})


def test_replicate_rules_keep_the_embedding_and_lm_head_whole():
    plan = Plan(tp=2, rules="wte:replicate;lm_head:replicate").resolve(2)
    program = _program("tiny_llama", plan)
    assert program.layouts["wte.weight"].placements.replicated
    assert program.layouts["lm_head.weight"].placements.replicated
    assert _collectives(program) == Counter({"all_reduce": 4})
    # one replicate rule on a tied table keeps both of its uses whole
    tied = _program("tiny", Plan(tp=2, rules="lm_head:replicate").resolve(2))
    assert tied.layouts["wte.weight"].placements.replicated
    assert _collectives(tied) == Counter({"all_reduce": 4})


def test_pipeline_wires_the_pass():
    names = [entry.name for entry in planned(Plan(tp=2).resolve(2))]
    assert names == ["causal_mask", "tensor_parallel", "dropout", "kernels", "device",
                     "collectives"]  # masks first
    # sequence parallelism runs after the tp pass, on its collectives
    names = [entry.name for entry in planned(Plan(tp=2, sp=True).resolve(2))]
    assert names[:3] == ["causal_mask", "tensor_parallel", "sequence_parallel"]


# --- grouped-query attention: kv heads replicated when they divide tp -----------------------

def _kv_narrows(program) -> list:
    """narrow(copy_to_region(weight)) nodes: replicated projections read this rank's heads."""
    return [n for n in _nodes(program, aten.narrow.default)
            if n.args[0].target is copy_to_region and n.args[0].args[0].op == "get_attr"]


def test_gqa_kv_heads_replicated_when_they_divide_tp():
    plan = Plan(tp=4).resolve(4)
    layers, head_dim = 2, 16
    for rank in range(4):
        program = _program("tiny_llama", plan, rank=rank, n_kv_head=2, bias=True)
        program.stages[0].gm.graph.lint()
        layouts = program.layouts
        for name in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):
            assert layouts[f"blocks.0.attn.{name}"].placements.replicated  # whole on every rank
        assert layouts["blocks.0.attn.q_proj.weight"].placements == Placements.of(tp=Shard(0))
        # k/v weight and bias of every layer: this rank's kv head (rank // (tp / kv))
        narrows = _kv_narrows(program)
        assert len(narrows) == 4 * layers
        assert {(n.args[2], n.args[3]) for n in narrows} == {(rank // 2 * head_dim, head_dim)}
        assert {n.args[1] for n in narrows} == {0}
        # the weight copies are the only extra copies (besides the vocab-parallel LM head's);
        # no extra forward collectives
        assert _copies(program) == 2 * layers + 4 * layers + 1
        assert _collectives(program) == Counter({"all_reduce": 2 * layers + 1,
                                                 "all_gather": 1})
        # one kv head repeated once per local query head (4 heads / tp=4)
        repeats = _nodes(program, aten.repeat_interleave.self_int)
        assert repeats and all(n.args[1] == 1 for n in repeats)
        assert all(tuple(n.meta["val"].shape) == (4, 1, 16, 16) for n in repeats)
        for narrow in narrows:
            (lin,) = narrow.users
            # x through the copy q reads too: its backward sums every rank's dx of q, k, v
            x = lin.args[0]
            assert lin.target is aten.linear.default and x.target is copy_to_region
            assert len(x.users) == 3
            # 2 pieces over 4 ranks
            assert lin.meta[TP_PLACEMENT] == Placements.of(tp=Shard(2, replicas=2))
            assert tuple(lin.meta["val"].shape) == (4, 16, head_dim)


def test_hf_llama_repeat_kv_narrows_the_expanded_copies():
    pytest.importorskip("transformers")
    model, (ids,) = hf_llama()  # 4 query heads, 2 kv heads
    captured = capture(model, (ids,))
    for rank in range(4):
        program = compile_rank(captured, Plan(tp=4).resolve(4), rank, "meta")
        program.stages[0].gm.graph.lint()
        assert program.layouts["model.layers.0.self_attn.k_proj.weight"].placements.replicated
        # (B, kv, n_rep, S, hd) expanded copies: keep the one copy of this rank's query head
        copies = [n for n in _nodes(program, aten.narrow.default)
                  if n.args[0].target is aten.expand.default]
        assert len(copies) == 2 * 2 and {n.args[1:] for n in copies} == {(2, rank % 2, 1)}
        sdpa = [n for _, n in program.nodes() if "scaled_dot_product" in str(n.target)]
        assert sdpa and all(tuple(a.meta["val"].shape) == (4, 1, 16, 16)
                            for n in sdpa for a in n.args[:3])


def test_gqa_sdpa_enable_gqa_takes_the_replicated_head_as_is():
    model, (ids,) = gqa_sdpa(kv_heads=1)
    program = compile_rank(capture(model, (ids,)), Plan(tp=2).resolve(2), 1, "meta")
    program.stages[0].gm.graph.lint()
    (sdpa,) = [n for _, n in program.nodes() if "scaled_dot_product" in str(n.target)]
    assert sdpa.kwargs.get("enable_gqa")
    # 4 query heads over tp=2; the one kv head (multi-query) whole on both ranks
    assert [tuple(a.meta["val"].shape) for a in sdpa.args[:3]] == [(4, 2, 8, 8), (4, 1, 8, 8),
                                                                  (4, 1, 8, 8)]
    assert len(_kv_narrows(program)) == 4  # k/v weight and bias, whole kv head 0


# --- bad input ------------------------------------------------------------------------------

def test_heads_not_divisible_names_node_module_and_fix():
    with pytest.raises(PassError) as info:
        _program("tiny", Plan(tp=8).resolve(8), n_head=4, n_embd=64)
    message = str(info.value)
    assert "tp=8" in message and "blocks.0.attn" in message and "view" in message
    assert "4 attention heads do not divide by tp=8" in message
    assert "tp=1, tp=2 or tp=4 (the tp values that split this model" in message
    assert "rules=blocks.*.attn.q_proj:replicate;" in message
    # every broken rule is listed, those repeated in every layer once
    assert "(and the same at 5 more nodes in blocks.*.attn)" in message


def test_kv_heads_neither_multiple_nor_divisor_of_tp():
    with pytest.raises(PassError) as info:  # 3 kv heads, tp=2
        _program("tiny_llama", Plan(tp=2).resolve(2), n_head=6, n_kv_head=3, n_embd=48)
    message = str(info.value)
    assert "kv heads" in message and "blocks.0.attn" in message and "rules=" in message
    assert "of size 3" in message


def test_fused_qkv_cannot_replicate_kv_heads():
    with pytest.raises(PassError) as info:
        _program("tiny_llama", Plan(tp=4).resolve(4), n_kv_head=2, fused_qkv=True)
    assert "projections of their own" in str(info.value)


def test_hidden_not_divisible():
    with pytest.raises(PassError, match="do not divide by tp=3"):
        _program("tiny", Plan(tp=3).resolve(3), n_head=3, n_embd=48, ffn_hidden=128)


# A failing plan per kind of problem; every fix its message suggests is applied and accepted.
SUGGESTING = [
    ("tiny_llama", "tp=3", dict(n_head=4, n_kv_head=2, n_embd=64)),  # heads, kv heads, widths
    ("tiny", "tp=8", dict(n_head=4, n_embd=64)),  # heads only
    ("tiny_llama", "tp=2", dict(n_head=6, n_kv_head=3, n_embd=48)),  # kv heads
    ("tiny_llama", "tp=4", dict(n_kv_head=2, fused_qkv=True)),  # fused kv cannot replicate
    ("tiny", "tp=3", dict(n_head=3, n_embd=48, ffn_hidden=128)),  # the MLP width
    ("tiny", "tp=2,rules=lm_head:vocab;wte:replicate", {}),  # one use of a tied weight
    ("tiny", "tp=2,rules=wte:vocab;nosuch:replicate", {}),  # a rule matching nothing
    ("tiny", "tp=3,rules=blocks.*.attn.*:replicate", dict(n_head=4, n_embd=64)),  # the MLP
]


def suggested_fixes(message: str) -> list[str]:
    """The plan items a message suggests after its `fix:` (tp=.., rules=..)."""
    fixes = message.splitlines()[0].partition("; fix: ")[2]
    return re.findall(r"\b(tp=\d+|rules=[^\s]+)", fixes)


def with_item(plan: str, item: str) -> Plan:
    items = dict(part.split("=", 1) for part in plan.split(","))
    key, value = item.split("=", 1)
    return Plan.parse(",".join(f"{k}={v}" for k, v in {**items, key: value}.items()))


@pytest.mark.parametrize("factory, plan, overrides", SUGGESTING)
def test_every_suggested_fix_is_accepted(factory, plan, overrides):
    captured = _captured(factory, **overrides)
    with pytest.raises(PassError) as info:
        compile_rank(captured, Plan.parse(plan).resolve(Plan.parse(plan).tp), 0, "meta")
    fixes = suggested_fixes(str(info.value))
    assert fixes and "rules=" in " ".join(fixes), str(info.value)
    for fix in fixes:
        fixed = with_item(plan, fix)
        compile_rank(captured, fixed.resolve(fixed.tp), 0, "meta")  # accepted: no PassError


def test_the_tp_values_offered_are_computed_from_the_model():
    captured = _captured("tiny_llama", n_head=6, n_kv_head=6, n_embd=48, ffn_hidden=96)
    with pytest.raises(PassError) as info:
        compile_rank(captured, Plan(tp=4).resolve(4), 0, "meta")
    message = str(info.value)
    assert "its 6 attention heads do not divide by tp=4" in message
    assert "tp=1, tp=2, tp=3 or tp=6 (the tp values that split this model" in message


def test_heads_are_not_blamed_when_rules_keep_attention_whole():
    captured = _captured("tiny", n_head=4, n_embd=64)
    with pytest.raises(PassError) as info:
        plan = Plan.parse("tp=3,rules=blocks.*.attn.*:replicate").resolve(3)
        compile_rank(captured, plan, 0, "meta")
    first = str(info.value).splitlines()[0]
    assert "attention heads" not in first and "module 'blocks.0.mlp.up_proj'" in first


def test_no_region_is_an_error():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x).softmax(-1)

    captured = capture(Head(), (torch.randn(2, 8),))
    with pytest.raises(PassError, match="no column/row-parallel region"):
        tensor_parallel(_seeded(captured), PassContext(plan=Plan(tp=2).resolve(2),
                                                       coords={"tp": 0}))


def test_the_pass_needs_the_layouts_seeded_from_the_capture():
    captured = capture(*models.tiny())
    with pytest.raises(PassError, match="layouts seeded from the capture"):
        tensor_parallel(captured.gm, PassContext(plan=Plan(tp=2).resolve(2), coords={"tp": 0}))


def test_rule_matching_no_module_is_an_error():
    """Globs match whole module paths: HF's embedding is model.embed_tokens, not embed_tokens."""
    captured = capture(*_hf_llama_model())
    with pytest.raises(PassError, match=r"'embed_tokens:vocab' matches no linear or embedding.*"
                                        r"model\.embed_tokens.*\*embed_tokens:vocab"):
        compile_rank(captured, Plan.parse("tp=2,rules=embed_tokens:vocab").resolve(2), 0,
                     "meta")


def _hf_llama_model():
    pytest.importorskip("transformers")
    model, (ids,) = hf_llama()
    return model, (ids,)


def test_vocab_rule_on_one_use_of_a_tied_weight_is_an_error():
    with pytest.raises(PassError, match="tied") as info:
        _program("tiny", Plan(tp=2, rules="lm_head:vocab;wte:replicate").resolve(2))
    assert "rules=wte:vocab;lm_head:vocab (fixes it; checked)" in str(info.value)
    with pytest.raises(PassError, match="tied") as info:  # the other way round
        _program("tiny", Plan(tp=2, rules="wte:vocab;lm_head:replicate").resolve(2))
    message = str(info.value)
    assert "module 'wte'" in message and "rules=lm_head:vocab;wte:vocab (fixes it" in message


def test_vocab_embedding_masks_ids_and_all_reduces():
    plan = Plan(tp=2, rules="wte:vocab").resolve(2)
    program = _program("tiny_llama", plan, rank=1, vocab_size=511)
    program.stages[0].gm.graph.lint()
    wte = program.layouts["wte.weight"]
    assert wte.placements == Placements.of(tp=Shard(0, padded=512))  # one zero row pads 511 to 512
    assert wte.local_shape(program.sizes) == (256, 64)
    (lookup,) = _nodes(program, aten.embedding.default)
    # rank 1 holds rows [256, 512): ids shifted by 256, the others looked up at row 0 ...
    local_ids = lookup.args[1]
    assert local_ids.target is aten.masked_fill.Scalar and local_ids.args[2] == 0
    assert local_ids.args[0].target is aten.sub.Scalar and local_ids.args[0].args[1] == 256
    bounds = {n.target: n.args[1] for n in local_ids.args[1].args}
    assert bounds == {aten.lt.Scalar: 256, aten.ge.Scalar: 512}
    # ... and zeroed before the sum over tp
    (zeroed,) = lookup.users
    assert zeroed.target is aten.masked_fill.Scalar
    (reduced,) = zeroed.users
    assert collective_kind(reduced) == "all_reduce"
    assert lookup.meta[TP_PLACEMENT] == Placements.of(tp=Partial())
    assert reduced.meta[TP_PLACEMENT] == Placements()
    assert _collectives(program) == Counter({"all_reduce": 1 + 2 * 2, "all_gather": 1})


def test_tied_embedding_and_lm_head_share_one_row_shard():
    plan = Plan(tp=2, rules="wte:vocab;lm_head:vocab").resolve(2)
    program = _program("tiny", plan, vocab_size=511)
    program.stages[0].gm.graph.lint()
    wte = program.layouts["wte.weight"]
    assert wte.placements == Placements.of(tp=Shard(0, padded=512)) and wte.aliases == ("lm_head.weight",)
    table = [n for _, n in program.nodes() if n.op == "get_attr" and n.target == "wte.weight"]
    assert len(table) == 1 and tuple(table[0].meta["val"].shape) == (256, 64)
    users = {n.target for n in table[0].users}
    assert users == {aten.embedding.default, aten.linear.default}  # one local shard, both uses
    assert _collectives(program) == Counter({"all_reduce": 1 + 2 * 2, "all_gather": 1})


def test_hf_tied_vocab_rules():
    pytest.importorskip("transformers")
    model, (ids,) = hf_gpt2()
    plan = Plan(tp=2, rules="transformer.wte:vocab;lm_head:vocab").resolve(2)
    program = compile_rank(capture(model, (ids,)), plan, 0, "meta")
    wte = program.layouts["transformer.wte.weight"]
    assert wte.placements == Placements.of(tp=Shard(0)) and "lm_head.weight" in wte.aliases
    assert program.layouts["transformer.wpe.weight"].placements.replicated
    assert _collectives(program)["all_gather"] == 1


def test_vocab_embedding_refuses_gradient_scaling_by_frequency():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(16, 8, scale_grad_by_freq=True)
            self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, ids):
            return self.down(self.up(self.emb(ids)).relu())

    captured = capture(Scaled(), (torch.randint(0, 16, (2, 4)),))
    plan = Plan(tp=2, rules="emb:vocab").resolve(2)
    with pytest.raises(PassError, match="frequency") as info:
        tensor_parallel(_seeded(captured), PassContext(plan=plan, coords={"tp": 0}))
    assert "rules=emb:replicate" in str(info.value)


def test_hf_gpt2_conv1d_addmm_and_fused_c_attn():
    pytest.importorskip("transformers")
    model, (ids,) = hf_gpt2()
    program = compile_rank(capture(model, (ids,)), Plan(tp=2).resolve(2), 1, "meta")
    program.stages[0].gm.graph.lint()
    layouts = program.layouts
    # Conv1D weights are (in, out): column splits dim 1, row splits dim 0
    assert layouts["transformer.h.0.attn.c_attn.weight"].placements == Placements.of(tp=StridedShard(1, (64, 64, 64)))
    assert layouts["transformer.h.0.attn.c_attn.bias"].placements == Placements.of(tp=StridedShard(0, (64, 64, 64)))
    assert layouts["transformer.h.0.mlp.c_proj.weight"].placements == Placements.of(tp=Shard(0))
    assert layouts["transformer.h.0.mlp.c_proj.bias"].placements.replicated
    assert "lm_head.weight" in layouts["transformer.wte.weight"].aliases
    # the tied wte/lm_head table: one vocab row shard by default
    assert layouts["transformer.wte.weight"].placements == Placements.of(tp=Shard(0))
    assert _collectives(program) == Counter({"all_reduce": 4 + 1, "all_gather": 1})
    splits = [n for _, n in program.nodes() if n.target is torch.ops.aten.split.Tensor]
    assert splits and all(n.args[1] == 32 for n in splits)
    rows = [n for _, n in program.nodes() if n.target is torch.ops.aten.mm.default]
    assert len(rows) == 4  # addmm(b, x, w) -> mm(x, w) -> all_reduce -> + b
    assert not any(n.target is torch.ops.aten.addmm.default
                   and n.meta.get(TP_PLACEMENT) == Placements.of(tp=Partial())
                   for _, n in program.nodes())


# --- equivalence on gloo ranks --------------------------------------------------------------

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
        ("gpt tied wte/lm_head vocab tp=2 f64", "tiny", {}, "tp=2,rules=wte:vocab;lm_head:vocab",
         f64),
        ("gpt tied vocab padded 511 tp=2 f32", "tiny", dict(vocab_size=511),
         "tp=2,rules=wte:vocab;lm_head:vocab", torch.float32),
        # built on meta, filled by load_full_state_dict: the padding row never shows
        ("llama vocab padded 511 meta init tp=2 f64", "tiny_llama", dict(vocab_size=511),
         "tp=2,rules=wte:vocab;lm_head:vocab", f64, dict(meta=True)),
        ("llama mqa kv=1 replicated tp=2 f64", "tiny_llama", dict(n_kv_head=1), "tp=2", f64),
        ("sdpa enable_gqa kv=1 replicated tp=2 f64", gqa_sdpa, {}, "tp=2", f64),
    ]
    try:
        import transformers  # noqa: F401
    except ImportError:
        pass
    else:
        cases += [("hf gpt2 tp=2 f64", hf_gpt2, {}, "tp=2", f64),
                  ("hf llama tp=2 f64", hf_llama, {}, "tp=2", f64),
                  ("hf gpt2 tied wte/lm_head vocab tp=2 f64", hf_gpt2, {},
                   "tp=2,rules=transformer.wte:vocab;lm_head:vocab", f64),
                  ("hf llama embed_tokens + lm_head vocab tp=2 f64", hf_llama, {},
                   "tp=2,rules=model.embed_tokens:vocab;lm_head:vocab", f64)]
    assert_passed(on_ranks(2, equivalence_worker, cases, timeout=300), cases)


def test_equivalence_four_ranks():
    f64 = torch.float64
    cases = [
        ("llama tp=4 f64", "tiny_llama", dict(n_kv_head=4), "tp=4", f64),
        ("gpt tp=2 x dp=2 f64", "tiny", {}, "tp=2,dp=2", f64),
        ("llama fused tp=2 x dp=2 f32", "tiny_llama", dict(fused_qkv=True, fused_gate_up=True),
         "tp=2,dp=2", torch.float32),
        ("llama gqa kv=2 replicated tp=4 bias f64", "tiny_llama", dict(bias=True), "tp=4", f64),
        ("sdpa enable_gqa kv=2 replicated tp=4 f64", gqa_sdpa, dict(kv_heads=2), "tp=4", f64),
        ("gpt tied vocab tp=2 x pp=2 f64", "tiny", {}, "tp=2,pp=2,rules=wte:vocab;lm_head:vocab",
         f64),
    ]
    try:
        import transformers  # noqa: F401
    except ImportError:
        pass
    else:
        cases += [("hf llama gqa kv=2 replicated tp=4 f64", hf_llama, {}, "tp=4", f64),
                  ("hf llama mqa kv=1 tp=4 vocab padded 255 f32", hf_llama,
                   dict(num_key_value_heads=1, vocab_size=255),
                   "tp=4,rules=model.embed_tokens:vocab;lm_head:vocab", torch.float32)]
    assert_passed(on_ranks(4, equivalence_worker, cases, timeout=600), cases)
