"""Rewrite each MoE layer `find.py` found into token dispatch.

Between the GEMMs the experts run per-row ops: elementwise ops, casts, `chunk`/`split` of the
feature dim (gelu, SwiGLU's silu(gate) * up, ...). The rewrite computes the same numbers with
each (token, choice) pair sent to the rank holding its expert:

    tokens (T, h), indices (T, k) --moe_dispatch--> rows (N, h), counts     all-to-all over ep
    rows --the experts' per-row ops, each GEMM a grouped_mm with this rank's slice of the
    stacked weight--> --moe_return--> (T, k, h)                            all-to-all back

then, for the dense form, (T, k, h) weighted by the routing weights read at the indices
(`gather`) and summed over k; for the row forms, the returned rows take the place of the
experts' output rows (in the sorted or choice order the model's own code expects) and the
model's weighting and unsorting run as they are. Either way the router's gradient is the
model's own.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import fx

from core import meta, ops
from core.capacity import expert_capacity
from core.placement import Held, Placements, Shard, StridedShard
from core.fx_utils import tensor_of
from passes import PassError
from passes.expert_parallel.find import (ELEMENTWISE, HF_GROUPED_MM, SPLITS, Layer,
                                         descendants, einsum_parts, is_stacked, positions,
                                         unsupported)
from passes.expert_parallel.record import MoELayer

aten = torch.ops.aten


class LayerRewriter:
    """Builds one layer's sparse form before its exit and reroutes the exit's users."""

    def __init__(self, gm: fx.GraphModule, layer: Layer, ep: int, rank: int, tp: int = 1,
                 etp: int = 1, capacity_factor: float | None = None, cp: int = 1,
                 cp_rank: int = 0) -> None:
        self.gm, self.layer, self.ep, self.rank, self.tp, self.etp = gm, layer, ep, rank, tp, etp
        self.cp, self.cp_rank = cp, cp_rank
        """Under cp the context-parallel pass reads the MoE block's tokens gathered whole
        (the router's top-k has no rule on sequence shards), so the cp ranks hold the same
        tokens, as the tp ranks do: each dispatches its 1/cp of them."""
        self.capacity_factor = capacity_factor
        """None: dropless; else each expert keeps its first pairs of this rank's microbatch
        (core/capacity.py)."""
        self.graph = gm.graph
        self.rows_of: dict[fx.Node, fx.Node] = {}
        self.weights: list[fx.Node] = []
        self.split_dims: list[int] = []
        """Per expert GEMM (in dataflow order), the weight dim etp splits."""
        self.expert_ops: list[str] = []
        self.replaced: set[fx.Node] = set()
        self.counts: fx.Node | None = None
        self.local = layer.num_experts // ep
        self.stacks: dict[fx.Node, fx.Node] = {}
        self.bias_of: dict[fx.Node, fx.Node | None] = {}
        """unrolled form: expert 0's Linear weight -> its bias (None without)."""
        """unrolled form: expert 0's weight -> this rank's experts' weights of that role,
        stacked."""

    def run(self) -> MoELayer:
        layer, graph = self.layer, self.graph
        experts = layer.num_experts
        k = int(tensor_of(layer.indices).shape[-1])
        *token_dims, hidden = tuple(tensor_of(layer.tokens).shape)
        count = math.prod(token_dims)
        # With etp = tp the tp ranks split each expert and need the same tokens; with etp = 1
        # they split the tokens instead.
        token_split = self.tp if self.etp == 1 else 1
        if layer.form == "unrolled" and self.etp > 1:
            raise PassError(f"MoE layer {layer.path} holds its experts as a ModuleList, each "
                            f"whole on one ep rank, and etp={self.etp} would split each over "
                            f"the tp ranks (Megatron's expert tensor parallelism needs stacked "
                            f"expert weights): set etp=1 (each tp rank then dispatches its "
                            f"1/tp of the tokens)")
        self.replaced |= layer.looped
        if self.cp > 1 and meta.CP_DIM in layer.tokens.meta:
            raise PassError(f"MoE layer {layer.path}: under cp={self.cp} its experts read this "
                            f"rank's share of the sequence (the context-parallel pass carried "
                            f"it through their Linears) while the router's top-k reads the "
                            f"sequence gathered whole; expert parallelism beside cp dispatches "
                            f"the gathered tokens, which this layer does not read. Set cp=1 "
                            f"(fold ep onto dp or tp ranks) or ep=1 for this model")
        if count % token_split:
            raise PassError(f"MoE layer {layer.path} reads {count} tokens per microbatch, which "
                            f"do not split over tp={self.tp}: the ranks of a tp group hold the "
                            f"same tokens, and each dispatches its 1/tp of them so that no "
                            f"token is sent twice. Use a batch*sequence divisible by {self.tp}")
        # The cp ranks hold the same (gathered) tokens too. When they do not split evenly
        # (a padded sequence's odd length), every cp rank dispatches them all: still exact,
        # since a whole value's gradient is partial over cp (each rank's output gradient is
        # its own tokens'), so the experts' gradients over the cp ranks' rows sum to the
        # single-device ones; only the work is repeated.
        cp_split = self.cp if count % (self.cp * token_split) == 0 else 1
        share = count // (cp_split * token_split)
        with graph.inserting_before(layer.exit):
            flat_tokens = self._call(aten.reshape.default, (layer.tokens, [count, hidden]))
            flat_indices = self._call(aten.reshape.default, (layer.indices, [count, k]))
            sent_tokens, sent_indices = flat_tokens, flat_indices
            capacity = None
            if self.capacity_factor is not None:
                # the tokens of this dp shard's microbatch compete (before tp splits them)
                capacity = expert_capacity(count, k, experts, self.capacity_factor)
                sent_indices = self._call(ops.expert_capacity, (flat_indices, experts, capacity))
            if cp_split > 1:  # this cp rank's share: a slice, its backward pads with zeros
                first = self.cp_rank * count // cp_split
                sent_tokens, sent_indices = (
                    self._call(aten.slice.Tensor, (value, 0, first, first + count // cp_split))
                    for value in (sent_tokens, sent_indices))
            if token_split > 1:  # this tp rank's share of the (replicated) tokens
                sent_tokens, sent_indices = (
                    self._call(ops.scatter, (value, "tp", 0), {"group_size": self.tp})
                    for value in (sent_tokens, sent_indices))
            dispatch = graph.call_function(ops.moe_dispatch, (sent_tokens, sent_indices, "ep",
                                                              experts),
                                           {"group_size": self.ep})
            dispatch.meta["val"] = (  # N rows is data dependent: the even share stands for it
                tensor_of(sent_tokens).new_empty(share * k, hidden),
                tensor_of(sent_indices).new_empty(self.ep, self.local))
            dispatch.meta[meta.COLLECTIVE] = "all_to_all"
            rows = self._call(operator.getitem, (dispatch, 0))
            self.counts = self._call(operator.getitem, (dispatch, 1))
            if self.etp > 1:  # f: every etp rank's slice of the experts reads the same rows
                rows = self._call(ops.copy_to_region, (rows, "etp"))
            whole_tokens = layer.form in ("dense", "unrolled")  # the experts read the tokens
            expert_out = layer.expert_out if whole_tokens else layer.exit
            start = layer.tokens if whole_tokens else layer.entry
            rows_out = self._rows(expert_out, start, rows)
            back = self._call(ops.moe_return, (rows_out, sent_indices, self.counts, "ep",
                                               experts), {"group_size": self.ep})
            back.meta[meta.COLLECTIVE] = "all_to_all"
            if self.etp > 1:  # g: the row GEMMs' partial sums over the experts' slices
                back = self._call(ops.all_reduce, (back, "etp"))
            elif token_split > 1:  # every tp rank's share, whole again (replicated over tp)
                back = self._call(ops.all_gather, (back, "tp", 0), {"group_size": self.tp})
            if cp_split > 1:  # every cp rank's share, whole again; backward reduce-scatters
                # the whole value's gradient, partial over cp (each rank's own tokens')
                back = self._call(ops.gather_for_region, (back, "cp", 0),
                                  {"group_size": self.cp})
            if layer.form == "dense":
                routing = self._call(aten.reshape.default, (layer.routing, [count, experts]))
                gates = self._call(aten.gather.default, (routing, 1, flat_indices))
                weighted = self._call(aten.mul.Tensor,
                                      (back, self._call(aten.unsqueeze.default, (gates, -1))))
                summed = self._call(aten.sum.dim_IntList, (weighted, [1]))
                out = self._call(aten.reshape.default,
                                 (summed, list(tensor_of(layer.exit).shape)))
            elif layer.form == "unrolled":  # each choice weighted by its value, summed
                gates = self._call(aten.reshape.default, (layer.routing, [count, k]))
                weighted = self._call(aten.mul.Tensor,
                                      (back, self._call(aten.unsqueeze.default, (gates, -1))))
                summed = self._call(aten.sum.dim_IntList, (weighted, [1]))
                out = self._call(aten.reshape.default,
                                 (summed, list(tensor_of(layer.exit).shape)))
                if layer.init is not None:
                    out = self._call(aten.add.Tensor, (layer.init, out))
            else:  # the model weights, unsorts and sums the rows itself
                out = self._call(aten.reshape.default, (back, [count * k, back.meta["val"]
                                                               .shape[-1]]))
                if layer.form == "sorted":
                    out = self._call(aten.index.Tensor, (out, [layer.order]))
        if self.etp > 1 and len(self.split_dims) != 2:
            raise PassError(self._unsupported(
                layer.exit, f"{len(self.split_dims)} GEMMs per expert (etp={self.etp} splits "
                            f"an expert as one column GEMM then one row GEMM, Megatron's expert "
                            f"tensor parallelism; set etp=1)"))
        layer.exit.replace_all_uses_with(out)
        self._erase_replaced(layer.exit)
        left = [n for n in layer.looped if n.op != "get_attr" and not n._erased]
        if left:
            raise PassError(self._unsupported(left[0], "an expert's value also read outside "
                                                       "the experts"))
        # The layer is the module holding the router and the experts (a router's top-k may
        # sit in a submodule of its own, as Hugging Face's `gate`).
        paths = [layer.path.split(".")] + [w.target.split(".")[:-1] for w in self.weights]
        common = [parts[0] for parts in zip(*paths) if len(set(parts)) == 1]
        return MoELayer(path=".".join(common) or layer.path, num_experts=experts, topk=k,
                        local_experts=(self.rank * self.local, (self.rank + 1) * self.local),
                        weights=tuple(w.target for w in self.weights) if layer.form != (
                            "unrolled") else tuple(w.target for weights in layer.expert_weights
                                                   for w in weights),
                        expert_ops=tuple(self.expert_ops), tokens=count, capacity=capacity,
                        split_over=tuple(f"{dim}={size}" for dim, size in
                                         (("cp", cp_split), ("tp", token_split)) if size > 1),
                        placements=self._held() if layer.form == "unrolled" else tuple(
                            (w.target, self._placements(i)) for i, w in enumerate(self.weights)))

    def _held(self) -> tuple[tuple[str, Placements], ...]:
        """unrolled form: every parameter of expert e held whole by ep rank e // (E/ep)."""
        return tuple((w.target, Placements().with_("ep", Held(e // self.local)))
                     for e, weights in enumerate(self.layer.expert_weights) for w in weights)

    def _placements(self, gemm: int) -> Placements:
        """Experts split along dim 0 over ep; with etp > 1 the column GEMM's weight split on
        its output dim (sub-blocks split each, when the output is chunked as SwiGLU's gate|up)
        and the row GEMM's on its input dim."""
        placements = Placements().with_("ep", Shard(0))
        if self.etp == 1:
            return placements
        dim = self.split_dims[gemm]
        chunks = [n for n in self.replaced if n.target is aten.chunk.default]
        if gemm == 0 and chunks:
            size = int(tensor_of(self.weights[0]).shape[dim]) * self.etp
            pieces = int(chunks[0].args[1])
            return placements.with_("etp", StridedShard(dim, (size // pieces,) * pieces))
        return placements.with_("etp", Shard(dim))

    # --- the experts, per row -----------------------------------------------------------
    def _rows(self, node: fx.Node, start: fx.Node, rows: fx.Node) -> fx.Node:
        """`node` of the model's experts computed on the dispatched rows (N, features): the
        same op per row, each GEMM grouped by expert over this rank's experts. `start` (the
        tokens, or the row forms' entry rows) is what becomes the dispatched rows."""
        if node is start:
            return rows
        if node in self.rows_of:
            return self.rows_of[node]
        self.replaced.add(node)
        gemm = self._gemm(node)
        if gemm is not None:
            source, weight, transpose = gemm
            out = self._grouped_mm(self._rows(source, start, rows), weight, transpose)
        elif node.target in ELEMENTWISE or node.target in SPLITS or (
                node.target is operator.getitem):
            out = self._pointwise(node, start, rows)
        else:
            raise PassError(self._unsupported(node))
        self.rows_of[node] = out
        return out

    def _gemm(self, node: fx.Node) -> tuple[fx.Node, fx.Node, bool] | None:
        """(rows it reads, stacked weight, whether the weight is (E, out, in)) when `node` is
        one GEMM per expert in any of the forms, else None."""
        experts = self.layer.num_experts
        if self.layer.form == "unrolled":  # nn.Linear of one expert: x @ W.T, W (out, in)
            weights = self.layer.expert_weights[0]
            if node.target is not aten.linear.default or node.args[1] not in weights:
                return None
            bias = node.args[2] if len(node.args) > 2 else None
            if bias is not None and bias not in weights:
                raise PassError(self._unsupported(node, "a Linear whose bias is not one of "
                                                        "the expert's parameters"))
            self.bias_of[node.args[1]] = bias
            self.replaced.add(node)
            return node.args[0], node.args[1], True
        parts = einsum_parts(node)
        if parts is not None and len(parts[2]) == 2:
            (sub_a, sub_w), out, (a, w) = parts
            if not is_stacked(w, experts):
                (sub_a, sub_w), (a, w) = (sub_w, sub_a), (w, a)
            if not is_stacked(w, experts) or len(sub_w) != 3:
                raise PassError(self._unsupported(node, "an einsum with no stacked (E, in, out) "
                                                        "expert weight"))
            e, inner, outer = sub_w
            tokens_part = out[:-2]
            if (out[-2:] != e + outer or sub_a[-1] != inner
                    or sub_a[:-1] not in (tokens_part, tokens_part + e)):
                raise PassError(self._unsupported(node, f"einsum {node.args[0]!r}, not one GEMM "
                                                        f"per expert"))
            self.replaced.add(node)
            return a, w, False
        if str(node.target) == HF_GROUPED_MM:  # (rows, W (E, in, out) or W^T, offsets)
            source, weight = node.args[0], node.args[1]
            transposed = weight.target is aten.transpose.int and weight.op == "call_function"
            stacked = weight.args[0] if transposed else weight
            if not is_stacked(stacked, experts):
                raise PassError(self._unsupported(node, "a grouped GEMM without a stacked "
                                                        "expert weight"))
            if transposed:
                self.replaced.add(weight)
            # the offsets (histc + cumsum of the sorted indices) are no longer read
            self.replaced.update(_ancestors_within(node.args[2], self.layer.indices))
            return source, stacked, transposed
        if node.target is aten.squeeze.dim and node.args[0].target is aten.bmm.default:
            bmm = node.args[0]
            picked, column = bmm.args  # W[ids] (S, out, in) @ x.unsqueeze(-1) (S, in, 1)
            if (picked.target is aten.index.Tensor and column.target is aten.unsqueeze.default
                    and is_stacked(picked.args[0], experts)):
                self.replaced.update({bmm, picked, column})
                return column.args[0], picked.args[0], True
            row, picked = bmm.args  # x.unsqueeze(1) (S, 1, in) @ W[ids] (S, in, out)
            if (picked.target is aten.index.Tensor and row.target is aten.unsqueeze.default
                    and is_stacked(picked.args[0], experts)):
                self.replaced.update({bmm, picked, row})
                return row.args[0], picked.args[0], False
        return None

    def _grouped_mm(self, source: fx.Node, weight: fx.Node, transposed: bool) -> fx.Node:
        if self.layer.form == "unrolled":
            return self._grouped_mm_of_experts(source, weight)
        if any(user not in self.replaced for user in weight.users):
            raise PassError(self._unsupported(weight, f"the expert weight {weight.target} also "
                                                      f"used outside the experts"))
        if weight not in self.weights:
            self.weights.append(weight)
            # the first GEMM is column-parallel over etp (its output dim split), the second
            # row-parallel (its input dim): which weight dim that is depends on the layout
            column = len(self.split_dims) == 0
            dim = (1 if transposed else 2) if column else (2 if transposed else 1)
            self.split_dims.append(dim)
            shape = list(tensor_of(weight).shape)
            shape[0] = self.local
            if self.etp > 1:
                if shape[dim] % self.etp:
                    raise PassError(self._unsupported(weight, f"an expert dim of {shape[dim]}, "
                                                              f"which etp={self.etp} does not "
                                                              f"divide"))
                shape[dim] //= self.etp
            weight.meta["val"] = tensor_of(weight).new_empty(shape)
        if transposed:
            weight = self._call(aten.transpose.int, (weight, -2, -1))
        self.expert_ops.append("grouped_mm")
        return self._call(ops.grouped_mm, (source, weight, self.counts))

    def _grouped_mm_of_experts(self, source: fx.Node, weight: fx.Node) -> fx.Node:
        """unrolled form: the grouped GEMM with this rank's experts' weights of the role
        `weight` (expert 0's) plays, stacked (local, out, in) and transposed; a Linear's bias
        added to each row as its expert's (a grouped GEMM of ones (rows, 1) with the stacked
        biases (local, 1, out), whose weight gradient sums each expert's rows)."""
        out = self._call(ops.grouped_mm, (source, self._call(
            aten.transpose.int, (self._stacked(weight), -2, -1)), self.counts))
        self.expert_ops.append("grouped_mm")
        bias = self.bias_of.get(weight)
        if bias is not None:
            ones = self._call(aten.ones_like.default, (self._call(
                aten.slice.Tensor, (source, -1, 0, 1)),))
            biases = self._call(aten.unsqueeze.default, (self._stacked(bias), 1))
            out = self._call(aten.add.Tensor, (out, self._call(ops.grouped_mm,
                                                               (ones, biases, self.counts))))
        return out

    def _stacked(self, weight: fx.Node) -> fx.Node:
        """This rank's experts' parameters of the role expert 0's `weight` plays, stacked."""
        role = self.layer.expert_weights[0].index(weight)
        if weight not in self.stacks:
            for weights in self.layer.expert_weights:
                if any(user not in self.replaced for user in weights[role].users):
                    raise PassError(self._unsupported(weights[role], f"the expert weight "
                                                      f"{weights[role].target} also used "
                                                      f"outside the experts"))
            first = self.rank * self.local
            local = [weights[role] for weights in
                     self.layer.expert_weights[first:first + self.local]]
            self.stacks[weight] = self._call(aten.stack.default, (local, 0))
            self.weights.append(weight)
        return self.stacks[weight]

    def _pointwise(self, node: fx.Node, start: fx.Node, rows: fx.Node) -> fx.Node:
        val = tensor_of(node)
        args = []
        for arg in node.args:
            scalar = isinstance(arg, fx.Node) and tensor_of(arg) is not None and (
                tensor_of(arg).dim() == 0)
            if isinstance(arg, fx.Node) and not scalar:
                if val is not None and tensor_of(arg) is not None and (
                        tensor_of(arg).dim() != val.dim()):
                    raise PassError(self._unsupported(node, "an operand broadcast over the "
                                                            "experts or tokens"))
                arg = self._rows(arg, start, rows)
            args.append(arg)
        if node.target in SPLITS:
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            if dim not in (-1, tensor_of(node.args[0]).dim() - 1):
                raise PassError(self._unsupported(node, "a split of a dim other than the "
                                                        "features"))
            args = [args[0], args[1], -1]
        if node.target is not operator.getitem and not _is_cast(node):
            self.expert_ops.append(str(node.target).split(".")[-2] if "." in str(node.target)
                                   else str(node.target))
        return self._call(node.target, tuple(args), {k: v for k, v in node.kwargs.items()
                                                     if k != "dim"})

    def _unsupported(self, node: fx.Node, what: str | None = None) -> str:
        return unsupported(self.layer.path, node, what)

    # --- graph edits ------------------------------------------------------------------------
    def _call(self, target, args, kwargs=None) -> fx.Node:
        node = self.graph.call_function(target, args, kwargs or {})
        vals = fx.node.map_arg((args, kwargs or {}), lambda n: _on_meta(n.meta.get("val")))
        node.meta["val"] = target(*vals[0], **vals[1])
        return node

    def _erase_replaced(self, exit: fx.Node) -> None:
        """The model's own experts (and the routing values only they read), now unused."""
        position = positions(self.graph)
        for node in sorted(self.replaced | {exit}, key=position.get, reverse=True):
            if not node.users and not node.is_impure():
                self.graph.erase_node(node)


def _ancestors_within(node: fx.Node, root: fx.Node) -> set[fx.Node]:
    """`node` and its ancestors that descend from `root` (a value computed from the indices)."""
    below = descendants(root)
    found, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current in below and current not in found:
            found.add(current)
            stack.extend(current.all_input_nodes)
    return found


def _on_meta(val):
    """A shape-only copy of a node's value: earlier passes leave FakeTensors and meta tensors
    side by side, which do not mix in one op."""
    if isinstance(val, torch.Tensor):
        return torch.empty(val.shape, dtype=val.dtype, device="meta")
    if isinstance(val, (tuple, list)):
        return type(val)(_on_meta(v) for v in val)
    return val


def _is_cast(node: fx.Node) -> bool:
    return node.target in (aten.to.dtype, aten._to_copy.default, aten.alias.default,
                           aten.clone.default, aten.contiguous.default)
