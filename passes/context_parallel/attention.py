"""How the context-parallel pass replaces attention: ring attention (core.ops.ring_attention,
the model's own mask kept whole and read per block) or all-to-all to head shards and back."""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING

import torch
from torch import fx

from core import ops
from core.fx_utils import tensor_of
from passes import PassError
from passes.propagation import tensor_shape

if TYPE_CHECKING:
    from passes.context_parallel.shard import Sharder

aten = torch.ops.aten
MESH_DIM = "cp"
SDPA = aten.scaled_dot_product_attention.default


def mask_of(node: fx.Node):
    """An attention call's mask argument (a node, or None)."""
    return node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")


def is_causal(node: fx.Node) -> bool:
    return bool(node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False))


def resized(shape, dim: int, size: int) -> list[int]:
    shape = list(shape)
    shape[dim] = size
    return shape


def attend(sharder: Sharder, node: fx.Node) -> None:
    q, k, v = node.args[:3]
    mask = mask_of(node)
    dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
    seq_dim = len(tensor_shape(node)) - 2
    if dropout:
        raise PassError(f"context_parallel: attention {node.name} has dropout_p={dropout}; "
                        f"cp reproduces attention exactly and cannot match its dropout "
                        f"mask: set the attention dropout to 0 or use cp=1")
    for t in (q, k, v):
        if t not in sharder.dims:
            node.replace_input_with(t, sharder._enter(t, seq_dim, before=node))
    q, k, v = node.args[:3]
    if any(sharder.dims[t] != seq_dim for t in (q, k, v)):
        sharder._gather_inputs(node, "attention on values not sharded along the sequence")
        return
    if isinstance(mask, fx.Node):
        whole = _whole_mask(sharder, node, mask)
        node.replace_input_with(mask, whole)
        mask = whole
    sharder.attention.append(node.name)
    if sharder.algo == "a2a":
        _all_to_all_attention(sharder, node, seq_dim)
    else:
        _ring_attention(sharder, node, mask, seq_dim)

def _whole_mask(sharder: Sharder, node: fx.Node, mask: fx.Node) -> fx.Node:
    """The model's (.., S, S) mask, whole on every rank (ring attention indexes it at each
    block's global positions; a2a attends over the whole sequence), padded so that padded
    keys are seen by no real query and each padded query sees only itself (never a row
    with nothing visible)."""
    shape = tensor_shape(mask)
    if len(shape) < 2 or shape[-2:] != (sharder.seq, sharder.seq) or (
            len(shape) >= 3 and shape[-3] != 1):
        raise PassError(
            f"context_parallel: attention {node.name} reads the mask {mask.name} {shape}; "
            f"cp takes masks of shape (.., 1, {sharder.seq}, {sharder.seq}) (one for every head, "
            f"over the whole sequence of {sharder.seq}). Broadcast the mask over the heads, or "
            f"use is_causal=True for a causal mask")
    if mask in sharder.dims:
        mask = sharder._gather(mask, before=node)
    padding = sharder.layout.length - sharder.seq
    if not padding:
        return mask
    boolean = tensor_of(mask).dtype == torch.bool
    length = sharder.layout.length
    padded_shape = [*shape[:-2], length, length]
    with sharder.graph.inserting_before(node):
        padded = sharder._call(aten.constant_pad_nd.default,
                            (mask, [0, padding, 0, padding],
                             False if boolean else float("-inf")), {}, mask,
                            shape=padded_shape)
        positions = sharder.graph.call_function(aten.arange.default, (length,),
                                             {"dtype": torch.long,
                                              "device": tensor_of(mask).device})
        positions.meta["val"] = torch.empty(length, dtype=torch.long, device="meta")
        square = [length, length]
        rows = sharder._call(aten.unsqueeze.default, (positions, 1), {}, positions,
                          shape=[length, 1])
        cols = sharder._call(aten.unsqueeze.default, (positions, 0), {}, positions,
                          shape=[1, length])
        diagonal = sharder._call(aten.eq.Tensor, (rows, cols), {}, mask, shape=square)
        beyond = sharder._call(aten.ge.Scalar, (rows, sharder.seq), {}, mask, shape=[length, 1])
        own = sharder._call(aten.logical_and.default, (diagonal, beyond), {}, mask,
                         shape=square)
        for n in (diagonal, beyond, own):
            n.meta["val"] = n.meta["val"].to(torch.bool)
        if boolean:
            return sharder._call(aten.logical_or.default, (padded, own), {}, mask,
                              shape=padded_shape)
        return sharder._call(aten.where.ScalarSelf, (own, 0.0, padded), {}, mask,
                          shape=padded_shape)

def _ring_attention(sharder: Sharder, node: fx.Node, mask, seq_dim: int) -> None:
    q, k, v = node.args[:3]
    scale = node.kwargs.get("scale")
    scale = 1.0 / math.sqrt(tensor_shape(q)[-1]) if scale is None else float(scale)
    with sharder.graph.inserting_before(node):
        pair = sharder.graph.call_function(
            ops.ring_attention, (q, k, v, MESH_DIM, sharder.layout.length,
                                 sharder.layout.balanced, is_causal(node), scale, mask))
        out = sharder.graph.call_function(operator.getitem, (pair, 0))
    val = tensor_of(node)
    pair.meta.update(node.meta)
    pair.meta["val"] = (val, val.new_empty(val.shape[:-1]))
    out.meta.update(node.meta)
    sharder.dims[pair] = (seq_dim, seq_dim)
    sharder.dims[out] = seq_dim
    node.replace_all_uses_with(out)
    sharder.graph.erase_node(node)
    sharder.erased.add(node)

def _all_to_all_attention(sharder: Sharder, node: fx.Node, seq_dim: int) -> None:
    q, k, v = node.args[:3]
    head_dim, cp = seq_dim - 1, sharder.layout.cp
    for name, t in (("heads", q), ("kv heads", k)):
        heads = tensor_shape(t)[head_dim]
        if heads % cp:
            raise PassError(
                f"context_parallel: cp_algo=a2a splits the attention heads over cp, and "
                f"attention {node.name} has {heads} {name} (after tp), which do not divide "
                f"by cp={cp}; use cp_algo=ring, or a cp that divides {heads}")
    def whole_sequence(shape, heads):  # head shards over the whole (padded) sequence
        shape = resized(shape, head_dim, heads // cp)
        return resized(shape, seq_dim, sharder.layout.length)

    with sharder.graph.inserting_before(node):
        heads_split = []
        for t in (q, k, v):
            exchange = sharder.graph.call_function(ops.all_to_all,
                                                (t, MESH_DIM, head_dim, seq_dim))
            exchange.meta.update(t.meta)
            shape = tensor_shape(t)
            exchange.meta["val"] = tensor_of(t).new_empty(
                whole_sequence(shape, shape[head_dim]))
            heads_split.append(exchange)
    node.args = (*heads_split, *node.args[3:])
    val = tensor_of(node)
    full_val = val
    node.meta["val"] = val.new_empty(whole_sequence(val.shape, val.shape[head_dim]))
    with sharder.graph.inserting_after(node):
        back = sharder.graph.call_function(ops.all_to_all, (node, MESH_DIM, seq_dim, head_dim))
    back.meta.update(node.meta)
    back.meta["val"] = full_val
    node.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
    sharder.dims[back] = seq_dim
