"""What the tensor-parallel pass can split: projections (a matmul with a parameter weight, in
its three aten spellings), embedding lookups, and the sub-blocks of a fused projection."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from core.fx_utils import norm_dim, val_of
from passes.propagation import tensor_shape
from passes.tensor_parallel.rules import ndim

aten = torch.ops.aten


@dataclass(frozen=True)
class Projection:
    """A matmul with a parameter weight: aten.linear (weight (out, in)) or addmm/mm/matmul with
    a transposed (in, out) weight (Hugging Face GPT-2's Conv1D)."""

    node: fx.Node
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    out_dim: int
    """The weight's output-feature dimension: 0 for linear, 1 for (in, out) weights."""


def is_param(node) -> bool:
    return (isinstance(node, fx.Node) and node.op == "get_attr"
            and isinstance(val_of(node), torch.Tensor))


def projection(node: fx.Node) -> Projection | None:
    """The projection `node` computes, or None (the table of what counts as one)."""
    if node.op != "call_function" or node.kwargs.get("beta", 1) != 1 or \
            node.kwargs.get("alpha", 1) != 1:
        return None
    args = node.args
    if node.target is aten.linear.default and len(args) >= 2:  # x @ w.T + b
        bias = args[2] if len(args) > 2 else node.kwargs.get("bias")
        proj = Projection(node, args[0], args[1], bias, 0)
    elif node.target is aten.addmm.default and len(args) == 3:  # b + x @ w (Conv1D)
        proj = Projection(node, args[1], args[2], args[0], 1)
    elif node.target in (aten.mm.default, aten.matmul.default) and len(args) == 2:  # x @ w
        proj = Projection(node, args[0], args[1], None, 1)
    else:
        return None
    if not is_param(proj.weight) or val_of(proj.weight).dim() != 2 or \
            not isinstance(proj.x, fx.Node):
        return None
    if proj.bias is not None and not (is_param(proj.bias) and val_of(proj.bias).dim() == 1):
        return None
    return proj


def find_projections(graph: fx.Graph) -> tuple[dict[fx.Node, Projection], list[fx.Node]]:
    """Every projection (node -> what it computes) and every parameter lookup, in graph order."""
    projs = {n: p for n in graph.nodes if (p := projection(n)) is not None}
    return projs, [n for n in graph.nodes if is_lookup(n)]


def is_lookup(node: fx.Node) -> bool:
    """embedding(table, ids) with a parameter table."""
    return (node.op == "call_function" and node.target is aten.embedding.default
            and is_param(node.args[0]) and isinstance(node.args[1], fx.Node))


def lookup_arg(node: fx.Node, index: int, name: str, default):
    """embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False)."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def fused_blocks(lin: fx.Node) -> tuple[int, ...]:
    """Sub-block sizes of a fused projection, read from how its output is split along the
    features (looking through reshapes that keep the feature dim, as Conv1D's view)."""
    out = tensor_shape(lin)[-1]
    todo = [lin]
    while todo:
        node = todo.pop()
        nd = ndim(node)
        for user in node.users:
            if user.op != "call_function":
                continue
            if user.target in RESHAPES and tensor_shape(user)[-1] == out:
                todo.append(user)
                continue
            dim = user.args[2] if len(user.args) > 2 else user.kwargs.get("dim", 0)
            if user.target in (aten.split_with_sizes.default, aten.split.Tensor,
                               aten.chunk.default) and norm_dim(dim, nd) == nd - 1:
                return tuple(int(v.shape[-1]) for v in val_of(user))
    return (out,)

