"""Find MoE layers by their dataflow and rewrite each into token dispatch.

A layer is found from its router, not from module names: a `topk` over expert scores (the last
dim, E experts) whose indices reach the experts in one of three forms that models export:

- dense-masked (the in-repo MoE): every expert computed on every token by einsums with stacked
  (E, in, out) weights, then a *combine* `einsum("...eh,...e->...h", outputs, weights)` with
  routing weights that are zero outside each token's top-k;
- sorted rows (Hugging Face's `grouped_mm` experts): the (token, choice) pairs sorted by expert
  (`sort` of the flat indices), the token rows gathered in that order, one grouped GEMM per
  projection (`transformers::grouped_mm_fallback` with per-expert offsets), the rows weighted
  and put back in token order;
- choice rows (Hugging Face's `batched_mm` experts): the tokens repeated once per choice, each
  row multiplied by its expert's weight matrix picked by index (`bmm` of `W[indices]`);
- unrolled (experts as an `nn.ModuleList` of MLPs run in a Python loop, the form most
  hand-written MoE code has): per expert e a gate `sum(values * (indices == e), -1)` times
  the expert's MLP on every token, the products summed. Every expert must compute the same ops
  (nn.Linear GEMMs, with or without bias, and per-row ops) with its own parameters; the
  rewrite stacks this rank's experts' weights (`stack`, whose backward hands each expert its
  gradient) for the grouped GEMMs, and each expert's parameters are held whole by one ep rank
  (`core.placement.Held`).

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
from dataclasses import dataclass

import torch
from torch import fx

from core import meta, ops
from core.capacity import expert_capacity
from core.placement import Held, Placements, Shard, StridedShard
from core.fx_utils import module_path, tensor_of
from passes import PassError
from passes.propagation.table import BINARY, UNARY, aten_ops
from passes.expert_parallel.record import MoELayer

aten = torch.ops.aten
_ELEMENTWISE = frozenset(aten_ops(UNARY) + aten_ops(BINARY))
_SPLITS = frozenset({aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default})
_HF_GROUPED_MM = "transformers.grouped_mm_fallback.default"
"""Hugging Face's opaque grouped GEMM (rows sorted by expert, per-expert end offsets)."""


@dataclass
class _Layer:
    """One MoE layer's nodes, as found (before the rewrite)."""

    topk: fx.Node
    indices: fx.Node
    num_experts: int
    form: str
    """"dense", "sorted", "choice" or "unrolled" (see the module docstring)."""
    tokens: fx.Node
    """The (tokens..., h) values the experts read."""
    exit: fx.Node
    """dense: the combine; row forms: the experts' output rows (before their weighting)."""
    expert_out: fx.Node | None = None
    """dense: the combine's (tokens..., E, h) operand, every expert's output."""
    routing: fx.Node | None = None
    """dense: the combine's (tokens..., E) operand, the routing weights."""
    entry: fx.Node | None = None
    """row forms: the token rows the first GEMMs read (gathered in sorted order / repeated)."""
    order: fx.Node | None = None
    """sorted form: the permutation that sorts the flat (token, choice) pairs by expert."""
    expert_weights: tuple[tuple[fx.Node, ...], ...] = ()
    """unrolled form: each expert's parameters (get_attr), in the order its ops read them."""
    init: fx.Node | None = None
    """unrolled form: what the products are added to (the loop's zeros), or None."""
    looped: frozenset = frozenset()
    """unrolled form: the loop's nodes (masks, gates, every expert's ops, the sums)."""

    @property
    def path(self) -> str:
        return module_path(self.topk) or self.topk.name


