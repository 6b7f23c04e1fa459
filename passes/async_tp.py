"""Async tensor parallelism (plan `async_tp=on`, which needs `sp=on`): sp's collectives fused
with the matmuls beside them, so that each is decomposed into tp ring steps overlapped with
per-chunk matmuls (core.ops.all_gather_matmul / matmul_reduce_scatter; runtime/async_tp.py).

Two rules, each on the graph sp left (every graph module: stages are still one graph here,
checkpointed regions of recompute=full are graphs of their own):

    gather_for_region(x, tp) read only by aten.linear(gathered, w[, b])
        -> all_gather_matmul(x, [w...], [b...])    # q, k, v (or gate, up) share one ring
    reduce_scatter(aten.linear(y, w), tp) where the linear has no bias and no other reader
        -> matmul_reduce_scatter(y, w)             # o_proj / down_proj's partial sums

A gather or reduce-scatter a rule does not match (a reader that is no linear, as HF GPT-2's
Conv1D `addmm` on a flattened view; a reduce-scatter of an embedding) is left as it is, named in
the record with the reason. Runs before `collectives`, which fixes the fused ops' groups as it
does every collective's; the gathers it fuses no longer need sp's saved-as-shard regions (the
fused op keeps only the shard for backward itself).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from core import meta, ops
from passes import PassContext, recompile

aten = torch.ops.aten
MESH_DIM = "tp"


@dataclass(frozen=True)
class AsyncTensorParallelRecord:
    """What `async_tp` fused, and what it left as a plain collective."""

    gathers: tuple[tuple[str, tuple[str, ...]], ...]
    """(gather_for_region, the linears fused with it), for each fused gather."""
    scatters: tuple[tuple[str, str], ...]
    """(reduce_scatter, the linear fused with it)."""
    left: tuple[tuple[str, str], ...]
    """(collective over tp, why no rule applied)."""

    def summary(self) -> str:
        linears = sum(len(readers) for _, readers in self.gathers)
        return (f"{len(self.gathers)} all-gathers fused with {linears} column linears, "
                f"{len(self.scatters)} reduce-scatters with their row linears; "
                f"{len(self.left)} collectives left unfused")


def async_tensor_parallel(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    gathers, scatters, left = [], [], []
    for module in list(gm.modules()):
        if not isinstance(module, fx.GraphModule):
            continue
        changed = False
        for node in list(module.graph.nodes):
            if node.op != "call_function" or len(node.args) < 2 or node.args[1] != MESH_DIM:
                continue
            if node.target is ops.gather_for_region:
                readers = tuple(user.name for user in node.users)
                why = _fuse_gather(module.graph, node)
                if why is None:
                    gathers.append((node.name, readers))
            elif node.target is ops.reduce_scatter:
                why = _fuse_scatter(module.graph, node)
                if why is None:
                    scatters.append((node.name, node.args[0].name))
            else:
                continue
            if why is None:
                _erase_fused(module.graph, node)
                changed = True
            else:
                left.append((node.name, why))
        if changed:
            module.graph.lint()
            recompile(module)
    gm.meta[meta.ASYNC_TP_RECORD] = AsyncTensorParallelRecord(
        gathers=tuple(gathers), scatters=tuple(scatters), left=tuple(left))
    return gm


def overlap_column_backward(gm: fx.GraphModule) -> dict[fx.GraphModule, list[str]]:
    """Every copy_to_region over tp read only by linears, in every graph module of `gm`,
    becomes one copy_matmul: the input gradient's all-reduce overlaps the weight gradients
    (passes.lowering.collectives applies it to the programs that run, and lints and
    recompiles the graph modules it changed with its own changes). Returns the entries so
    fused, by graph module."""
    fused: dict[fx.GraphModule, list[str]] = {}
    for module in list(gm.modules()):
        if not isinstance(module, fx.GraphModule):
            continue
        for node in list(module.graph.nodes):
            if node.op == "call_function" and node.target is ops.copy_to_region \
                    and node.args[1] == MESH_DIM and _fuse_copy(module.graph, node) is None:
                fused.setdefault(module, []).append(node.name)
                module.graph.erase_node(node)
    return fused


# --- the rules: each returns None when it fused, else why it does not apply -----------------

def _linear_parts(node: fx.Node):
    """(input, weight, bias or None) of an aten.linear node."""
    args = list(node.args) + [None] * (3 - len(node.args))
    return args[0], args[1], node.kwargs.get("bias", args[2])


def _feature_dim(node: fx.Node, dim: int) -> bool:
    rank = node.meta[meta.VAL].dim()
    return dim % rank == rank - 1


def _fuse_gather(graph: fx.Graph, gather: fx.Node) -> str | None:
    """gather_for_region read only by linears -> one all_gather_matmul."""
    x, _, dim = gather.args[:3]
    if _feature_dim(gather, dim):
        return f"it gathers the feature dim {dim}"
    return _fuse_entry(graph, gather, ops.all_gather_matmul, lambda weights, biases: (
        x, weights, biases, MESH_DIM, dim), "all_gather")


def _fuse_copy(graph: fx.Graph, copy: fx.Node) -> str | None:
    """copy_to_region read only by linears -> one copy_matmul."""
    x = copy.args[0]
    return _fuse_entry(graph, copy, ops.copy_matmul, lambda weights, biases: (
        x, weights, biases, MESH_DIM), None)


def _fuse_entry(graph: fx.Graph, gather: fx.Node, op, args, collective) -> str | None:
    """A column region's entry (`gather`) read only by linears -> one `op(*args(weights,
    biases))` with one getitem per linear."""
    readers = list(gather.users)
    if not readers:
        return "nothing reads the gathered value"
    for reader in readers:
        if reader.target is not aten.linear.default:
            return f"{reader.name} ({reader.target}) reads the gathered value and is no linear"
        inp, weight, bias = _linear_parts(reader)
        if inp is not gather or weight is gather or bias is gather:
            return f"{reader.name} reads the gathered value other than as its input"
    first = min(readers)  # nodes of one graph compare by their position in it
    operands = [a for r in readers for a in _linear_parts(r)[1:] if isinstance(a, fx.Node)]
    if any(a > first for a in operands):
        return "a linear's weight is computed after the first linear reading the gather"
    weights = [_linear_parts(r)[1] for r in readers]
    biases = [_linear_parts(r)[2] for r in readers]
    with graph.inserting_before(first):
        fused = graph.call_function(op, args(weights, biases), dict(gather.kwargs))
        fused.meta = {**gather.meta, meta.VAL: [r.meta[meta.VAL] for r in readers],
                      meta.COLLECTIVE: collective}
        fused.meta.pop(meta.TP_PLACEMENT, None)
        for i, reader in enumerate(readers):
            item = graph.call_function(operator.getitem, (fused, i))
            item.meta = dict(reader.meta)
            reader.replace_all_uses_with(item)
    for reader in readers:
        graph.erase_node(reader)
    return None


def _fuse_scatter(graph: fx.Graph, scatter: fx.Node) -> str | None:
    """reduce_scatter of a bias-free linear read by nothing else -> matmul_reduce_scatter."""
    linear, _, dim = scatter.args[:3]
    if not isinstance(linear, fx.Node) or linear.target is not aten.linear.default:
        return f"it reduces {getattr(linear, 'name', linear)}, which is no linear"
    inp, weight, bias = _linear_parts(linear)
    if bias is not None:
        return f"{linear.name} adds a bias before the reduction"
    if len(linear.users) != 1:
        return f"{linear.name}'s partial sums have other readers"
    if _feature_dim(scatter, dim):
        return f"it scatters the feature dim {dim}"
    with graph.inserting_before(scatter):
        fused = graph.call_function(ops.matmul_reduce_scatter, (inp, weight, MESH_DIM, dim),
                                    dict(scatter.kwargs))
        fused.meta = dict(scatter.meta)
        fused.meta[meta.COLLECTIVE] = "reduce_scatter"
    scatter.replace_all_uses_with(fused)
    return None


def _erase_fused(graph: fx.Graph, node: fx.Node) -> None:
    """The collective a rule replaced (and a reduce-scatter's linear, now unread)."""
    inner = node.args[0] if node.target is ops.reduce_scatter else None
    graph.erase_node(node)
    if isinstance(inner, fx.Node) and not inner.users:
        graph.erase_node(inner)
