"""Small helpers on torch.fx nodes and their metadata, shared by every pass and report."""

from __future__ import annotations

import torch
from torch import fx


def val_of(node):
    """The FakeTensor (or list of them, or scalar) capture recorded for `node`; None for
    non-nodes and nodes without one."""
    meta = getattr(node, "meta", None) if isinstance(node, fx.Node) else None
    return meta.get("val") if meta else None


def tensor_of(node) -> torch.Tensor | None:
    """`node`'s value if it is one tensor; for a list of tensors, the first (split's pieces
    share every dim but the split one)."""
    val = val_of(node)
    if isinstance(val, (list, tuple)):
        val = val[0] if val else None
    return val if isinstance(val, torch.Tensor) else None


def shape_of(node) -> tuple[int, ...] | None:
    """`tensor_of(node)`'s shape as ints, or None when the node carries no tensor."""
    val = tensor_of(node)
    return None if val is None else tuple(int(s) for s in val.shape)


def norm_dim(dim: int, ndim: int) -> int:
    """A possibly negative dimension index as a non-negative one."""
    return dim + ndim if dim < 0 else dim


def module_path(node: fx.Node) -> str:
    """The innermost module path of a node ('' for the root)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return clean_module_path(path)


def clean_module_path(path: str) -> str:
    """export spells submodules of a ModuleList as "blocks.0" but sometimes as
    "L['self'].blocks[0]"; this is the first spelling."""
    return path.replace("L['self'].", "").replace("[", ".").replace("]", "").strip(".")


def eliminate_dead_code(graph: fx.Graph) -> None:
    """fx's dead-code elimination, keeping calls of higher-order ops: their sub-graphs may
    mutate state with no output to show for it (a `torch.no_grad()` block that updates a
    buffer, as DeepSeek's selection bias from token counts), which fx would count as dead."""
    graph.eliminate_dead_code(is_impure_node=_impure)


def erase_unread(graph: fx.Graph, nodes) -> None:
    """Erase each of `nodes` that nothing reads, then each of its inputs this leaves unread,
    and so on: what `eliminate_dead_code` removes after a rewrite stopped reading `nodes`,
    without walking the whole graph (same rule: impure nodes and higher-order ops stay)."""
    todo, erased = list(nodes), set()
    while todo:
        node = todo.pop()
        if node in erased or node.users or _impure(node):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erased.add(node)
        todo.extend(inputs)


def _impure(node: fx.Node) -> bool:
    return node.is_impure() or isinstance(node.target, torch._ops.HigherOrderOperator)