def find_layers(gm: fx.GraphModule) -> list[_Layer]:
    layers = []
    position = _positions(gm.graph)
    for topk in gm.graph.find_nodes(op="call_function", target=aten.topk.default):
        scores = tensor_of(topk.args[0])
        dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
        if scores is None or dim not in (-1, scores.dim() - 1):
            continue
        outputs = {u.args[1]: u for u in topk.users if u.target is operator.getitem}
        if 1 not in outputs:
            continue
        experts = int(scores.shape[-1])
        layer = (_dense_layer(topk, outputs[1], experts, position)
                 or _row_layer(topk, outputs, experts, position)
                 or _unrolled_layer(topk, outputs[1], experts, position))
        if layer is not None:
            layers.append(layer)
    return layers


def looped_expert_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The ops of experts held as a ModuleList (the unrolled form): under ep each expert stays
    whole on its ep rank, so the tensor-parallel pass leaves their Linears replicated (etp=1)
    instead of splitting each expert's MLP over tp."""
    position = _positions(graph)
    found = set()
    for topk in graph.find_nodes(op="call_function", target=aten.topk.default):
        indices = next((u for u in topk.users if u.target is operator.getitem
                        and u.args[1] == 1), None)
        scores = tensor_of(topk.args[0])
        if indices is None or scores is None:
            continue
        try:
            layer = _unrolled_layer(topk, indices, int(scores.shape[-1]), position)
        except PassError:  # the expert-parallel pass reports it
            continue
        if layer is not None:
            found |= layer.looped
    return found


def _dense_layer(topk, indices, experts, position) -> _Layer | None:
    """The first einsum downstream of the indices that contracts an expert dim between a value
    they reach (the routing weights) and one they do not (the experts' outputs)."""
    reached = _descendants(indices)
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
        if len(sub_o) >= 2 and sub_r == sub_o[:-1] and out == sub_o[:-2] + sub_o[-1]:
            if not _zero_outside_top_k(routing, indices):
                path = module_path(topk) or topk.name
                raise PassError(
                    f"MoE layer {path}: the routing weights its experts' outputs are combined "
                    f"with ({routing.name}) are not the router's top-k values scattered into "
                    f"zeros, so computing each token's top-k experts only would change the "
                    f"numbers (ep dispatches each token to its top-k experts). Build them as "
                    f"torch.zeros_like(scores).scatter(-1, top_k_indices, top_k_weights), or "
                    f"set ep=1")
            tokens = _dense_tokens(outputs, experts, topk)
            return _Layer(topk, indices, experts, "dense", tokens, node, expert_out=outputs,
                          routing=routing)
    return None


_ZEROS = frozenset({aten.zeros_like.default, aten.zeros.default, aten.new_zeros.default})
_SAME_VALUES = frozenset({aten.view.default, aten.reshape.default, aten.to.dtype,
                          aten._to_copy.default, aten.clone.default, aten.contiguous.default,
                          aten.alias.default})


def _zero_outside_top_k(routing: fx.Node, indices: fx.Node) -> bool:
    """The routing weights are a scatter of values at the top-k indices into zeros (possibly
    reshaped or cast): what makes the dense combine equal to the sparse one."""
    def source(node):
        while isinstance(node, fx.Node) and node.target in _SAME_VALUES:
            node = node.args[0]
        return node

    scatter = source(routing)
    if scatter.target not in (aten.scatter.src, aten.scatter.value):
        return False
    base, _, index = scatter.args[:3]
    return source(base).target in _ZEROS and source(index) is indices


def _dense_tokens(expert_out: fx.Node, experts: int, topk: fx.Node) -> fx.Node:
    """What the experts' first GEMMs read: an einsum operand without the expert dim, beside a
    stacked weight. All of them must read the same tensor."""
    found, stack, seen = set(), [expert_out], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        parts = _einsum_parts(node)
        if parts is not None and len(parts[2]) == 2:
            (sub_a, sub_b), _, (a, b) = parts
            if _is_stacked(b, experts) and sub_b[0] not in sub_a:
                found.add(a)
                continue
            if _is_stacked(a, experts) and sub_a[0] not in sub_b:
                found.add(b)
                continue
        stack.extend(node.all_input_nodes)
    if len(found) != 1:
        what = ("no GEMM of the tokens with a stacked (E, in, out) expert weight" if not found
                else f"GEMMs of {len(found)} different token tensors")
        raise PassError(_unsupported(module_path(topk) or topk.name, expert_out, what))
    return found.pop()


