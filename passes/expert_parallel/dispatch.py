"""Find MoE layers by their dataflow and rewrite each into token dispatch.

A layer is found from its router, not from module names: a `topk` over expert scores (the last
dim, E experts) whose indices reach a *combine*, `einsum("...eh,...e->...h", outputs, weights)`:
every expert's output weighted by a routing tensor that is zero outside each token's top-k (the
dense-masked form: the model computes every expert on every token, which exports with static
shapes). The *experts* are what the combine's outputs are computed from: starting at the
tokens, an einsum with a stacked parameter (E, in, out) per GEMM, and elementwise ops,
`chunk`/`split` of the feature dim between them (gelu, SwiGLU's silu(gate) * up, ...).

The rewrite computes exactly the same numbers sparsely: each token goes to its k experts only.

    tokens (T, h), indices (T, k) --moe_dispatch--> rows (N, h), counts     all-to-all over ep
    rows --the experts, per row: grouped_mm with this rank's slice of each stacked weight-->
    --moe_return--> (T, k, h)                                              all-to-all back
    (T, k, h) * gates (T, k), summed over k -> (T, h)

where gates are the routing weights read at the indices (`gather`), so the router's gradient is
the dense model's. The routing weights being zero outside the top-k is what makes this exact; it
is checked by construction (the weights must be computed from the same top-k's indices).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import fx

from core import ops
from core.fx_utils import module_path, tensor_of
from passes import PassError
from passes.propagation.table import BINARY, UNARY, aten_ops
from passes.expert_parallel.record import MoELayer

aten = torch.ops.aten
_ELEMENTWISE = frozenset(aten_ops(UNARY) + aten_ops(BINARY))
_SPLITS = frozenset({aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default})


@dataclass
class _Layer:
    """One MoE layer's nodes, as found (before the rewrite)."""

    topk: fx.Node
    indices: fx.Node
    combine: fx.Node
    expert_out: fx.Node
    """The combine's (tokens..., E, h) operand: every expert's output."""
    routing: fx.Node
    """The combine's (tokens..., E) operand: the routing weights."""
    num_experts: int

    @property
    def path(self) -> str:
        return module_path(self.topk) or self.topk.name


def find_layers(gm: fx.GraphModule) -> list[_Layer]:
    layers = []
    for topk in gm.graph.find_nodes(op="call_function", target=aten.topk.default):
        scores = tensor_of(topk.args[0])
        dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
        if scores is None or dim not in (-1, scores.dim() - 1):
            continue
        indices = next((u for u in topk.users if u.target is operator.getitem and u.args[1] == 1),
                       None)
        if indices is None:
            continue
        combine = _combine_of(indices)
        if combine is not None:
            layers.append(_Layer(topk, indices, *combine, num_experts=int(scores.shape[-1])))
    return layers


