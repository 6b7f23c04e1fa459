"""The sequence zone: the values between tensor-parallel regions that may run on sequence
shards, found by flooding from the regions' boundaries through token-wise ops (elementwise,
reductions and norms over features, dropout, views that keep or flatten the token dims).

A zone value is split along one tensor dim (`SeqSplit`): the sequence dim of a (batch, seq,
...) tensor, or the flattened batch*seq dim of a (batch*seq, ...) tensor. Each token-wise rule
answers the reverse of the propagation table's question: given how the output is split, how is
each operand read (split, or whole where it broadcasts over the tokens)? The shared table
(`passes.propagation`) then confirms the op carries those reads to the output's split; what
this module adds is what only sequence parallelism knows: which dims are tokens (reductions
and softmax must act on the dims after them) and views that flatten (batch, seq).
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import torch
from torch import fx

from core.fx_utils import norm_dim, tensor_of, val_of
from core.meta import TP_PLACEMENT
from core.placement import Placements, Shard
from passes.propagation import NotCarried, carry, tensor_shape
from passes.propagation.table import BINARY, NORMS, REDUCTIONS, SOFTMAX, UNARY, aten_ops
from passes.tensor_parallel.rules import MESH_DIM

log = logging.getLogger(__name__)

aten = torch.ops.aten
REPLICATED = Placements()


@dataclass(frozen=True)
class SeqSplit:
    """A value split over tp along tensor dim `dim`, which is the sequence dim (`flat` False)
    or the flattened batch*seq dim (`flat` True)."""

    dim: int
    flat: bool = False

    @property
    def placements(self) -> Placements:
        return Placements.of(**{MESH_DIM: Shard(self.dim)})


class NotTokenwise(NotCarried):
    """The op mixes tokens (or its shapes do not show the token dims): not in the zone."""


@dataclass(frozen=True)
class Tokens:
    batch: int
    seq: int

    def size(self, split: SeqSplit) -> int:
        return self.batch * self.seq if split.flat else self.seq


def _fits(node, split: SeqSplit, tokens: Tokens) -> bool:
    try:
        shape = tensor_shape(node)
    except NotCarried:
        return False
    return split.dim < len(shape) and shape[split.dim] == tokens.size(split)


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if isinstance(tensor_of(a), torch.Tensor)]


# --- token-wise ops: (node, output split, tokens) -> {tensor arg: its split or None} ----------
# None marks an operand that broadcasts over the tokens (a weight, a bias, a scalar tensor).

def _confirmed(node, split, reads: dict) -> dict:
    """`reads` if the shared propagation table carries them to the output's split: the op
    neither reduces, mixes nor moves the token dim."""
    try:
        out = carry(node, {a: s.dim for a, s in reads.items() if s is not None})
    except NotCarried as why:
        raise NotTokenwise(str(why)) from None
    if (out[0] if isinstance(out, tuple) else out) != split.dim:
        raise NotTokenwise(f"{node.name} moves the token dim")
    return reads


def _first(node, split, tokens):  # one token-wise operand: elementwise, norms over features
    x = node.args[0]
    return _confirmed(node, split, {a: (split if a is x else None) for a in _tensor_args(node)})


def _broadcast(node, split, tokens):  # elementwise with broadcasting (right-aligned)
    out_ndim = len(tensor_shape(node))
    splits = {}
    for arg in _tensor_args(node):
        shape = tensor_shape(arg)
        dim = split.dim - (out_ndim - len(shape))
        if dim >= 0 and shape[dim] == tokens.size(split):
            splits[arg] = SeqSplit(dim, split.flat)
        elif dim < 0 or shape[dim] == 1:
            splits[arg] = None
        else:
            raise NotTokenwise(f"operand {arg.name} {shape} does not broadcast over tokens")
    return _confirmed(node, split, splits)


def _over_features(node, split, tokens):  # reductions and softmax over dims after the tokens
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if not dims or any(norm_dim(d, len(tensor_shape(node.args[0]))) <= split.dim for d in dims):
        raise NotTokenwise(f"reduces over dims {dims}, which include the tokens")
    return _first(node, split, tokens)


def _getitem(node, split, tokens):  # an output of a multi-output zone op (native_layer_norm)
    return {node.args[0]: split}


def _view(node, split, tokens):
    """view/reshape: keeps the dims up to the tokens, or flattens / unflattens (batch, seq)."""
    x = node.args[0]
    src, dst = tensor_shape(x), tensor_shape(node)
    batch, seq = tokens.batch, tokens.seq
    if split.flat and split.dim == 0 and src[:2] == (batch, seq):
        return {x: SeqSplit(1)}  # (b, s, ...) -> (b*s, ...)
    if not split.flat and split.dim == 1 and dst[:2] == (batch, seq) and src[0] == batch * seq:
        return {x: SeqSplit(0, flat=True)}  # (b*s, ...) -> (b, s, ...)
    if src[:split.dim + 1] == dst[:split.dim + 1]:
        return {x: split}  # only dims after the tokens change
    raise NotTokenwise(f"view {src} -> {dst} moves the tokens")


def _rule_table():
    table = {op: _first for op in aten_ops(UNARY + NORMS)}
    table.update({op: _broadcast for op in aten_ops(BINARY)})
    table.update({op: _over_features for op in aten_ops(REDUCTIONS + SOFTMAX)})
    table.update({
        operator.getitem: _getitem,
        aten.view.default: _view,  # (b, s, h) <-> (b*s, h): the tokens stay split
        aten.reshape.default: _view,
        aten._unsafe_view.default: _view,
    })
    return table


RULES = _rule_table()


def _eligible(node: fx.Node) -> bool:
    """A replicated op of the tensor-parallel graph that may run on sequence shards."""
    return (node.op == "call_function" and node.target in RULES
            and node.meta.get(TP_PLACEMENT, REPLICATED).replicated)


def _input_splits(node, split, tokens) -> dict:
    if not _fits(node, split, tokens):
        raise NotTokenwise(f"{node.name} {tensor_shape(node)} has no token dim {split}")
    return RULES[node.target](node, split, tokens)


def _forward_split(user: fx.Node, arg: fx.Node, arg_split: SeqSplit, tokens):
    """The split of `user`'s output under which `arg` is read as `arg_split`, or None."""
    try:
        ndim = len(tensor_shape(user))
    except NotCarried:
        return None
    for dim in range(ndim):
        for flat in (False, True):
            candidate = SeqSplit(dim, flat)
            try:
                if _input_splits(user, candidate, tokens).get(arg) == arg_split:
                    return candidate
            except NotCarried:
                continue
    return None