def _row_layer(topk, outputs, experts, position) -> _Layer | None:
    """Hugging Face's row forms: find the rows the experts start from, then their output rows:
    the operand of the first multiply by the router's top-k values (the routing weights)."""
    indices = outputs[1]
    flat = [u for u in indices.users if u.target in (aten.reshape.default, aten.view.default)
            and tensor_of(u).dim() == 1]
    entry = order = None
    for ids in flat:
        for user in ids.users:
            if user.target is aten.sort.default:  # sorted rows: tokens[order // k]
                order = next((u for u in user.users if u.target is operator.getitem
                              and u.args[1] == 1), None)
                if order is None:
                    continue
                for div in order.users:
                    if div.target is aten.floor_divide.default:
                        entry = next((u for u in div.users if u.target is aten.index.Tensor
                                      and list(u.args[1]) == [div]), entry)
        if entry is not None:
            break
    if entry is None:  # choice rows: tokens.repeat_interleave(k, 0)
        k = int(tensor_of(indices).shape[-1])
        candidates = [n for n in topk.graph.find_nodes(
            op="call_function", target=aten.repeat_interleave.self_int)
            if n.args[1] == k and (len(n.args) > 2 and n.args[2] == 0)
            and any(u.target is aten.unsqueeze.default
                    and any(_gemm_of_choice_rows(b, flat) for b in u.users) for u in n.users)]
        entry = min(candidates, key=position.get) if candidates else None
        if entry is None:
            return None
    form = "sorted" if order is not None else "choice"
    tokens = entry.args[0]
    weighted = set().union(*(_descendants(v) for v in outputs.values() if v is not indices)) \
        if len(outputs) > 1 else set()
    reached = _descendants(entry)
    for node in sorted(reached, key=position.get):
        if node.target is aten.mul.Tensor and len(node.args) == 2:
            a, b = node.args
            if a in reached and b in weighted and b not in reached:
                return _Layer(topk, indices, experts, form, tokens, a, entry=entry, order=order)
            if b in reached and a in weighted and a not in reached:
                return _Layer(topk, indices, experts, form, tokens, b, entry=entry, order=order)
    return None


def _unrolled_layer(topk, indices, experts, position) -> _Layer | None:
    """A loop over a ModuleList of experts: for each expert e a mask `indices == e`, a gate
    `sum(values * mask, -1)` (values shaped like the indices, so the gate is zero unless e is
    among the token's top-k, where it is that choice's value), the gate times the expert's
    output, and the products added up in one chain."""
    masks = {u.args[1]: u for u in indices.users
             if u.target is aten.eq.Scalar and isinstance(u.args[1], int)}
    if sorted(masks) != list(range(experts)):
        return None
    path = module_path(topk) or topk.name
    reached = _descendants(indices)
    looped, gated, values = set(), {}, set()
    for e in range(experts):  # by expert index, whatever order the loop ran them in
        found = _gate(masks[e], indices)
        if found is None:
            return None
        value, gate, nodes = found
        values.add(value)
        looped |= nodes
        products = [u for u in gate.users if u.target is aten.mul.Tensor and len(u.args) == 2
                    and any(a not in reached for a in u.args if isinstance(a, fx.Node))]
        if len(products) != 1 or len(gate.users) != 1:
            return None
        (product,) = products
        gated[e] = (product, next(a for a in product.args if a is not gate))
    if len(values) != 1:
        return None
    chain = _sum_chain([product for product, _ in gated.values()], position)
    if chain is None:
        raise PassError(_unsupported(path, gated[0][0], "expert outputs not added up in one "
                                                        "chain of adds"))
    adds, init = chain
    outputs = [output for _, output in gated.values()]
    tokens, weights, own = _experts(outputs, path, position)
    looped |= own | {product for product, _ in gated.values()} | set(adds[:-1])
    return _Layer(topk, indices, experts, "unrolled", tokens, adds[-1], expert_out=outputs[0],
                  routing=values.pop(), expert_weights=weights, init=init,
                  looped=frozenset(looped))


