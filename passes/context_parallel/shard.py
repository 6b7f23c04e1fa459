"""The context-parallel pass's propagation: which values hold this rank's tokens (node -> its
sequence dim), where whole-sequence values take this rank's tokens (a slice by the layout, after
padding), where the sequence is gathered whole, and the local shapes at the end."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import fx

from core import meta, ops
from core.fx_utils import tensor_of
from core.sequence_layout import SequenceLayout
from passes import PassError
from passes.context_parallel.attention import MESH_DIM, SDPA, attend, resized
from passes.context_parallel.record import ContextParallelRecord, Gathered
from passes.propagation import NotCarried, carry, tensor_shape
from passes.propagation.table import TABLE, broadcasting

aten = torch.ops.aten

# Collectives of the earlier passes (tp, sp) move or sum values across tp ranks: a sequence
# shard along any dim stays this rank's tokens through them.
_TP_COLLECTIVES = (ops.copy_to_region, ops.all_reduce, ops.scatter, ops.reduce_scatter,
                   ops.gather_for_region, ops.all_gather)


VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


@dataclass(frozen=True)
class Rows:
    """A dim of (batch*sequence) rows, batch-major, each batch row's sequence sharded: what a
    (batch, seq, ...) value becomes when a view merges the two (Hugging Face GPT-2's Conv1D
    runs its matmul on such rows). Row-wise ops keep it; a view that splits the rows back
    gives the sequence dim again."""

    dim: int
    batch: int


class Sharder:
    """Marks which values hold this rank's tokens (node -> its sequence dim), inserting the
    slices, gathers and attention calls as it goes, then gives sharded values their local
    shapes."""

    def __init__(self, gm: fx.GraphModule, layout: SequenceLayout, seq: int, rank: int,
                 algo: str):
        self.gm, self.graph = gm, gm.graph
        self.layout, self.rank, self.algo = layout, rank, algo
        self.seq = seq
        """The model's sequence length (the layout's, less the padding)."""
        self.dims: dict[fx.Node, object] = {}
        self.entered: dict[tuple[fx.Node, int], fx.Node] = {}
        self.gathers: dict[fx.Node, fx.Node] = {}
        self.attention: list[str] = []
        self.gathered: list[Gathered] = []
        self.erased: set[fx.Node] = set()

    def run(self) -> ContextParallelRecord:
        for node in list(self.graph.nodes):
            if node.op != "call_function" or node in self.dims or node in self.erased:
                continue
            if any(a in self.dims for a in node.all_input_nodes):
                self._visit(node)
            else:
                self._start(node)
        outputs = self._outputs()
        for node in self.dims:
            self._localize(node)
        return ContextParallelRecord(
            cp=self.layout.cp, rank=self.rank, algo=self.algo, layout=self.layout,
            padding=self.layout.length - self.seq,
            entered=tuple(n.name for n in self.entered.values()),
            attention=tuple(self.attention), gathered=tuple(self.gathered), outputs=outputs,
            sharded_nodes=len(self.dims))

    # --- where the sequence starts being sharded ---------------------------------------------
    def _start(self, node: fx.Node) -> None:
        """An op reading a parameter with a whole-sequence operand runs on this rank's tokens:
        the lookup's indices (token ids, positions) or the linear layer's input."""
        if node.target is aten.embedding.default:
            indices = node.args[1]
            dim = self._sequence_dim(indices, last=True)
        elif node.target is aten.linear.default:
            indices = node.args[0]
            dim = self._sequence_dim(indices, last=False)
        else:
            return
        if dim is None:
            return
        node.replace_input_with(indices, self._enter(indices, dim, before=node))
        self.dims[node] = dim

    def _sequence_dim(self, value, last: bool) -> int | None:
        """The dim of `value` as long as the sequence (the last one, or the last before the
        features)."""
        val = tensor_of(value) if isinstance(value, fx.Node) else None
        if val is None:
            return None
        dims = [d for d, size in enumerate(val.shape) if size == self.seq]
        if not last:
            dims = [d for d in dims if d < val.dim() - 1]
        return dims[-1] if dims else None

    def _enter(self, value: fx.Node, dim: int, before: fx.Node) -> fx.Node:
        """This rank's tokens of a whole-sequence `value` along `dim` (memoized)."""
        key = (value, dim)
        if key in self.entered:
            return self.entered[key]
        if value.target is ops.scatter and value.args[2] == dim:
            # sp's entry into its zone: take our tokens first, then sp's tp slice of them
            inner = self._enter(value.args[0], dim, before)
            with self.graph.inserting_before(before):
                node = self._call(ops.scatter, (inner, *value.args[1:]), value.kwargs, value)
        else:
            if tensor_shape(value)[dim] != self.seq:
                raise NotCarried(f"{value.name} {tensor_shape(value)} meets the sequence along "
                                 f"dim {dim} without being sequence-long")
            chunk, padding = self.layout.chunk, self.layout.length - self.seq
            with self.graph.inserting_before(before):
                if padding:
                    ends = [0, 0] * (len(tensor_shape(value)) - 1 - dim) + [0, padding]
                    value = self._call(aten.constant_pad_nd.default, (value, ends, 0), {},
                                       value, resize=(dim, self.layout.length))
                pieces = [self._call(aten.slice.Tensor, (value, dim, c * chunk, (c + 1) * chunk),
                                     {}, value, resize=(dim, chunk))
                          for c in self.layout.chunk_ids(self.rank)]
                node = pieces[0] if len(pieces) == 1 else self._call(
                    aten.cat.default, (pieces, dim), {}, value)
        self.dims[node] = dim
        self.entered[key] = node
        return node

    # --- propagation ---------------------------------------------------------------------
    def _visit(self, node: fx.Node) -> None:
        target = node.target
        try:
            if target is SDPA:
                attend(self, node)
            elif any(isinstance(self.dims.get(a), Rows) for a in node.all_input_nodes):
                self.dims[node] = self._on_rows(node)
            elif target is aten.embedding.default and node.args[0] not in self.dims:
                self.dims[node] = self.dims[node.args[1]]
            elif target is aten.linear.default and self._rows_only(node):
                self.dims[node] = self.dims[node.args[0]]
            elif target in _TP_COLLECTIVES:
                self.dims[node] = self.dims[node.args[0]]
            elif target in VIEWS and self._merged_rows(node) is not None:
                self.dims[node] = self._merged_rows(node)
            else:
                self._enter_operands(node)
                out = carry(node, self.dims)
                if out is not None:
                    self.dims[node] = out
        except NotCarried as why:
            self._gather_inputs(node, str(why))

    def _merged_rows(self, node: fx.Node) -> Rows | None:
        """A view (.., B, S, *rest) -> (.., B*S, *rest') of a value sharded along S."""
        x = node.args[0]
        d, src, dst = self.dims[x], tensor_shape(x), tensor_shape(node)
        if (isinstance(d, int) and d >= 1 and len(dst) >= d and dst[:d - 1] == src[:d - 1]
                and dst[d - 1] == src[d - 1] * src[d]
                and math.prod(dst[d:]) == math.prod(src[d + 1:])):
            return Rows(d - 1, src[d - 1])
        return None

    def _on_rows(self, node: fx.Node):
        """An op reading flattened rows: matmuls on the rows and the table's ops that keep
        the rows' dim carry them; a view splitting the rows gives the sequence dim back."""
        sharded = {a: self.dims[a] for a in node.all_input_nodes if a in self.dims}
        rows = set(sharded.values())
        if len(rows) != 1 or not isinstance(next(iter(rows)), Rows):
            raise NotCarried("flattened rows meet values sharded otherwise")
        (r,) = rows
        target, out_shape = node.target, tensor_shape(node)
        if target in VIEWS:
            src = tensor_shape(node.args[0])
            if (out_shape[:r.dim] == src[:r.dim] and len(out_shape) > r.dim + 1
                    and out_shape[r.dim] == r.batch
                    and out_shape[r.dim] * out_shape[r.dim + 1] == src[r.dim]):
                return r.dim + 1  # (B*S, ...) -> (B, S, ...)
            if out_shape[:r.dim + 1] == src[:r.dim + 1]:
                return r  # the rows kept, the features reshaped
            raise NotCarried(f"view {src} -> {out_shape} reshapes the (batch*sequence) rows")
        if target in _TP_COLLECTIVES:  # over tp, along the features (sp moves whole rows)
            if len(node.args) > 2 and node.args[2] == r.dim:
                raise NotCarried(f"{target} along the (batch*sequence) rows")
            return r
        rows_operand = {aten.addmm.default: 1, aten.mm.default: 0, aten.linear.default: 0}
        if target in rows_operand:
            x = node.args[rows_operand[target]]
            if x in sharded and len(sharded) == 1 and r.dim < len(tensor_shape(x)) - 1:
                return r
            raise NotCarried(f"{target} contracts the (batch*sequence) rows")
        out = carry(node, {a: r.dim for a in sharded})
        same = (out,) if not isinstance(out, tuple) else out
        if all(o == r.dim for o in same) and all(
                len(tensor_shape(a)) == len(out_shape) for a in sharded):
            return r if not isinstance(out, tuple) else (r,) * len(out)
        raise NotCarried(f"{target} moves the (batch*sequence) rows")

    def _rows_only(self, node: fx.Node) -> bool:
        """linear(x, w, b) on sequence-sharded rows of x, with whole weights."""
        x, *rest = node.args
        return (x in self.dims and self.dims[x] < len(tensor_shape(x)) - 1
                and not any(a in self.dims for a in rest))

    def _enter_operands(self, node: fx.Node) -> None:
        """Whole operands that span the sharded dim of an elementwise op (or a cat along another
        dim) take this rank's tokens."""
        rule = TABLE.get(node.target)
        if rule is broadcasting:
            operands = [a for a in node.args if isinstance(a, fx.Node)
                        and tensor_of(a) is not None]
        elif node.target is aten.cat.default:
            operands = list(node.args[0])
        else:
            return
        ndim = len(tensor_shape(node))
        aligned = {self.dims[a] + ndim - len(tensor_shape(a)) for a in operands
                   if a in self.dims}
        if len(aligned) != 1:
            return  # the table says why
        (dim,) = aligned
        for a in operands:
            pos = dim - (ndim - len(tensor_shape(a)))
            if a not in self.dims and pos >= 0 and tensor_shape(a)[pos] != 1:
                node.replace_input_with(a, self._enter(a, pos, before=node))

    def _gather_inputs(self, node: fx.Node, reason: str) -> None:
        """`node` reads every sharded input gathered whole, in sequence order."""
        for a in list(dict.fromkeys(a for a in node.all_input_nodes if a in self.dims)):
            if isinstance(self.dims[a], tuple):
                raise PassError(f"context_parallel: {node.name} ({node.target}) reads the "
                                f"multi-output {a.name} whole ({reason}); no rule gathers it")
            node.replace_input_with(a, self._gather(a, before=node))
        self.gathered.append(Gathered(node.name, reason))

    def _gather(self, value: fx.Node, before: fx.Node) -> fx.Node:
        """The whole sequence of a sharded `value`, in sequence order (memoized; made before
        its first reader, so later readers see it too)."""
        if value in self.gathers:
            return self.gathers[value]
        if isinstance(self.dims[value], Rows):  # (B*S, ...) -> (B, S, ...), gathered, back
            r, shape = self.dims[value], tensor_shape(value)
            unflat = [*shape[:r.dim], r.batch, shape[r.dim] // r.batch, *shape[r.dim + 1:]]
            with self.graph.inserting_before(before):
                split_rows = self._call(aten.view.default, (value, unflat), {}, value,
                                        shape=unflat)
            self.dims[split_rows] = r.dim + 1
            whole = self._gather(split_rows, before)
            flat = [*shape[:r.dim], self.seq * r.batch, *shape[r.dim + 1:]]
            with self.graph.inserting_before(before):
                whole = self._call(aten.view.default, (whole, flat), {}, value, shape=flat)
            self.gathers[value] = whole
            return whole
        dim, layout = self.dims[value], self.layout
        padded = (dim, self._padded_size(tensor_shape(value)[dim]))
        with self.graph.inserting_before(before):
            whole = self._call(ops.gather_for_region, (value, MESH_DIM, dim), {}, value,
                               resize=padded)
            if layout.balanced:  # rank-order pieces -> sequence order
                piece_of = {c: 2 * r + i for r in range(layout.cp)
                            for i, c in enumerate(layout.chunk_ids(r))}
                split = self._call(aten.split.Tensor, (whole, layout.chunk, dim), {}, value,
                                   pieces=layout.chunks, resize=(dim, layout.chunk))
                pieces = [self._call(operator.getitem, (split, piece_of[c]), {}, value,
                                     resize=(dim, layout.chunk))
                          for c in range(layout.chunks)]
                whole = self._call(aten.cat.default, (pieces, dim), {}, value, resize=padded)
            if layout.length != self.seq:  # the padding off: the model's own length again,
                whole = self._call(aten.slice.Tensor, (whole, dim, 0, self.seq), {}, value)
                whole = self._call(aten.clone.default, (whole,),  # contiguous, for views
                                   {"memory_format": torch.contiguous_format}, value)
        self.gathers[value] = whole
        return whole

    # --- attention -----------------------------------------------------------------------
    # --- results -------------------------------------------------------------------------
    def _outputs(self) -> tuple[int | None, ...]:
        (output,) = self.graph.find_nodes(op="output")
        for leaf in torch.utils._pytree.tree_leaves(output.args[0]):
            if isinstance(leaf, fx.Node) and isinstance(self.dims.get(leaf), Rows):
                output.replace_input_with(leaf, self._gather(leaf, before=output))
        leaves = torch.utils._pytree.tree_leaves(output.args[0])
        return tuple(self.dims.get(leaf) if isinstance(leaf, fx.Node) else None
                     for leaf in leaves)

    def _localize(self, node: fx.Node) -> None:
        """A sharded value's local shape (its sequence dim divided by cp), and the size
        arguments of views and expands that name it."""
        dims, val = self.dims[node], node.meta.get("val")
        node.meta[meta.CP_DIM] = dims
        if isinstance(val, (tuple, list)):
            dims = [d.dim if isinstance(d, Rows) else d for d in dims]
            node.meta["val"] = type(val)(
                v.new_empty(resized(v.shape, d, self._local_size(v.shape[d])))
                if d is not None else v for v, d in zip(val, dims))
            return
        dims = dims.dim if isinstance(dims, Rows) else dims
        if not isinstance(val, torch.Tensor):
            return
        local = resized(val.shape, dims, self._local_size(val.shape[dims]))
        node.meta["val"] = val.new_empty(local)
        if node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                           aten.expand.default):
            node.args = (node.args[0], local, *node.args[2:])

    def _padded_size(self, size: int) -> int:
        """A sequence-long dim's size once the sequence is padded."""
        return size * self.layout.length // self.seq

    def _local_size(self, size: int) -> int:
        """A sharded dim's local size: its share of the padded sequence (the dim may hold
        the sequence times other dims, or sp's share of it)."""
        return size * self.layout.length // (self.seq * self.layout.cp)

    def _call(self, target, args, kwargs, like: fx.Node, resize=None, pieces=None,
              shape=None) -> fx.Node:
        """A new node whose value is shaped like `like`'s (one dim resized, or `shape`, or
        `pieces` outputs), carrying its module path and tp placement."""
        node = self.graph.call_function(target, args, kwargs)
        val = tensor_of(like)
        if shape is None:
            shape = resized(val.shape, *resize) if resize else list(val.shape)
        node.meta["val"] = (tuple(val.new_empty(shape) for _ in range(pieces))
                            if pieces else val.new_empty(shape))
        for key in (meta.NN_MODULE_STACK, meta.TP_PLACEMENT):
            if key in like.meta:
                node.meta[key] = like.meta[key]
        return node
