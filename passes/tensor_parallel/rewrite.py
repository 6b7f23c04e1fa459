"""Rewrite: this rank's program from the split the rule table found.

Megatron-Core's f/g pair around every region: `copy_to_region(x, "tp")` before the column
projections (identity forward, all-reduce backward), `all_reduce(., "tp")` after the row
projections (bias added once, after it). Vocab-parallel LM heads all-gather their logits over
the vocabulary (padding columns sliced off); vocab-parallel lookups mask the ids outside this
rank's rows and all-reduce. Parameters take their local shapes and their layouts their
placements.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from core.fx_utils import val_of
from core.meta import TP_PLACEMENT
from core.ops import OP_NAME, all_gather, all_reduce, copy_to_region
from core.placement import (Partial, Placements, Shard, StridedShard, local_size,
                            split_placement)
from passes import PassError
from passes.propagation import tensor_shape
from passes.tensor_parallel.projections import lookup_arg
from passes.tensor_parallel.record import (KV_WEIGHT, LOGITS_GATHER, LOOKUP_SUM, REGION_ENTRY,
                                           REGION_EXIT, InsertedCollective, RegionRecord,
                                           ShardedLogits, ShardedParam, TensorParallelRecord)
from passes.tensor_parallel.rules import (MESH_DIM, Call, Narrow, Split, blocks_of, local_shape,
                                          parts, replicas_of)

aten = torch.ops.aten
REPLICATED = Placements()
PARTIAL = Placements.of(**{MESH_DIM: Partial()})
"""Each rank holds a partial sum (a row projection's output, before its all-reduce)."""


def _set_val(node: fx.Node, state, tp: int) -> None:
    val = val_of(node)
    if isinstance(state, (Shard, StridedShard)) and isinstance(val, torch.Tensor):
        node.meta["val"] = torch.empty(local_shape(val.shape, state, tp), dtype=val.dtype,
                                       device="meta")
    elif isinstance(state, list) and isinstance(val, (list, tuple)):
        node.meta["val"] = [torch.empty(local_shape(v.shape, s, tp), dtype=v.dtype, device="meta")
                            for v, s in zip(val, state, strict=True)]


class Rewriter:
    """Applies the propagated splits to the graph: this rank's program (the rank picks the
    rows of a vocab shard and the kv head of a replicated projection)."""

    def __init__(self, gm, projs, states, layouts, tp: int, rank: int) -> None:
        self.gm, self.graph, self.projs, self.states = gm, gm.graph, projs, states
        self.layouts, self.tp, self.rank = layouts, tp, rank
        self.copies: dict[fx.Node, fx.Node] = {}
        """A column input -> its copy_to_region (one per input, shared by the columns)."""
        self.exits: dict[fx.Node, fx.Node] = {}
        """A row projection -> its all_reduce."""
        self.sharded: dict[str, object] = {}
        self.inserted: list[InsertedCollective] = []
        self.logits: list[ShardedLogits] = []

    def run(self, regions, rewrites, vocab_heads, vocab_lookups) -> TensorParallelRecord:
        order = {node: i for i, node in enumerate(self.graph.nodes)}
        # In graph order, so each shared copy_to_region lands before its first user.
        for lin in sorted((c for r in regions for c in r.columns), key=order.__getitem__):
            split = self.states[lin]
            if replicas_of(split) > 1:
                self.replicated_column(lin, split)
            else:
                self.column(lin, blocks_of(split, tensor_shape(lin)[split.dim]))
        for region in regions:
            for node in region.nodes:  # every arg rewrite reads full shapes: before _set_val
                if node in rewrites:
                    self.apply(node, rewrites[node])
            for node in list(region.nodes) + region.columns:
                state = self.states.get(node)
                if isinstance(state, list):  # split's pieces: every one split the same way
                    state = state[0]
                if state is not None:
                    node.meta[TP_PLACEMENT] = Placements.of(**{MESH_DIM: state})
                _set_val(node, state, self.tp)
            for lin in region.rows:
                self.row(lin)
        for lin in vocab_heads:
            self.vocab_head(lin)
        for lookup in vocab_lookups:
            self.vocab_lookup(lookup)
        self.local_tensors()
        return TensorParallelRecord(
            tp=self.tp,
            params=tuple(ShardedParam(name, spec) for name, spec in self.sharded.items()),
            regions=tuple(self.region_record(region) for region in regions),
            collectives=tuple(self.inserted), logits=tuple(self.logits))

    def region_record(self, region) -> RegionRecord:
        entries = dict.fromkeys(self.copies[self.projs[c].x].name for c in region.columns)
        return RegionRecord(columns=tuple(c.name for c in region.columns),
                            rows=tuple(sorted(r.name for r in region.rows)),
                            entries=tuple(entries),
                            exits=tuple(sorted(self.exits[r].name for r in region.rows)))

    # --- helpers ---------------------------------------------------------------------------
    def call(self, target, args, like: fx.Node, val, placement: Placements) -> fx.Node:
        """A new node at the current insert point, with meta taken from `like`."""
        node = self.graph.call_function(target, args)
        node.meta.update({"val": val, TP_PLACEMENT: placement,
                          "nn_module_stack": like.meta.get("nn_module_stack", {})})
        return node

    def collective(self, target, args, like: fx.Node, val, role: str) -> fx.Node:
        """A collective over tp on args[0] (its output replicated), recorded with its role."""
        node = self.call(target, args, like, val, REPLICATED)
        self.inserted.append(InsertedCollective(node.name, OP_NAME[target], args[0].name,
                                                MESH_DIM, role))
        return node

    def shard_param(self, attr: fx.Node, spec) -> None:
        if attr.target in self.sharded:  # a tied table's second use: checked to agree
            if self.sharded[attr.target] != spec:
                raise PassError(f"tensor_parallel: tied uses of {attr.target!r} need one shard "
                                f"but ask for {self.sharded[attr.target]!r} and {spec!r}")
            return
        self.sharded[attr.target] = spec
        layout = self.layouts[attr.target]
        placements = Placements(((MESH_DIM, spec),))
        self.layouts[attr.target] = dataclasses.replace(layout, placements=placements)
        attr.meta[TP_PLACEMENT] = placements
        val = val_of(attr)
        if isinstance(val, torch.Tensor):
            local = list(val.shape)
            local[spec.dim] = local_size(spec, local[spec.dim], self.tp)
            attr.meta["val"] = torch.empty(local, dtype=val.dtype, device="meta")

    def apply(self, node: fx.Node, call: Call) -> None:
        args = []
        for arg in call.args:
            if isinstance(arg, Narrow):
                arg = self.narrow(node, arg)
                if node.target is aten.view.default:  # a narrowed expand is not viewable
                    node.target = aten.reshape.default
            args.append(arg)
        node.args = tuple(args)
        if call.kwargs is not None:
            node.kwargs = call.kwargs

    def narrow(self, user: fx.Node, marker: Narrow) -> fx.Node:
        x = marker.node
        split = self.states[x]
        local = list(local_shape(tensor_shape(x), split, self.tp))  # x still has its full meta here
        local[marker.dim] = marker.length
        start = self.rank % marker.replicas * marker.length
        with self.graph.inserting_before(user):
            return self.call(aten.narrow.default, (x, marker.dim, start, marker.length), user,
                             torch.empty(local, dtype=val_of(x).dtype, device="meta"),
                             # (and narrowed along marker.dim to this rank's kv copies, which
                             # the merging reshape after it makes a plain split of heads)
                             Placements.of(**{MESH_DIM: split}))

    # --- column, row and vocab rewrites ----------------------------------------------------
    def enter(self, lin: fx.Node) -> None:  # f: identity forward, all-reduce backward
        x = self.projs[lin].x
        if x not in self.copies:  # one copy per input, shared by the region's column linears
            with self.graph.inserting_before(lin):
                self.copies[x] = self.collective(copy_to_region, (x, MESH_DIM), lin, val_of(x),
                                                 REGION_ENTRY)
        lin.replace_input_with(x, self.copies[x])

    def column(self, lin: fx.Node, blocks, padded: int | None = None) -> None:
        proj = self.projs[lin]
        blocks = tuple(blocks) if len(blocks) > 1 else None
        self.shard_param(proj.weight, split_placement(proj.out_dim, blocks, padded))
        if proj.bias is not None:
            self.shard_param(proj.bias, split_placement(0, blocks, padded))
        self.enter(lin)

    def replicated_column(self, lin: fx.Node, split: Split) -> None:
        """Replicated kv heads: the weight (and bias) stay whole on every rank, read through
        copy_to_region and narrowed to this rank's heads. Each rank's weight gradient is
        nonzero only on its heads' rows, from its own query heads; the copy's backward
        all-reduce sums them into the full gradient on every rank, as a replicated weight
        needs. The input gradient needs nothing more: the k/v projections read the region's
        shared copy_to_region(x), whose backward sums every rank's part."""
        proj = self.projs[lin]
        size = tensor_shape(lin)[-1] // parts(split, self.tp)
        start = self.rank // split.replicas * size
        for param, dim in ((proj.weight, proj.out_dim), (proj.bias, 0)):
            if param is None:
                continue
            val = val_of(param)
            local = list(val.shape)
            local[dim] = size
            with self.graph.inserting_before(lin):
                copy = self.collective(copy_to_region, (param, MESH_DIM), lin, val, KV_WEIGHT)
                piece = self.call(aten.narrow.default, (copy, dim, start, size), lin,
                                  torch.empty(local, dtype=val.dtype, device="meta"),
                                  Placements.of(tp=Shard(dim, replicas=split.replicas)))
            lin.replace_input_with(param, piece)
        self.enter(lin)

    def row(self, lin: fx.Node) -> None:  # g: linear(x, w) -> all_reduce -> + bias
        graph, proj = self.graph, self.projs[lin]
        self.shard_param(proj.weight, Shard(1 - proj.out_dim))
        bias = proj.bias
        if lin.target is aten.addmm.default:  # b + x @ w -> x @ w
            lin.target = aten.mm.default
        lin.args = (lin.args[0], lin.args[1]) if lin.target is aten.linear.default else (
            proj.x, proj.weight)
        lin.kwargs = {}
        lin.meta[TP_PLACEMENT] = PARTIAL
        users = list(lin.users)
        with graph.inserting_after(lin):
            out = reduced = self.collective(all_reduce, (lin, MESH_DIM), lin, val_of(lin),
                                            REGION_EXIT)
        self.exits[lin] = reduced
        if bias is not None:
            with graph.inserting_after(reduced):
                out = self.call(aten.add.Tensor, (reduced, bias), lin, val_of(lin), REPLICATED)
        for user in users:
            user.replace_input_with(lin, out)

    def vocab_head(self, lin: fx.Node) -> None:
        """Column-parallel over the vocabulary, then all-gather the logits."""
        graph, tp = self.graph, self.tp
        full = val_of(lin)
        vocab_size = full.shape[-1]
        # Megatron's make_vocab_size_divisible_by: zero rows pad the vocabulary to a multiple
        # of tp; the padded logits are sliced off after the gather.
        padded = -(-vocab_size // tp) * tp
        self.column(lin, (vocab_size,), padded if padded != vocab_size else None)
        lin.meta[TP_PLACEMENT] = Placements.of(**{MESH_DIM: Shard(
            full.dim() - 1, padded=padded if padded != vocab_size else None)})
        local = list(full.shape)
        local[-1] = padded // tp
        lin.meta["val"] = torch.empty(local, dtype=full.dtype, device="meta")
        users = list(lin.users)
        with graph.inserting_after(lin):
            gathered = out = self.collective(
                all_gather, (lin, MESH_DIM, -1), lin,
                torch.empty(local[:-1] + [padded], dtype=full.dtype, device="meta"),
                LOGITS_GATHER)
        if padded != vocab_size:
            with graph.inserting_after(out):
                out = self.call(aten.slice.Tensor, (out, -1, 0, vocab_size), lin, full,
                                REPLICATED)
        for user in users:
            user.replace_input_with(lin, out)
        leaves = list(graph.find_nodes(op="output")[0].args[0])
        if leaves.count(out) == 1 and len(out.users) == 1:  # returned, and read by nothing else
            self.logits.append(ShardedLogits(
                leaf=leaves.index(out), shard=lin.name,
                gathered=(gathered.name,) + ((out.name,) if out is not gathered else ()),
                mesh_dim=MESH_DIM, dim=full.dim() - 1, vocab_size=vocab_size,
                padded_vocab=padded, local_vocab=padded // tp))

    def vocab_lookup(self, lookup: fx.Node) -> None:
        """Megatron's VocabParallelEmbedding: this rank holds rows [start, end) of the
        (padded) table; other ids look up local row 0 and their outputs are zeroed, so the
        all-reduce adds exactly the one rank that holds each id. Their gradients are zero
        too (masked_fill's backward), so row 0 gathers nothing from them."""
        graph, tp = self.graph, self.tp
        table, ids = lookup.args[0], lookup.args[1]
        rows = self.layouts[table.target].full_shape[0]  # a tied head may have sharded it
        padded = -(-rows // tp) * tp
        self.shard_param(table, Shard(0, padded=padded if padded != rows else None))
        per_rank = padded // tp
        start, end = self.rank * per_rank, (self.rank + 1) * per_rank
        id_val, out_val = val_of(ids), val_of(lookup)
        flags = torch.empty(id_val.shape, dtype=torch.bool, device="meta")
        with graph.inserting_before(lookup):
            below = self.call(aten.lt.Scalar, (ids, start), lookup, flags, REPLICATED)
            above = self.call(aten.ge.Scalar, (ids, end), lookup, flags, REPLICATED)
            outside = self.call(aten.bitwise_or.Tensor, (below, above), lookup, flags, REPLICATED)
            shifted = self.call(aten.sub.Scalar, (ids, start), lookup, id_val, REPLICATED)
            local_ids = self.call(aten.masked_fill.Scalar, (shifted, outside, 0), lookup,
                                  id_val, REPLICATED)
        pad = lookup_arg(lookup, 2, "padding_idx", -1)
        # padding_idx only stops that row's gradient; it lives on one rank
        local_pad = pad - start if pad is not None and start <= pad < end else -1
        lookup.args = (table, local_ids, local_pad, *lookup.args[3:])
        lookup.kwargs = {k: v for k, v in lookup.kwargs.items() if k != "padding_idx"}
        lookup.meta[TP_PLACEMENT] = PARTIAL
        users = list(lookup.users)
        with graph.inserting_before(lookup.next):
            keep = self.call(aten.unsqueeze.default, (outside, -1), lookup,
                             torch.empty(tuple(id_val.shape) + (1,), dtype=torch.bool,
                                         device="meta"), REPLICATED)
            zeroed = self.call(aten.masked_fill.Scalar, (lookup, keep, 0.0), lookup, out_val,
                               PARTIAL)
            out = self.collective(all_reduce, (zeroed, MESH_DIM), lookup, out_val, LOOKUP_SUM)
        for user in users:
            user.replace_input_with(lookup, out)

    def local_tensors(self) -> None:
        """The graph module's own tensors take their local shapes (ParallelModel binds the
        real shards by name; reports read these)."""
        for attr in self.graph.find_nodes(op="get_attr"):
            layout = self.layouts.get(attr.target)
            if layout is None or layout.placements.replicated:
                continue
            owner_path, _, leaf = attr.target.rpartition(".")
            owner = self.gm.get_submodule(owner_path) if owner_path else self.gm
            value = getattr(owner, leaf)
            local = torch.empty(layout.local_shape({MESH_DIM: self.tp}), dtype=layout.dtype,
                                device="meta")
            if isinstance(value, torch.nn.Parameter):
                owner._parameters[leaf] = torch.nn.Parameter(local,
                                                             requires_grad=value.requires_grad)
            elif leaf in owner._buffers:
                owner._buffers[leaf] = local