def _experts(outputs: list[fx.Node], path: str, position):
    """(tokens, each expert's parameters, every expert's nodes) for the experts' `outputs`:
    what each computes that the others do not, which must be the same ops on the same shared
    input (the tokens) with parameters of the same shapes."""
    common = set.intersection(*(_ancestors(o) | {o} for o in outputs))
    own = [sorted((_ancestors(o) | {o}) - common, key=position.get) for o in outputs]
    tokens = {a for nodes in own for n in nodes for a in n.all_input_nodes
              if a in common and a.op != "get_attr"}
    if len(tokens) != 1:
        raise PassError(_unsupported(path, outputs[0], f"experts that read {len(tokens)} "
                                                       f"shared values (one: the tokens)"))
    (tokens,) = tokens
    signatures, weights = zip(*(_signature(nodes, tokens) for nodes in own))
    shapes = [[tuple(tensor_of(w).shape) for w in params] for params in weights]
    if any(s != signatures[0] for s in signatures) or any(s != shapes[0] for s in shapes):
        raise PassError(_unsupported(path, outputs[0], "experts that do not all compute the "
                                                       "same ops on parameters of one shape"))
    return tokens, tuple(map(tuple, weights)), set().union(*map(set, own))


_MASK_CASTS = _SAME_VALUES | {aten.type_as.default}


def _gate(mask: fx.Node, indices: fx.Node):
    """(values, gate, nodes) for `sum(values * mask, -1)` (the mask possibly cast), else None."""
    nodes, node = {mask}, mask
    while len(node.users) == 1 and next(iter(node.users)).target in _MASK_CASTS:
        node = next(iter(node.users))
        nodes.add(node)
    if len(node.users) != 1:
        return None
    (product,) = node.users
    if product.target is not aten.mul.Tensor or len(product.args) != 2:
        return None
    value = next((a for a in product.args if a is not node), None)
    shape = tuple(tensor_of(indices).shape)
    if not isinstance(value, fx.Node) or tuple(tensor_of(value).shape) != shape:
        return None
    if len(product.users) != 1:
        return None
    (gate,) = product.users
    dims = gate.args[1] if len(gate.args) > 1 else None
    if gate.target is not aten.sum.dim_IntList or dims not in ([-1], [len(shape) - 1]) or not (
            len(gate.args) > 2 and gate.args[2]):
        return None
    return value, gate, nodes | {product, gate}


def _sum_chain(products: list[fx.Node], position) -> tuple[list[fx.Node], fx.Node | None] | None:
    """The adds that sum `products` one at a time, in one chain from the first product in
    graph order, and what the first add adds it to (None when it adds two products)."""
    current = min(products, key=position.get)
    remaining, adds, init = set(products) - {current}, [], None
    while remaining:
        if len(current.users) != 1:
            return None
        (add,) = current.users
        if add.target is not aten.add.Tensor or len(add.args) != 2 or add.kwargs:
            return None
        other = add.args[1] if add.args[0] is current else add.args[0]
        if other in remaining:
            remaining.discard(other)
        elif not adds:
            init = other  # the loop's zeros (or anything the products are added to)
        else:
            return None
        adds.append(add)
        current = add
    return adds, init


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def _signature(nodes: list[fx.Node], tokens: fx.Node) -> tuple[list, list[fx.Node]]:
    """One expert's ops as a comparable value (targets and arguments, nodes named by their
    place), and its parameters in the order the ops read them."""
    place, params, signature = {tokens: "tokens"}, [], []
    for node in nodes:
        if node.op == "get_attr":
            continue
        for a in node.all_input_nodes:
            if a.op == "get_attr" and a not in place:
                place[a] = f"w{len(params)}"
                params.append(a)
        place[node] = f"n{len(place)}"
        signature.append((str(node.target), str(fx.node.map_arg(
            (node.args, node.kwargs), lambda a: place.get(a, a.name)))))
    return signature, params


