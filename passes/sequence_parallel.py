"""Sequence parallelism (Korthikanti et al. 2022; Megatron-Core's `sequence_parallel=True`).

Runs after tensor_parallel. Between tensor-parallel regions the activations (residual stream,
norms, dropout) are the same on every tp rank; SP keeps them split along the sequence instead,
so each rank computes and stores 1/tp of them:

- a row region's `all_reduce(y, "tp")` becomes `reduce_scatter(y, "tp", seq)` (so does the
  vocab-parallel embedding's);
- a column region's `copy_to_region(x, "tp")` becomes `gather_for_region(x, "tp", seq)`
  (all-gather forward, reduce-scatter backward);
- the *sequence zone* is every node connected to those collectives through token-wise ops
  (elementwise, reductions and norms over features, dropout, views that keep or flatten the
  token dims); its values take their local shapes. Embedding lookups stay whole on purpose: on
  sequence shards their table's gradient would be partial and need an all-reduce of the whole
  table (vocab x hidden) per microbatch, where scattering their output costs an all-gather of
  one activation gradient (Megatron scatters the embedding output too);
- where the zone reads a value that spans the sequence from outside (a replicated embedding's
  output, anything computed off the zone) `scatter` keeps this rank's slice; where a zone value
  leaves it (a replicated LM head, the graph output, any op that mixes tokens) `all_gather`
  restores it;
- tensors the zone reads that broadcast over the sequence and carry gradients (norm weights,
  biases) are read through `copy_to_region(., "tp")`: each rank's gradient covers only its
  tokens and the all-reduce in backward sums them (Megatron's all-reduce of sequence-parallel
  parameter gradients, done per use).

A zone value is split along one tensor dim (`SeqSplit`): the sequence dim of a (batch, seq, ...)
tensor, or the flattened batch*seq dim of a (batch*seq, ...) tensor (Hugging Face Conv1D views
its input as (-1, hidden)). Flattened values keep the sequence split: collectives on them view
to (batch, seq, ...) first, so both forms hold the same tokens.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import torch
from torch import fx

from passes import PassContext, PassError
from passes.tensor_parallel import (ELEMENTWISE_BINARY, ELEMENTWISE_UNARY, LAYOUTS_KEY, MESH_DIM,
                                    PLACEMENT_KEY, aten_ops)
from core.ops import (all_gather, all_reduce, copy_to_region, gather_for_region,
                      reduce_scatter, scatter)

log = logging.getLogger(__name__)

aten = torch.ops.aten


@dataclass(frozen=True)
class SeqSplit:
    """A value split over tp along tensor dim `dim`, which is the sequence dim (`flat` False)
    or the flattened batch*seq dim (`flat` True)."""

    dim: int
    flat: bool = False

    def __str__(self) -> str:
        return f"S({self.dim})@{MESH_DIM}"


class SequenceNotDivisible(PassError):
    """The sequence length is not a multiple of tp (sp cannot split it)."""


class _NotTokenwise(Exception):
    """The op mixes tokens (or its shapes do not show the token dims): not in the zone."""


@dataclass(frozen=True)
class _Tokens:
    batch: int
    seq: int

    def size(self, split: SeqSplit) -> int:
        return self.batch * self.seq if split.flat else self.seq


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _first_tensor(val):
    if isinstance(val, (list, tuple)):
        return val[0] if val and isinstance(val[0], torch.Tensor) else None
    return val if isinstance(val, torch.Tensor) else None


def _shape(node) -> tuple[int, ...]:
    val = _first_tensor(_val(node))
    if val is None:
        raise _NotTokenwise(f"{getattr(node, 'name', node)} has no tensor shape")
    return tuple(int(s) for s in val.shape)


def _fits(node, split: SeqSplit, tokens: _Tokens) -> bool:
    try:
        shape = _shape(node)
    except _NotTokenwise:
        return False
    return split.dim < len(shape) and shape[split.dim] == tokens.size(split)


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if isinstance(_first_tensor(_val(a)), torch.Tensor)]


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


# --- token-wise ops: (node, output split, tokens) -> {tensor arg: its split or None} ----------
# None marks an operand that broadcasts over the tokens (a weight, a bias, a scalar tensor).

def _same(node, split, tokens):  # unary ops: the first operand is split as the output
    first = node.args[0]
    return {a: (split if a is first else None) for a in _tensor_args(node)}


def _broadcast(node, split, tokens):  # elementwise with broadcasting (right-aligned)
    out_ndim = len(_shape(node))
    splits = {}
    for arg in _tensor_args(node):
        shape = _shape(arg)
        dim = split.dim - (out_ndim - len(shape))
        if dim >= 0 and shape[dim] == tokens.size(split):
            splits[arg] = SeqSplit(dim, split.flat)
        elif dim < 0 or shape[dim] == 1:
            splits[arg] = None
        else:
            raise _NotTokenwise(f"operand {arg.name} {shape} does not broadcast over tokens")
    return splits


def _over_features(dims, split: SeqSplit, ndim: int) -> None:
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not dims or any(_norm(d, ndim) <= split.dim for d in dims):
        raise _NotTokenwise(f"reduces over dims {dims}, which include the tokens")


def _reduction(node, split, tokens):  # mean.dim / sum.dim_IntList / amax / var over features
    x = node.args[0]
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        raise _NotTokenwise("reduces over every dim")
    _over_features(dims, split, len(_shape(x)))
    return {a: (split if a is x else None) for a in _tensor_args(node)}


def _normalization(node, split, tokens):  # layer_norm / native_layer_norm / rms_norm
    x, normalized_shape = node.args[0], node.args[1]
    ndim = len(_shape(x))
    _over_features(list(range(ndim - len(normalized_shape), ndim)), split, ndim)
    return {a: (split if a is x else None) for a in _tensor_args(node)}


def _softmax(node, split, tokens):  # softmax / log_softmax over a feature dim
    x = node.args[0]
    _over_features(node.args[1], split, len(_shape(x)))
    return {a: (split if a is x else None) for a in _tensor_args(node)}


def _getitem(node, split, tokens):  # an output of a multi-output zone op (native_layer_norm)
    return {node.args[0]: split}


def _view(node, split, tokens):
    """view/reshape: keeps the dims up to the tokens, or flattens / unflattens (batch, seq)."""
    x = node.args[0]
    src, dst = _shape(x), _shape(node)
    batch, seq = tokens.batch, tokens.seq
    if split.flat and split.dim == 0 and src[:2] == (batch, seq):
        return {x: SeqSplit(1)}  # (b, s, ...) -> (b*s, ...)
    if not split.flat and split.dim == 1 and dst[:2] == (batch, seq) and src[0] == batch * seq:
        return {x: SeqSplit(0, flat=True)}  # (b*s, ...) -> (b, s, ...)
    if src[:split.dim + 1] == dst[:split.dim + 1]:
        return {x: split}  # only dims after the tokens change
    raise _NotTokenwise(f"view {src} -> {dst} moves the tokens")


# The tensor-parallel pass's elementwise ops, and a few more that norms and dropout between
# regions are written with.
_UNARY = ELEMENTWISE_UNARY + ["reciprocal.default", "native_dropout.default", "abs.default",
                              "square.default"]
_BINARY = ELEMENTWISE_BINARY + ["pow.Tensor_Tensor"]
_REDUCTIONS = ["mean.dim", "sum.dim_IntList", "amax.default", "var.correction",
               "var_mean.correction", "var.dim"]


def _rule_table():
    table = {op: _same for op in aten_ops(_UNARY)}
    table.update({op: _broadcast for op in aten_ops(_BINARY)})
    table.update({op: _reduction for op in aten_ops(_REDUCTIONS)})
    for op in (aten.layer_norm.default, aten.native_layer_norm.default):
        table[op] = _normalization
    if hasattr(aten, "rms_norm"):
        table[aten.rms_norm.default] = _normalization
    table.update({
        aten._softmax.default: _softmax,
        aten.softmax.int: _softmax,
        aten._log_softmax.default: _softmax,
        aten.log_softmax.int: _softmax,
        operator.getitem: _getitem,
        aten.view.default: _view,
        aten.reshape.default: _view,
        aten._unsafe_view.default: _view,
    })
    return table


RULES = _rule_table()


def _eligible(node: fx.Node) -> bool:
    """A replicated op of the tensor-parallel graph that may run on sequence shards."""
    return (node.op == "call_function" and node.target in RULES
            and node.meta.get(PLACEMENT_KEY, "R") == "R")


def _input_splits(node, split, tokens) -> dict:
    if not _fits(node, split, tokens):
        raise _NotTokenwise(f"{node.name} {_shape(node)} has no token dim {split}")
    return RULES[node.target](node, split, tokens)


def _forward_split(user: fx.Node, arg: fx.Node, arg_split: SeqSplit, tokens):
    """The split of `user`'s output under which `arg` is read as `arg_split`, or None."""
    try:
        ndim = len(_shape(user))
    except _NotTokenwise:
        return None
    for dim in range(ndim):
        for flat in (False, True):
            candidate = SeqSplit(dim, flat)
            try:
                if _input_splits(user, candidate, tokens).get(arg) == arg_split:
                    return candidate
            except _NotTokenwise:
                continue
    return None


