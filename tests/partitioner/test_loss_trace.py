"""partitioner.loss_trace: recognizing gathered logits in a program, the local-shard variant of
its graph, and which traced losses run vocab-parallel (with numbers: the rewritten loss on a
one-rank "shard" with padding columns against the user's loss on the full logits)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from partitioner import models
from partitioner.capture import capture
from partitioner.check import lm_loss, lm_loss_sum
from partitioner.loss_trace import (ShardedLogits, choose_loss_path, find_sharded_logits,
                                    local_logits_graph, output_leaves)
from core.meta import TP_RECORD
from partitioner.compiler import compile_rank
from partitioner.report.program import collective_kind
from core.plan import Plan
from core.ops import all_gather

V = 511  # a vocabulary tp=2 does not divide: padded to 512


@functools.lru_cache(maxsize=None)
def _captured(**overrides):
    model, (ids,) = models.tiny_llama(**overrides)
    return capture(model, (ids,))


def _program(plan: str, rank: int = 0, **overrides):
    plan = Plan.parse(plan)
    return compile_rank(_captured(**overrides), plan.resolve(plan.tp * plan.pp), rank, "meta")


# --- the model's side --------------------------------------------------------------------------

def test_finds_padded_gathered_logits_and_the_shard_behind_them():
    program = _program("tp=2,rules=lm_head:vocab", rank=1, vocab_size=V)
    (found,) = find_sharded_logits(program.stages[0].gm)
    assert (found.leaf, found.mesh_dim, found.dim) == (0, "tp", 2)
    assert (found.vocab_size, found.padded_vocab, found.local_vocab) == (V, 512, 256)
    assert found.gathered == ("all_gather_default", "slice_tensor")
    unpadded = find_sharded_logits(_program("tp=2,rules=lm_head:vocab").stages[0].gm)
    assert [(s.vocab_size, s.padded_vocab, len(s.gathered)) for s in unpadded] == [(512, 512, 1)]


def test_no_sharded_logits_without_the_vocab_rule_or_on_earlier_stages():
    assert find_sharded_logits(_program("tp=2,rules=lm_head:replicate").stages[0].gm) == ()
    first, last = (_program("tp=2,pp=2,rules=lm_head:vocab", rank=r) for r in (0, 2))
    assert find_sharded_logits(first.stages[-1].gm) == ()  # sends activations, no logits
    assert len(find_sharded_logits(last.stages[-1].gm)) == 1


def test_the_logits_come_from_the_tensor_parallel_record_not_the_graph_shape():
    gm = _program("tp=2,rules=lm_head:vocab", vocab_size=V).stages[0].gm
    assert find_sharded_logits(gm) == gm.meta[TP_RECORD].logits
    bare = torch.fx.GraphModule(gm, gm.graph)  # the same graph without the pass's record
    assert find_sharded_logits(bare) == ()


def test_local_logits_graph_returns_the_shard_and_gathers_nothing():
    gm = _program("tp=2,rules=lm_head:vocab", vocab_size=V).stages[0].gm
    sharded = find_sharded_logits(gm)
    variant = local_logits_graph(gm, sharded)
    variant.graph.lint()
    (leaf,) = variant.graph.find_nodes(op="output")[0].args[0]
    assert leaf.name == sharded[0].shard and tuple(leaf.meta["val"].shape) == (4, 16, 256)
    assert not [n for n in variant.graph.nodes if n.target is all_gather]
    assert not [n for n in variant.graph.nodes if collective_kind(n) == "all_gather"]
    # the original keeps gathering (forward returns full logits) and both read one weight
    assert [n.target for n in gm.graph.nodes if n.target is all_gather] == [all_gather]
    assert variant.get_parameter("lm_head.weight") is gm.get_parameter("lm_head.weight")
    assert variant.graph._codegen is gm.graph._codegen  # same calling convention


# --- the loss's side ---------------------------------------------------------------------------

def _shift_ce(logits, target):
    return F.cross_entropy(logits[:, :-1, :].contiguous().view(-1, V), target[:, 1:].reshape(-1))


def _transposed_ce(logits, target):  # class dim 1: nll_loss2d
    return F.cross_entropy(logits.transpose(1, 2), target)


def _log_softmax_nll(logits, target):
    return F.nll_loss(F.log_softmax(logits, -1).flatten(0, 1), target.flatten(), reduction="sum")


def _label_smoothing(logits, target):
    return F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), label_smoothing=0.1)


def _float_cast(logits, target):
    return F.cross_entropy(logits.float().view(-1, V), target.view(-1))


def _per_token_arithmetic(logits, target):
    losses = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
    return (losses * 2).sum() / 7  # the user's arithmetic on the per-token losses


def _ignore_class_zero(logits, target):
    return F.cross_entropy(logits.flatten(0, 1), target.flatten().clamp(min=0), ignore_index=0)


def _tensor_constant_scale(logits, target):  # a tensor made inside the loss: a graph constant
    return lm_loss(logits, target) * torch.tensor(0.5, dtype=logits.dtype) + 1


def _dict_output_with_aux(output, target):
    """Token-weighted CE of output["logits"] plus a term of another output leaf."""
    total, count = lm_loss_sum(output["logits"], target)
    return total + 0.5 * output["aux"].sum() * count, count


RECOGNIZED = {
    # name: (loss_fn, [(op, reduction, ignore_index) per term])
    "lm_loss": (lm_loss, [("nll_loss", "mean", -100)]),
    "lm_loss_sum (token weighted)": (lm_loss_sum, [("nll_loss", "sum", -100)]),
    "shifted labels": (_shift_ce, [("nll_loss", "mean", -100)]),
    "class dim 1 (nll_loss2d)": (_transposed_ce, [("nll_loss", "mean", -100)]),
    "log_softmax + nll_loss": (_log_softmax_nll, [("nll_loss", "sum", -100)]),
    "label smoothing": (_label_smoothing, [("nll_loss", "mean", -100),
                                           ("log_prob_sum", None, None)]),
    "float cast first": (_float_cast, [("nll_loss", "mean", -100)]),
    "per-token losses, user arithmetic": (_per_token_arithmetic, [("nll_loss", "none", -100)]),
    "ignore_index=0": (_ignore_class_zero, [("nll_loss", "mean", 0)]),
    "tensor constant in the loss": (_tensor_constant_scale, [("nll_loss", "mean", -100)]),
}


def _one_rank_shard(padded: int = 512) -> tuple[ShardedLogits, ...]:
    """The logits as one rank holds them with tp=1: every column, plus padding."""
    return (ShardedLogits(leaf=0, shard="lm_head", gathered=(), mesh_dim=None, dim=2,
                          vocab_size=V, padded_vocab=padded, local_vocab=padded),)


def _inputs(dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    full = torch.randn(4, 16, V, generator=generator, dtype=dtype)
    target = torch.randint(0, V, (4, 16), generator=generator)
    target[:, :3] = -100
    return full, target


def _one_rank_path(loss_fn, full, target):
    """The loss path `loss_fn` takes on the one-rank shard of `full` logits."""
    return choose_loss_path(loss_fn, pytree.tree_structure(full), [full], _one_rank_shard(),
                            target, "cpu")


def _as_loss(result):
    return result[0] / result[1] if isinstance(result, tuple) else result


@pytest.mark.parametrize("name", list(RECOGNIZED))
def test_cross_entropy_forms_run_vocab_parallel_with_the_same_numbers(name):
    loss_fn, expected_terms = RECOGNIZED[name]
    full, target = _inputs()
    path = _one_rank_path(loss_fn, full, target)
    assert path.vocab_parallel, path.reason
    assert [(t.op, t.reduction, t.ignore_index) for t in path.loss.terms] == expected_terms
    assert "vocab-parallel cross-entropy" in str(path)
    traced_ops = {n.target for n in path.loss.gm.graph.nodes}
    assert torch.ops.aten._log_softmax.default not in traced_ops  # never over the full vocab
    assert torch.ops.aten.nll_loss_forward.default not in traced_ops

    logits = full.clone().requires_grad_()
    expected = _as_loss(loss_fn(logits, target))
    (expected_grad,) = torch.autograd.grad(expected, logits)
    # the "shard": every column, then a padding column with a large value that must not count
    shard = torch.cat([full, torch.full((4, 16, 1), 50.0, dtype=full.dtype)], -1)
    shard.requires_grad_()
    got = _as_loss(path.loss(shard, target))  # group None: one rank
    (grad,) = torch.autograd.grad(got, shard)
    tol = 1e-12 if got.dtype == torch.float64 else 1e-6  # "float cast first" is float32
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(grad[..., :V], expected_grad, rtol=tol * 100, atol=tol / 100)
    assert grad[..., V:].abs().max() == 0


def test_pytree_output_aux_term_runs_as_written():
    full, target = _inputs()
    aux = torch.randn(3, dtype=torch.float64)
    output = {"aux": aux, "logits": full}
    leaves, spec = pytree.tree_flatten(output)
    logits_leaf = next(i for i, leaf in enumerate(leaves) if leaf is full)
    sharded = (ShardedLogits(logits_leaf, "lm_head", (), None, 2, V, 512, 512),)
    path = choose_loss_path(_dict_output_with_aux, spec, leaves, sharded, target, "cpu")
    assert path.vocab_parallel, path.reason
    shard = torch.cat([full, torch.zeros(4, 16, 1, dtype=full.dtype)], -1)
    got = path.loss({"aux": aux, "logits": shard}, target)  # group None: one rank
    expected = _dict_output_with_aux(output, target)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def _mse(logits, target):
    return F.mse_loss(logits, torch.zeros_like(logits))


def _z_loss(logits, target):
    return lm_loss(logits, target) + 1e-4 * torch.logsumexp(logits, -1).pow(2).mean()


def _class_weights(logits, target):
    return F.cross_entropy(logits.view(-1, V), target.view(-1),
                           weight=torch.ones(V, dtype=logits.dtype))


def _data_dependent(logits, target):
    return lm_loss(logits, target) * float(target.float().mean().item() > 0)


def _soft_targets(logits, target):
    return F.cross_entropy(logits.view(-1, V), F.softmax(torch.ones_like(logits), -1).view(-1, V))


def _returns_logits(logits, target):
    return lm_loss(logits, target), logits


def _vocab_slice(logits, target):
    return F.cross_entropy(logits[..., :500].reshape(-1, 500), target.clamp(0, 499).reshape(-1))


FALLBACKS = {
    "mse on logits": (_mse, "zeros_like"),
    "z-loss reads logits": (_z_loss, "logsumexp"),
    "class weights": (_class_weights, "weights the classes"),
    "data-dependent python": (_data_dependent, "could not be traced"),
    "probability targets": (_soft_targets, "reads the logits"),
    "returns logits": (_returns_logits, "returns the logits"),
    "slices the vocabulary": (_vocab_slice, "does not keep the vocabulary dim whole"),
}


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_other_reads_of_the_logits_gather_them_and_say_why(name):
    loss_fn, reason = FALLBACKS[name]
    path = _one_rank_path(loss_fn, *_inputs())
    assert not path.vocab_parallel
    assert reason in path.reason and str(path).startswith("gathered logits: ")


def test_nothing_to_decide_without_shards_or_loss_fn():
    full, target = _inputs()
    spec = pytree.tree_structure(full)
    assert "no vocab-parallel logits" in choose_loss_path(lm_loss, spec, [full], (), target,
                                                          "cpu").reason
    assert "no loss_fn" in choose_loss_path(None, spec, [full], _one_rank_shard(), target,
                                            "cpu").reason


def test_traces_from_program_output_metadata_without_memory():
    """The program's own output metadata (meta tensors, full vocabulary) is enough to trace."""
    gm = _program("tp=2,rules=lm_head:vocab", vocab_size=V).stages[0].gm
    sharded = find_sharded_logits(gm)
    leaves = output_leaves(gm)
    assert leaves[0].shape == (4, 16, V)
    target = torch.zeros(4, 16, dtype=torch.long)
    path = choose_loss_path(lm_loss_sum, gm.graph._codegen.pytree_info.out_spec, leaves, sharded,
                            target, "cpu")
    assert path.vocab_parallel, path.reason
    logits = next(iter(path.loss.gm.graph.find_nodes(op="placeholder")))
    (view,) = logits.users  # the loss's view(-1, 511) now views the shard's 256 columns
    assert view.target is torch.ops.aten.view.default and list(view.args[1]) == [64, 256]