def _gemm_of_choice_rows(node: fx.Node, flat_indices: list[fx.Node]) -> bool:
    """A bmm with a weight picked per row by the flat indices (`W[indices]`)."""
    return node.target is aten.bmm.default and any(
        isinstance(a, fx.Node) and a.target is aten.index.Tensor
        and list(a.args[1]) and a.args[1][0] in flat_indices for a in node.args)


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


def _positions(graph: fx.Graph) -> dict[fx.Node, int]:
    return {node: i for i, node in enumerate(graph.nodes)}


def _unsupported(path: str, node: fx.Node, what: str | None = None) -> str:
    what = what or f"{node.target}"
    return (f"MoE layer {path}: its experts compute {what} ({node.name}), which the "
            f"expert-parallel pass cannot run per token: it runs experts whose GEMMs use stacked "
            f"(E, in, out) weights (einsum, Hugging Face's grouped_mm or batched_mm) with "
            f"elementwise ops between them. Set ep=1 for this model")


class LayerRewriter:
    """Builds one layer's sparse form before its exit and reroutes the exit's users."""

    def __init__(self, gm: fx.GraphModule, layer: _Layer, ep: int, rank: int, tp: int = 1,
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
        elif node.target in _ELEMENTWISE or node.target in _SPLITS or (
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
        parts = _einsum_parts(node)
        if parts is not None and len(parts[2]) == 2:
            (sub_a, sub_w), out, (a, w) = parts
            if not _is_stacked(w, experts):
                (sub_a, sub_w), (a, w) = (sub_w, sub_a), (w, a)
            if not _is_stacked(w, experts) or len(sub_w) != 3:
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
        if str(node.target) == _HF_GROUPED_MM:  # (rows, W (E, in, out) or W^T, offsets)
            source, weight = node.args[0], node.args[1]
            transposed = weight.target is aten.transpose.int and weight.op == "call_function"
            stacked = weight.args[0] if transposed else weight
            if not _is_stacked(stacked, experts):
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
                    and _is_stacked(picked.args[0], experts)):
                self.replaced.update({bmm, picked, column})
                return column.args[0], picked.args[0], True
            row, picked = bmm.args  # x.unsqueeze(1) (S, 1, in) @ W[ids] (S, in, out)
            if (picked.target is aten.index.Tensor and row.target is aten.unsqueeze.default
                    and _is_stacked(picked.args[0], experts)):
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
        if node.target in _SPLITS:
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
        return _unsupported(self.layer.path, node, what)

    # --- graph edits ------------------------------------------------------------------------
    def _call(self, target, args, kwargs=None) -> fx.Node:
        node = self.graph.call_function(target, args, kwargs or {})
        vals = fx.node.map_arg((args, kwargs or {}), lambda n: _on_meta(n.meta.get("val")))
        node.meta["val"] = target(*vals[0], **vals[1])
        return node

    def _erase_replaced(self, exit: fx.Node) -> None:
        """The model's own experts (and the routing values only they read), now unused."""
        position = _positions(self.graph)
        for node in sorted(self.replaced | {exit}, key=position.get, reverse=True):
            if not node.users and not node.is_impure():
                self.graph.erase_node(node)


def _ancestors_within(node: fx.Node, root: fx.Node) -> set[fx.Node]:
    """`node` and its ancestors that descend from `root` (a value computed from the indices)."""
    below = _descendants(root)
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


def _is_stacked(node: fx.Node, num_experts: int) -> bool:
    val = tensor_of(node)
    return (node.op == "get_attr" and val is not None and val.dim() == 3
            and val.shape[0] == num_experts)