# --- the zone -------------------------------------------------------------------------------

def _token_shape(graph: fx.Graph, seeds: list[fx.Node]) -> _Tokens | None:
    """(batch, seq) of the model's tokens: the first input with >= 2 dims (input ids or
    embeddings), else the first 3-d tensor-parallel boundary (batch, seq, hidden)."""
    for node in graph.find_nodes(op="placeholder"):
        val = _val(node)
        if isinstance(val, torch.Tensor) and val.dim() >= 2:
            return _Tokens(int(val.shape[0]), int(val.shape[1]))
    for node in seeds:
        shape = _shape(node)
        if len(shape) == 3:
            return _Tokens(shape[0], shape[1])
    return None


def _boundary_split(node: fx.Node, tokens: _Tokens) -> SeqSplit | None:
    """How a tensor-parallel boundary value (batch, seq, hidden) or (batch*seq, hidden) is
    split along its tokens, or None when its shape shows no tokens."""
    try:
        shape = _shape(node)
    except _NotTokenwise:
        return None
    if len(shape) >= 3 and shape[:2] == (tokens.batch, tokens.seq):
        return SeqSplit(1)
    if len(shape) >= 2 and shape[0] == tokens.batch * tokens.seq:
        return SeqSplit(0, flat=True)
    return None