def _descendants(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


def _einsum_parts(node: fx.Node) -> tuple[list[str], str, list[fx.Node]] | None:
    if node.target is not aten.einsum.default:
        return None
    equation, operands = node.args[0], list(node.args[1])
    inputs, _, output = equation.replace(" ", "").partition("->")
    if "." in equation or not output:
        return None
    return inputs.split(","), output, operands


def _combine_of(indices: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(combine, expert outputs, routing weights): the first einsum downstream of `indices`
    that contracts an expert dim between a value the indices reach and one they do not."""
    reached = _descendants(indices)
    position = _positions(indices.graph)
    for node in sorted(reached, key=position.get):
        parts = _einsum_parts(node)
        if parts is None or len(parts[2]) != 2:
            continue
        (sub_a, sub_b), out, (a, b) = parts
        if (a in reached) == (b in reached):
            continue
        outputs, routing, sub_o, sub_r = (b, a, sub_b, sub_a) if a in reached else (a, b, sub_a,
                                                                                    sub_b)
        # outputs tok+e+h, routing tok+e, result tok+h
        if (len(sub_o) >= 2 and sub_r == sub_o[:-1] and out == sub_o[:-2] + sub_o[-1]):
            return node, outputs, routing
    return None


def _positions(graph: fx.Graph) -> dict[fx.Node, int]:
    return {node: i for i, node in enumerate(graph.nodes)}


class _Rewriter:
    """Builds one layer's sparse form before its combine and reroutes the combine's users."""

    def __init__(self, gm: fx.GraphModule, layer: _Layer, ep: int, rank: int) -> None:
        self.gm, self.layer, self.ep, self.rank = gm, layer, ep, rank
        self.graph = gm.graph
        self.rows_of: dict[fx.Node, fx.Node] = {}
        self.weights: list[fx.Node] = []
        self.expert_ops: list[str] = []
        self.region: set[fx.Node] = set()
        self.counts: fx.Node | None = None

    def run(self) -> MoELayer:
        layer, graph = self.layer, self.graph
        experts, local = layer.num_experts, layer.num_experts // self.ep
        k = int(tensor_of(layer.indices).shape[-1])
        tokens = self._tokens()
        *token_dims, hidden = tuple(tensor_of(tokens).shape)
        count = math.prod(token_dims)
        # Every new node goes just before the combine, after the ones inserted before it.
        with graph.inserting_before(layer.combine):
            flat_tokens = self._call(aten.reshape.default, (tokens, [count, hidden]))
            flat_indices = self._call(aten.reshape.default, (layer.indices, [count, k]))
            dispatch = graph.call_function(ops.moe_dispatch, (flat_tokens, flat_indices, "ep",
                                                              experts),
                                           {"group_size": self.ep})
            dispatch.meta["val"] = (  # N rows is data dependent: the even share stands for it
                tensor_of(flat_tokens).new_empty(count * k, hidden),
                tensor_of(flat_indices).new_empty(self.ep, local))
            rows = self._call(operator.getitem, (dispatch, 0))
            self.counts = self._call(operator.getitem, (dispatch, 1))
            self._localize_weights(local)
            rows_out = self._rows(layer.expert_out, tokens, rows)
            back = self._call(ops.moe_return, (rows_out, flat_indices, self.counts, "ep",
                                               experts), {"group_size": self.ep})
            routing = self._call(aten.reshape.default, (layer.routing, [count, experts]))
            gates = self._call(aten.gather.default, (routing, 1, flat_indices))
            weighted = self._call(aten.mul.Tensor,
                                  (back, self._call(aten.unsqueeze.default, (gates, -1))))
            summed = self._call(aten.sum.dim_IntList, (weighted, [1]))
            out = self._call(aten.reshape.default,
                             (summed, list(tensor_of(layer.combine).shape)))
        layer.combine.replace_all_uses_with(out)
        self._erase_dense(layer.combine)
        return MoELayer(path=layer.path, num_experts=experts, topk=k,
                        local_experts=(self.rank * local, (self.rank + 1) * local),
                        weights=tuple(w.target for w in self.weights),
                        expert_ops=tuple(self.expert_ops), tokens=count)

    def _tokens(self) -> fx.Node:
        """What the experts' first GEMMs read: an einsum operand without the expert dim,
        beside a stacked weight. All of them must read the same tensor."""
        found, stack, seen = set(), [self.layer.expert_out], set()
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            parts = _einsum_parts(node)
            if parts is not None and len(parts[2]) == 2:
                (sub_a, sub_b), out, (a, b) = parts
                if _is_stacked(b, self.layer.num_experts) and sub_b[0] not in sub_a:
                    found.add(a)
                    continue
                if _is_stacked(a, self.layer.num_experts) and sub_a[0] not in sub_b:
                    found.add(b)
                    continue
            stack.extend(node.all_input_nodes)
        if len(found) != 1:
            what = ("no GEMM of the tokens with a stacked (E, in, out) expert weight"
                    if not found else f"GEMMs of {len(found)} different token tensors")
            raise PassError(self._unsupported(self.layer.expert_out, what))
        return found.pop()

    # --- the experts, per row -----------------------------------------------------------
    def _rows(self, node: fx.Node, tokens: fx.Node, rows: fx.Node) -> fx.Node:
        """`node` of the dense experts (tokens..., [E,] features) computed on dispatched rows
        (N, features): the same op per row, GEMMs against stacked weights grouped by expert."""
        if node in self.rows_of:
            return self.rows_of[node]
        self.region.add(node)
        parts = _einsum_parts(node)
        if parts is not None and len(parts[2]) == 2:
            out = self._grouped_mm(node, parts, tokens, rows)
        elif node.target in _ELEMENTWISE or node.target in _SPLITS or (
                node.target is operator.getitem):
            out = self._pointwise(node, tokens, rows)
        else:
            raise PassError(self._unsupported(node))
        self.rows_of[node] = out
        return out

    def _grouped_mm(self, node: fx.Node, parts, tokens: fx.Node, rows: fx.Node) -> fx.Node:
        (sub_a, sub_w), out, (a, w) = parts
        if not _is_stacked(w, self.layer.num_experts):
            (sub_a, sub_w), (a, w) = (sub_w, sub_a), (w, a)
        if not _is_stacked(w, self.layer.num_experts):
            raise PassError(self._unsupported(node, "an einsum with no stacked (E, in, out) "
                                                    "expert weight"))
        e, inner, outer = sub_w
        tokens_part = out[:-2]
        if (len(sub_w) != 3 or out[-2:] != e + outer or sub_a[-1] != inner
                or sub_a[:-1] not in (tokens_part, tokens_part + e)):
            raise PassError(self._unsupported(node, f"einsum {node.args[0]!r} is not one GEMM "
                                                    f"per expert"))
        source = rows if a is tokens else self._rows(a, tokens, rows)
        if any(user not in self.region and user.target is not aten.einsum.default
               for user in w.users):
            raise PassError(self._unsupported(node, f"the expert weight {w.target} is used "
                                                    f"outside the experts"))
        if w not in self.weights:
            self.weights.append(w)
        self.expert_ops.append("grouped_mm")
        return self._call(ops.grouped_mm, (source, w, self.counts))

    def _pointwise(self, node: fx.Node, tokens: fx.Node, rows: fx.Node) -> fx.Node:
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
                arg = self._rows(arg, tokens, rows)
            args.append(arg)
        if node.target in _SPLITS:
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            if dim not in (-1, tensor_of(node.args[0]).dim() - 1):
                raise PassError(self._unsupported(node, "a split of a dim other than the "
                                                        "features"))
            args = [args[0], args[1], -1]
        if node.target is not operator.getitem:
            self.expert_ops.append(str(node.target).split(".")[-2] if "." in str(node.target)
                                   else str(node.target))
        return self._call(node.target, tuple(args), {k: v for k, v in node.kwargs.items()
                                                     if k != "dim"})

    def _unsupported(self, node: fx.Node, what: str | None = None) -> str:
        what = what or f"{node.target}"
        return (f"MoE layer {self.layer.path}: its experts compute {what} ({node.name}), which "
                f"the expert-parallel pass cannot run per token: it runs experts built from "
                f"einsum GEMMs with stacked (E, in, out) weights and elementwise ops between "
                f"them. Set ep=1 for this model")

    # --- graph edits ------------------------------------------------------------------------
    def _call(self, target, args, kwargs=None) -> fx.Node:
        node = self.graph.call_function(target, args, kwargs or {})
        vals = fx.node.map_arg((args, kwargs or {}), lambda n: n.meta.get("val"))
        node.meta["val"] = target(*vals[0], **vals[1])
        return node

    def _erase_dense(self, combine: fx.Node) -> None:
        position = _positions(self.graph)
        dead = [combine] + sorted(self.region, key=position.get, reverse=True)
        for node in dead:
            if not node.users:
                self.graph.erase_node(node)

    def _localize_weights(self, local: int) -> None:
        for weight in self.weights:
            val = tensor_of(weight)
            if val.shape[0] != local:
                weight.meta["val"] = val.new_empty(local, *val.shape[1:])


def _is_stacked(node: fx.Node, num_experts: int) -> bool:
    val = tensor_of(node)
    return (node.op == "get_attr" and val is not None and val.dim() == 3
            and val.shape[0] == num_experts)