# --- the zone -------------------------------------------------------------------------------

def tokens_of(graph: fx.Graph, seeds: list[fx.Node]) -> Tokens | None:
    """(batch, seq) of the model's tokens: the first input with >= 2 dims (input ids or
    embeddings), else the first 3-d tensor-parallel boundary (batch, seq, hidden)."""
    for node in graph.find_nodes(op="placeholder"):
        val = val_of(node)
        if isinstance(val, torch.Tensor) and val.dim() >= 2:
            return Tokens(int(val.shape[0]), int(val.shape[1]))
    for node in seeds:
        shape = tensor_shape(node)
        if len(shape) == 3:
            return Tokens(shape[0], shape[1])
    return None


def boundary_split(node: fx.Node, tokens: Tokens) -> SeqSplit | None:
    """How a tensor-parallel boundary value (batch, seq, hidden) or (batch*seq, hidden) is
    split along its tokens, or None when its shape shows no tokens."""
    try:
        shape = tensor_shape(node)
    except NotCarried:
        return None
    if len(shape) >= 3 and shape[:2] == (tokens.batch, tokens.seq):
        return SeqSplit(1)
    if len(shape) >= 2 and shape[0] == tokens.batch * tokens.seq:
        return SeqSplit(0, flat=True)
    return None


def find_zone(graph: fx.Graph, reduces: dict, copies: list, tokens: Tokens):
    """(zone: node -> split, reads: zone node -> {arg: split or None}), flooding from the
    tensor-parallel boundaries through token-wise ops in both directions."""
    zone: dict[fx.Node, SeqSplit] = {}
    reads: dict[fx.Node, dict] = {}
    todo: list[fx.Node] = []

    def claim(node: fx.Node, split: SeqSplit) -> bool:
        if node in zone:
            return zone[node] == split
        if not _eligible(node):
            return False
        try:
            splits = _input_splits(node, split, tokens)
        except NotCarried as why:
            log.debug("sequence_parallel: %s stays whole: %s", node.name, why)
            return False
        zone[node], reads[node] = split, splits
        todo.append(node)
        return True

    for node, split in reduces.items():  # the reduce-scatters start the zone
        zone[node], reads[node] = split, {}
        todo.append(node)
    for copy in copies:
        split = boundary_split(copy.args[0], tokens)
        if split is not None:
            claim(copy.args[0], split)
    while todo:
        node = todo.pop()
        for arg, split in reads[node].items():
            if split is not None and arg.op == "call_function":
                claim(arg, split)
        for user in node.users:
            if user not in zone and _eligible(user):
                split = _forward_split(user, node, zone[node], tokens)
                if split is not None:
                    claim(user, split)
    return zone, reads