def _find_zone(graph: fx.Graph, reduces: dict, copies: list, tokens: _Tokens):
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
        except _NotTokenwise as why:
            log.debug("sequence_parallel: %s stays whole: %s", node.name, why)
            return False
        zone[node], reads[node] = split, splits
        todo.append(node)
        return True

    for node, split in reduces.items():  # the reduce-scatters start the zone
        zone[node], reads[node] = split, {}
        todo.append(node)
    for copy in copies:
        split = _boundary_split(copy.args[0], tokens)
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


# --- the pass -------------------------------------------------------------------------------

def sequence_parallel(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Split the activations between tensor-parallel regions along the sequence (see above)."""
    tp = ctx.plan.tp
    graph = gm.graph
    reduce_nodes = [n for n in graph.nodes if n.op == "call_function"
                    and n.target is all_reduce and n.args[1] == MESH_DIM]
    copies = [n for n in graph.nodes if n.op == "call_function"
              and n.target is copy_to_region and n.args[1] == MESH_DIM]
    if not reduce_nodes and not copies:
        raise PassError(f"sequence_parallel (sp=on, tp={tp}): the graph has no tensor-parallel "
                        f"region to run between; fix: sp=off")
    tokens = _token_shape(graph, reduce_nodes)
    if tokens is None:
        raise PassError(f"sequence_parallel (sp=on, tp={tp}): cannot tell the (batch, seq) of "
                        f"the model's tokens from its inputs; fix: sp=off")
    if tokens.seq % tp:
        raise SequenceNotDivisible(
            f"sequence_parallel splits the sequence over tp: sequence length {tokens.seq} is not "
            f"divisible by tp={tp}; fix: a sequence length that is a multiple of {tp}, or sp=off")
    reduces = {}
    for node in reduce_nodes:
        split = _boundary_split(node, tokens)
        if split is None:  # a reduction with no token dims (rare): it stays an all-reduce
            log.info("sequence_parallel: %s %s keeps its all-reduce", node.name, _shape(node))
        else:
            reduces[node] = split
    zone, reads = _find_zone(graph, reduces, copies, tokens)
    _Rewriter(gm, tp, tokens, zone).run(reads, copies)
    graph.lint()
    gm.recompile()
    return gm


class _Rewriter:
    """Turns the zone into local shapes with the boundary collectives."""

    def __init__(self, gm: fx.GraphModule, tp: int, tokens: _Tokens, zone: dict) -> None:
        self.graph, self.tp, self.tokens, self.zone = gm.graph, tp, tokens, zone
        self.gathered: dict[fx.Node, fx.Node] = {}
        self.scattered: dict[tuple, fx.Node] = {}
        # tensor_parallel, which runs first, always leaves the layouts in the graph's meta
        self.trainable = {name for name, layout in gm.meta[LAYOUTS_KEY].items()
                          if not layout.is_buffer and layout.requires_grad}
        self._carries: dict[fx.Node, bool] = {}

    def run(self, reads: dict, copies: list[fx.Node]) -> None:
        # Every boundary is built from the full shapes first; the zone's own values take their
        # local shapes last.
        order = {node: i for i, node in enumerate(self.graph.nodes)}
        zone = sorted(self.zone, key=order.__getitem__)
        outside = {node: [u for u in node.users if u not in self.zone
                          and not (u.target is copy_to_region and u in copies)]
                   for node in zone}
        for node in zone:
            self._read_operands(node, reads[node])
        for node in zone:
            if outside[node]:
                full = self._gather(node)
                for user in outside[node]:
                    user.replace_input_with(node, full)
        for copy in copies:
            if copy.args[0] in self.zone:
                self._gather_for_region(copy)
        for node in zone:
            if node.target is all_reduce:
                node = self._reduce_scatter(node)
            self._localize(node)

    # --- shapes ---------------------------------------------------------------------------
    def _local_shape(self, shape, split: SeqSplit) -> list[int]:
        local = list(shape)
        local[split.dim] //= self.tp
        return local

    @staticmethod
    def _meta(node: fx.Node, like: fx.Node, shape, dtype, placement: str) -> fx.Node:
        node.meta.update({"val": torch.empty(list(shape), dtype=dtype, device="meta"),
                          PLACEMENT_KEY: placement,
                          "nn_module_stack": like.meta.get("nn_module_stack", {})})
        return node

    def _localize(self, node: fx.Node) -> None:
        split = self.zone[node]
        full = self.tokens.size(split)

        def local(t):
            if isinstance(t, torch.Tensor) and t.dim() > split.dim and t.shape[split.dim] == full:
                return torch.empty(self._local_shape(t.shape, split), dtype=t.dtype,
                                   device="meta")
            return t

        val = _val(node)
        node.meta["val"] = type(val)(local(v) for v in val) if isinstance(
            val, (list, tuple)) else local(val)
        node.meta[PLACEMENT_KEY] = str(split)
        if node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
            node.args = (node.args[0], list(node.meta["val"].shape))

    # --- boundaries -----------------------------------------------------------------------
    def _collective(self, fn, x: fx.Node, split: SeqSplit, shapes: tuple, like: fx.Node,
                    placements: tuple[str, str]) -> fx.Node:
        """`fn(x, "tp", dim)` along the sequence, from shape `shapes[0]` to `shapes[1]`. A
        flattened (batch*seq, ...) value is viewed as (batch, seq, ...) around it, so the
        collective moves whole sequence chunks of every batch row."""
        graph, dtype = self.graph, _first_tensor(_val(x)).dtype
        (src, dst), (before, after) = shapes, placements
        if not split.flat:
            return self._meta(graph.call_function(fn, (x, MESH_DIM, split.dim)), like, dst,
                              dtype, after)
        d, batch = split.dim, self.tokens.batch

        def unflat(shape):
            return list(shape[:d]) + [batch, shape[d] // batch] + list(shape[d + 1:])

        seq = str(SeqSplit(d + 1))
        viewed = self._meta(graph.call_function(aten.view.default, (x, unflat(src))), like,
                            unflat(src), dtype, seq if before.startswith("S") else before)
        moved = self._meta(graph.call_function(fn, (viewed, MESH_DIM, d + 1)), like,
                           unflat(dst), dtype, seq if after != "R" else "R")
        return self._meta(graph.call_function(aten.view.default, (moved, list(dst))), like,
                          dst, dtype, after)

    def _reduce_scatter(self, node: fx.Node) -> fx.Node:
        """all_reduce(y) -> reduce_scatter(y, seq): the row region's output stays split."""
        split, y = self.zone.pop(node), node.args[0]
        full = list(_shape(node))
        with self.graph.inserting_before(node):
            out = self._collective(reduce_scatter, y, split,
                                   (full, self._local_shape(full, split)), node,
                                   ("P(sum)@tp", str(split)))
        out.meta["val"] = node.meta["val"]  # full, as every zone value before _localize
        node.replace_all_uses_with(out)
        self.graph.erase_node(node)
        self.zone[out] = split
        return out

    def _gather_for_region(self, copy: fx.Node) -> None:
        """copy_to_region(x) -> gather_for_region(x, seq): the column region needs the whole
        sequence; its input gradient is reduce-scattered back to the shards."""
        x = copy.args[0]
        full = list(_shape(copy))
        with self.graph.inserting_before(copy):
            out = self._collective(gather_for_region, x, self.zone[x],
                                   (self._local_shape(full, self.zone[x]), full), copy,
                                   (str(self.zone[x]), "R"))
        copy.replace_all_uses_with(out)
        self.graph.erase_node(copy)

    def _gather(self, node: fx.Node) -> fx.Node:
        """The whole value of a zone node for users outside the zone (backward: our slice)."""
        if node not in self.gathered:
            split, full = self.zone[node], list(_shape(node))
            with self.graph.inserting_after(node):
                self.gathered[node] = self._collective(
                    all_gather, node, split, (self._local_shape(full, split), full), node,
                    (str(split), "R"))
        return self.gathered[node]

    def _read_operands(self, node: fx.Node, splits: dict) -> None:
        for arg, want in splits.items():
            if want is None:
                if arg not in self.zone and self._carries_grad(arg):
                    # Each rank's gradient covers its tokens only: sum them over tp.
                    val = _first_tensor(_val(arg))
                    with self.graph.inserting_before(node):
                        copy = self._meta(self.graph.call_function(copy_to_region,
                                                                   (arg, MESH_DIM)),
                                          node, val.shape, val.dtype, "R")
                    node.replace_input_with(arg, copy)
                continue
            if self.zone.get(arg) == want:
                continue
            if (arg, want) not in self.scattered:  # one slice (one backward all-gather) per value
                full = self._gather(arg) if arg in self.zone else arg
                shape = list(_shape(arg))
                with self.graph.inserting_before(node):
                    self.scattered[arg, want] = self._collective(
                        scatter, full, want, (shape, self._local_shape(shape, want)), node,
                        ("R", str(want)))
            node.replace_input_with(arg, self.scattered[arg, want])

    def _carries_grad(self, node: fx.Node) -> bool:
        """Whether a gradient can reach a trainable parameter through `node`."""
        if not self._carries:  # once, in graph order (no recursion on deep graphs)
            for n in self.graph.nodes:
                val = _first_tensor(_val(n))
                if n.op == "get_attr":
                    self._carries[n] = n.target in self.trainable
                elif n.op == "placeholder" or val is None or not val.is_floating_point():
                    self._carries[n] = False
                else:
                    self._carries[n] = any(self._carries.get(a, False)
                                           for a in n.all_input_nodes)
        return self._carries.get(node, False)
