"""Expert parallelism, graph level (programs built on the meta device): which layers are found,
what they become, and the errors for what ep cannot do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core import ops
from core.meta import EP_RECORD, LAYOUTS
from core.placement import Held, Shard
from core.plan import NotLanded, Plan
from partitioner import models
from model_zoo import capture_once
from partitioner.capture import capture
from partitioner.compiler import compile_rank
from passes import PassError

aten = torch.ops.aten


def _program(captured, plan: str, world: int, rank: int = 0, capture_batch=None):
    return compile_rank(captured, Plan.parse(plan).resolve(world), rank, "meta",
                        capture_batch=capture_batch)


def _nodes(program):
    return [n for stage in program.stages for n in stage.gm.graph.nodes]


@pytest.mark.parametrize("overrides", [{}, {"router": "sigmoid", "shared_experts": 1}])
def test_every_moe_layer_becomes_dispatch_grouped_gemms_and_return(overrides):
    captured = capture_once("tiny_moe", batch=2, seq=8, **overrides)
    for rank in range(2):
        program = _program(captured, "ep=2", 2, rank)
        gm = program.stages[0].gm
        record = gm.meta[EP_RECORD]
        assert [layer.path for layer in record.layers] == ["blocks.0.mlp", "blocks.1.mlp"]
        for layer in record.layers:
            assert (layer.num_experts, layer.topk, layer.tokens) == (8, 2, 16)
            assert layer.local_experts == (4 * rank, 4 * rank + 4)
            assert layer.expert_ops == ("grouped_mm", "chunk", "silu", "mul", "grouped_mm")
            for name in layer.weights:
                assert gm.meta[LAYOUTS][name].placements.on("ep") == Shard(0)
                assert program.layouts[name].local_shape(program.sizes)[0] == 4
        nodes = _nodes(program)
        assert not [n for n in nodes if n.target is aten.einsum.default]  # no dense experts
        count = {op: sum(n.target is op for n in nodes) for op in ops.MOE_OPS}
        assert count == {ops.moe_dispatch: 2, ops.moe_return: 2, ops.grouped_mm: 4,
                         ops.expert_capacity: 0}  # dropless
        # the router, the shared expert and attention stay as they were (replicated)
        assert all(gm.meta[LAYOUTS][name].placements.replicated
                   for name in gm.meta[LAYOUTS] if "w_in" not in name and "w_out" not in name)


def test_ep_beside_cp_dispatches_each_cp_ranks_share_of_the_gathered_tokens():
    """cp=2,ep=2 on 2 ranks: the CP pass reads the MoE block's 16 tokens gathered whole on both
    ranks; each dispatches its 8 (a slice) and gathers the returned rows whole over cp."""
    captured = capture_once("tiny_moe", batch=2, seq=8)
    for rank in range(2):
        gm = _program(captured, "cp=2,ep=2", 2, rank).stages[0].gm
        layers = gm.meta[EP_RECORD].layers
        assert [(layer.local_experts, layer.split_over) for layer in layers] == [
            ((4 * rank, 4 * rank + 4), ("cp=2",))] * 2
        assert "16 tokens x 2 (this rank's share of them over cp=2" in str(gm.meta[EP_RECORD])
        for dispatch in gm.graph.find_nodes(op="call_function", target=ops.moe_dispatch):
            for sent in dispatch.args[:2]:  # tokens and indices: rows 8*rank..8*rank+8
                assert sent.target is aten.slice.Tensor and sent.args[1:] == (0, 8 * rank,
                                                                              8 * rank + 8)
        for back in gm.graph.find_nodes(op="call_function", target=ops.moe_return):
            (gather,) = back.users
            assert gather.target is ops.gather_for_region and gather.args[1:] == ("cp", 0)


def test_ep_beside_cp_with_tokens_that_do_not_split_over_cp_dispatches_them_all():
    """A sequence of 7 padded to 8 for cp=2, one sequence: the 7 gathered tokens do not halve,
    so every cp rank dispatches them all (exact; the equivalence tests check it)."""
    captured = capture_once("tiny_moe", batch=1, seq=7)
    gm = _program(captured, "cp=2,ep=2", 2, 1).stages[0].gm
    assert [layer.split_over for layer in gm.meta[EP_RECORD].layers] == [(), ()]
    nodes = list(gm.graph.nodes)
    assert not [n for n in nodes if n.target is ops.moe_return
                and any(u.target is ops.gather_for_region for u in n.users)]
    assert sum(n.target is ops.moe_dispatch for n in nodes) == 2


def test_gelu_experts_and_dense_leading_blocks():
    captured = capture_once("tiny", batch=2, seq=8, n_experts=4, topk=1, dense_layers=1)
    record = _program(captured, "ep=2", 2).stages[0].gm.meta[EP_RECORD]
    assert [layer.path for layer in record.layers] == ["blocks.1.mlp"]
    assert record.layers[0].expert_ops == ("grouped_mm", "gelu", "grouped_mm")
    assert "experts 0..1 here" in str(record)


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_hugging_face_mixtral_experts_are_found_in_both_exported_forms(implementation):
    pytest.importorskip("transformers")
    from model_zoo import hf_mixtral

    captured = capture_once(hf_mixtral, batch=2, seq=8, experts_implementation=implementation)
    # ep=2 folds onto dp=2: batch_statistics compares with the capture at twice the batch
    # (grouped_mm counts each expert's rows with histc)
    program = _program(captured, "ep=2", 2, rank=1, capture_batch=lambda times: capture_once(
        hf_mixtral, batch=2 * times, seq=8, experts_implementation=implementation).gm)
    record = program.stages[0].gm.meta[EP_RECORD]
    assert [layer.path for layer in record.layers] == ["model.layers.0.mlp",
                                                       "model.layers.1.mlp"]
    assert all(layer.local_experts == (4, 8) for layer in record.layers)
    nodes = _nodes(program)
    # Hugging Face's own expert GEMMs are gone: no per-row weight picked by index, no opaque
    # grouped GEMM over every expert
    assert not [n for n in nodes if n.target is aten.bmm.default
                or str(n.target) == "transformers.grouped_mm_fallback.default"]
    assert sum(n.target is ops.grouped_mm for n in nodes) == 4


def test_experts_as_a_module_list_become_grouped_gemms_over_this_ranks_stacked_experts():
    """A loop over nn.ModuleList experts (each on every token, weighted by its gate): each ep
    rank holds its experts' parameters whole (Held) and stacks them for the grouped GEMMs;
    the other experts' parameters are not in its program at all."""
    from model_zoo import looped_moe

    captured = capture_once(looped_moe)
    for rank in range(2):
        program = _program(captured, "ep=2", 2, rank)
        gm = program.stages[0].gm
        record = gm.meta[EP_RECORD]
        assert [layer.path for layer in record.layers] == ["moes.0", "moes.1"]
        mine = {f"moes.{i}.experts.{e}.{w}.weight" for i in range(2)
                for e in (2 * rank, 2 * rank + 1) for w in ("w1", "w2", "w3")}
        for layer in record.layers:
            assert (layer.num_experts, layer.topk, layer.tokens) == (4, 2, 32)
            assert layer.expert_ops == ("grouped_mm", "silu", "grouped_mm", "mul",
                                        "grouped_mm")
            assert len(layer.weights) == 12
            for name in layer.weights:
                expert = int(name.split(".")[3])
                assert gm.meta[LAYOUTS][name].placements.on("ep") == Held(expert // 2)
        assert {n for n in program.layouts if ".experts." in n} == mine
        assert {n for n in program.all_layouts if ".experts." in n} >= mine | {
            "moes.0.experts.0.w1.weight", "moes.0.experts.3.w1.weight"}
        nodes = _nodes(program)
        stacks = [n for n in nodes if n.target is aten.stack.default]
        assert len(stacks) == 6 and all(
            {w.target for w in stack.args[0]} <= mine and len(stack.args[0]) == 2
            for stack in stacks)
        assert not [n for n in nodes if n.target is aten.eq.Scalar]  # the loop is gone
        assert sum(n.target is aten.linear.default for n in nodes) == 3  # 2 routers, head
    # with biases: each row gets its expert's, a grouped GEMM of ones with the stacked biases
    gm = _program(capture_once(looped_moe, bias=True), "ep=2", 2, 1).stages[0].gm
    assert all(len(layer.weights) == 24 for layer in gm.meta[EP_RECORD].layers)
    grouped = gm.graph.find_nodes(op="call_function", target=ops.grouped_mm)
    assert len(grouped) == 12 and sum(n.args[0].target is aten.ones_like.default
                                      for n in grouped) == 6


def test_module_list_experts_over_etp_or_beside_cp_are_refused_with_the_reason():
    from model_zoo import looped_moe

    with pytest.raises(PassError, match=r"moes.0 holds its experts as a ModuleList.*etp=2.*"
                                        r"set etp=1"):
        _program(capture_once(looped_moe), "tp=2,ep=2", 4)
    # the cp pass runs their Linears on sequence shards, the router's top-k on the whole
    with pytest.raises(PassError, match=r"moes.0: under cp=2 its experts read this rank's "
                                        r"share of the sequence.*Set cp=1"):
        _program(capture_once(looped_moe), "cp=2,ep=2", 2)


def test_experts_that_do_not_split_over_ep_name_the_valid_values():
    captured = capture_once("tiny_moe", batch=3, seq=8)
    with pytest.raises(PassError, match=r"blocks.0.mlp has 8 experts, which do not split evenly "
                                        r"over ep=3: .*valid ep: 1, 2, 4, 8"):
        _program(captured, "ep=3", 3)


def test_ep_on_a_model_without_moe_layers_says_so():
    with pytest.raises(PassError, match="this model has none that the expert-parallel pass "
                                        "recognises.*Set ep=1"):
        _program(capture_once("tiny", batch=2, seq=8), "ep=2", 2)


class _BiasedExperts(nn.Module):
    """Experts with a per-expert bias broadcast over the tokens: not a per-row op here."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.router = nn.Linear(8, 4)
        self.w = nn.Parameter(torch.randn(4, 8, 8))
        self.b = nn.Parameter(torch.randn(4, 8))

    def forward(self, ids):
        x = self.embed(ids)
        probs = self.router(x).softmax(-1)
        top_p, top_i = probs.topk(2, -1)
        weights = torch.zeros_like(probs).scatter(-1, top_i, top_p)
        out = torch.einsum("bsh,eho->bseo", x, self.w) + self.b
        return torch.einsum("bseh,bse->bsh", out, weights)


def test_experts_the_pass_cannot_run_per_token_are_refused_with_the_reason():
    model = _BiasedExperts()
    captured = capture(model, (torch.randint(0, 32, (2, 4)),))
    with pytest.raises(PassError, match="MoE layer .*an operand broadcast over the experts or "
                                        "tokens.*Set ep=1"):
        _program(captured, "ep=2", 2)


def test_what_ep_does_not_run_with_yet_is_refused_by_the_plan():
    with pytest.raises(NotLanded, match="expert tensor parallelism other than 1 or tp"):
        Plan.parse("tp=4,ep=2,etp=2").refuse_pending()


def test_the_auto_plan_picks_ep_for_an_moe_model_only_in_forms_that_have_landed():
    from partitioner.api import _auto_plan

    model, (ids,) = models.tiny_moe()
    plan = _auto_plan(model, 2, (ids,))
    assert plan.ep == 2 and plan.pending() == []  # the search weighs ep (with etp=1)
    dense, (ids,) = models.tiny()
    assert _auto_plan(dense, 2, (ids,)).ep == 1


class _DenseSoftmaxCombine(nn.Module):
    """Every expert weighted by the whole softmax (not zero outside the top-k), beside a top-k
    used elsewhere: computing only the top-k experts would change the numbers."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.router = nn.Linear(8, 4)
        self.w = nn.Parameter(torch.randn(4, 8, 8))

    def forward(self, ids):
        x = self.embed(ids)
        probs = self.router(x).softmax(-1)
        top_p, top_i = probs.topk(2, -1)
        weights = probs + 0 * torch.zeros_like(probs).scatter(-1, top_i, top_p)
        out = torch.einsum("bsh,eho->bseo", x, self.w)
        return torch.einsum("bseh,bse->bsh", out, weights)


def test_routing_weights_that_are_not_zero_outside_the_top_k_are_refused():
    captured = capture(_DenseSoftmaxCombine(), (torch.randint(0, 32, (2, 4)),))
    with pytest.raises(PassError, match="are not the router's top-k values scattered into "
                                        "zeros.*set ep=1"):
        _program(captured, "ep=2", 2)
