"""The sequence zone's rewrite: its values take their local (sequence-shard) shapes, with the
boundary collectives: reduce-scatters for the regions' all-reduces, gathers for their copies,
all-gathers where a zone value leaves the zone, scatters where a whole value enters it, and
copies (a gradient sum over tp) for tensors the zone reads that broadcast over the tokens."""

from __future__ import annotations

import torch
from torch import fx

from core.fx_utils import tensor_of, val_of
from core.meta import LAYOUTS, TP_PLACEMENT
from core.ops import (OP_NAME, all_gather, all_reduce, copy_to_region, gather_for_region,
                      reduce_scatter, scatter)
from core.placement import Partial, Placements, Shard
from passes.propagation import tensor_shape
from passes.sequence_parallel.record import (GRADIENT_SUM, SEQUENCE_ENTRY, SEQUENCE_EXIT,
                                             ZONE_ENTRY, ZONE_EXIT, SequenceParallelRecord)
from passes.sequence_parallel.zone import REPLICATED, SeqSplit, Tokens
from passes.tensor_parallel.record import InsertedCollective
from passes.tensor_parallel.rules import MESH_DIM

aten = torch.ops.aten
PARTIAL = Placements.of(**{MESH_DIM: Partial()})


class Rewriter:
    """Turns the zone into local shapes with the boundary collectives."""

    def __init__(self, gm: fx.GraphModule, tp: int, tokens: Tokens, zone: dict) -> None:
        self.graph, self.tp, self.tokens, self.zone = gm.graph, tp, tokens, zone
        self.gathered: dict[fx.Node, fx.Node] = {}
        self.scattered: dict[tuple, fx.Node] = {}
        # tensor_parallel, which runs first, always leaves the layouts in the graph's meta
        self.trainable = {name for name, layout in gm.meta[LAYOUTS].items()
                          if not layout.is_buffer and layout.requires_grad}
        self._carries: dict[fx.Node, bool] = {}
        self.inserted: list[InsertedCollective] = []
        self.replaced: list[str] = []

    def run(self, reads: dict, copies: list[fx.Node]) -> SequenceParallelRecord:
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
        order = {node: i for i, node in enumerate(self.graph.nodes)}
        return SequenceParallelRecord(
            tp=self.tp, batch=self.tokens.batch, seq=self.tokens.seq,
            zone=tuple(n.name for n in sorted(self.zone, key=order.__getitem__)),
            collectives=tuple(self.inserted), replaced=tuple(self.replaced))

    # --- shapes ---------------------------------------------------------------------------
    def _local_shape(self, shape, split: SeqSplit) -> list[int]:
        local = list(shape)
        local[split.dim] //= self.tp
        return local

    @staticmethod
    def _meta(node: fx.Node, like: fx.Node, shape, dtype, placement: Placements) -> fx.Node:
        node.meta.update({"val": torch.empty(list(shape), dtype=dtype, device="meta"),
                          TP_PLACEMENT: placement,
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

        val = val_of(node)
        node.meta["val"] = type(val)(local(v) for v in val) if isinstance(
            val, (list, tuple)) else local(val)
        node.meta[TP_PLACEMENT] = split.placements
        if node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
            node.args = (node.args[0], list(node.meta["val"].shape))

    # --- boundaries -----------------------------------------------------------------------
    def _collective(self, fn, x: fx.Node, split: SeqSplit, shapes: tuple, like: fx.Node,
                    placements: tuple[Placements, Placements], role: str) -> fx.Node:
        """`fn(x, "tp", dim)` along the sequence, from shape `shapes[0]` to `shapes[1]`. A
        flattened (batch*seq, ...) value is viewed as (batch, seq, ...) around it, so the
        collective moves whole sequence chunks of every batch row."""
        graph, dtype = self.graph, tensor_of(x).dtype
        (src, dst), (before, after) = shapes, placements
        if not split.flat:
            node = self._meta(graph.call_function(fn, (x, MESH_DIM, split.dim)), like, dst,
                              dtype, after)
            self._record(node, fn, x, role)
            return node
        d, batch = split.dim, self.tokens.batch

        def unflat(shape):
            return list(shape[:d]) + [batch, shape[d] // batch] + list(shape[d + 1:])

        seq = SeqSplit(d + 1).placements
        viewed = self._meta(graph.call_function(aten.view.default, (x, unflat(src))), like,
                            unflat(src), dtype,
                            seq if isinstance(before.on(MESH_DIM), Shard) else before)
        moved = self._meta(graph.call_function(fn, (viewed, MESH_DIM, d + 1)), like,
                           unflat(dst), dtype,
                           after if after.replicated else seq)
        self._record(moved, fn, x, role)
        return self._meta(graph.call_function(aten.view.default, (moved, list(dst))), like,
                          dst, dtype, after)

    def _record(self, node: fx.Node, fn, value: fx.Node, role: str) -> None:
        self.inserted.append(InsertedCollective(node.name, OP_NAME[fn], value.name, MESH_DIM,
                                                role))

    def _reduce_scatter(self, node: fx.Node) -> fx.Node:
        """all_reduce(y) -> reduce_scatter(y, seq): the row region's output stays split."""
        split, y = self.zone.pop(node), node.args[0]
        full = list(tensor_shape(node))
        with self.graph.inserting_before(node):
            out = self._collective(reduce_scatter, y, split,
                                   (full, self._local_shape(full, split)), node,
                                   (PARTIAL, split.placements), SEQUENCE_EXIT)
        self.replaced.append(node.name)
        out.meta["val"] = node.meta["val"]  # full, as every zone value before _localize
        node.replace_all_uses_with(out)
        self.graph.erase_node(node)
        self.zone[out] = split
        return out

    def _gather_for_region(self, copy: fx.Node) -> None:
        """copy_to_region(x) -> gather_for_region(x, seq): the column region needs the whole
        sequence; its input gradient is reduce-scattered back to the shards."""
        x = copy.args[0]
        full = list(tensor_shape(copy))
        with self.graph.inserting_before(copy):
            out = self._collective(gather_for_region, x, self.zone[x],
                                   (self._local_shape(full, self.zone[x]), full), copy,
                                   (self.zone[x].placements, REPLICATED), SEQUENCE_ENTRY)
        self.replaced.append(copy.name)
        copy.replace_all_uses_with(out)
        self.graph.erase_node(copy)

    def _gather(self, node: fx.Node) -> fx.Node:
        """The whole value of a zone node for users outside the zone (backward: our slice)."""
        if node not in self.gathered:
            split, full = self.zone[node], list(tensor_shape(node))
            with self.graph.inserting_after(node):
                self.gathered[node] = self._collective(
                    all_gather, node, split, (self._local_shape(full, split), full), node,
                    (split.placements, REPLICATED), ZONE_EXIT)
        return self.gathered[node]

    def _read_operands(self, node: fx.Node, splits: dict) -> None:
        for arg, want in splits.items():
            if want is None:
                if arg not in self.zone and self._carries_grad(arg):
                    # Each rank's gradient covers its tokens only: sum them over tp.
                    val = tensor_of(arg)
                    with self.graph.inserting_before(node):
                        copy = self._meta(self.graph.call_function(copy_to_region,
                                                                   (arg, MESH_DIM)),
                                          node, val.shape, val.dtype, REPLICATED)
                        self._record(copy, copy_to_region, arg, GRADIENT_SUM)
                    node.replace_input_with(arg, copy)
                continue
            if self.zone.get(arg) == want:
                continue
            if (arg, want) not in self.scattered:  # one slice (one backward all-gather) per value
                full = self._gather(arg) if arg in self.zone else arg
                shape = list(tensor_shape(arg))
                with self.graph.inserting_before(node):
                    self.scattered[arg, want] = self._collective(
                        scatter, full, want, (shape, self._local_shape(shape, want)), node,
                        (REPLICATED, want.placements), ZONE_ENTRY)
            node.replace_input_with(arg, self.scattered[arg, want])

    def _carries_grad(self, node: fx.Node) -> bool:
        """Whether a gradient can reach a trainable parameter through `node`."""
        if not self._carries:  # once, in graph order (no recursion on deep graphs)
            for n in self.graph.nodes:
                val = tensor_of(n)
                if n.op == "get_attr":
                    self._carries[n] = n.target in self.trainable
                elif n.op == "placeholder" or val is None or not val.is_floating_point():
                    self._carries[n] = False
                else:
                    self._carries[n] = any(self._carries.get(a, False)
                                           for a in n.all_input_nodes)
        return self._carries.get(node, False)
