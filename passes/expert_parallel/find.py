"""Find MoE layers by their dataflow (dispatch.py rewrites each into token dispatch).

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
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from core.fx_utils import module_path, tensor_of
from passes import PassError
from passes.propagation.table import BINARY, UNARY, aten_ops

aten = torch.ops.aten
ELEMENTWISE = frozenset(aten_ops(UNARY) + aten_ops(BINARY))
SPLITS = frozenset({aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default})
HF_GROUPED_MM = "transformers.grouped_mm_fallback.default"
"""Hugging Face's opaque grouped GEMM (rows sorted by expert, per-expert end offsets)."""


@dataclass
class Layer:
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


def find_layers(gm: fx.GraphModule) -> list[Layer]:
    layers = []
    position = positions(gm.graph)
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
    position = positions(graph)
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


def _dense_layer(topk, indices, experts, position) -> Layer | None:
    """The first einsum downstream of the indices that contracts an expert dim between a value
    they reach (the routing weights) and one they do not (the experts' outputs)."""
    reached = descendants(indices)
    for node in sorted(reached, key=position.get):
        parts = einsum_parts(node)
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
            return Layer(topk, indices, experts, "dense", tokens, node, expert_out=outputs,
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
        parts = einsum_parts(node)
        if parts is not None and len(parts[2]) == 2:
            (sub_a, sub_b), _, (a, b) = parts
            if is_stacked(b, experts) and sub_b[0] not in sub_a:
                found.add(a)
                continue
            if is_stacked(a, experts) and sub_a[0] not in sub_b:
                found.add(b)
                continue
        stack.extend(node.all_input_nodes)
    if len(found) != 1:
        what = ("no GEMM of the tokens with a stacked (E, in, out) expert weight" if not found
                else f"GEMMs of {len(found)} different token tensors")
        raise PassError(unsupported(module_path(topk) or topk.name, expert_out, what))
    return found.pop()


def _row_layer(topk, outputs, experts, position) -> Layer | None:
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
    weighted = set().union(*(descendants(v) for v in outputs.values() if v is not indices)) \
        if len(outputs) > 1 else set()
    reached = descendants(entry)
    for node in sorted(reached, key=position.get):
        if node.target is aten.mul.Tensor and len(node.args) == 2:
            a, b = node.args
            if a in reached and b in weighted and b not in reached:
                return Layer(topk, indices, experts, form, tokens, a, entry=entry, order=order)
            if b in reached and a in weighted and a not in reached:
                return Layer(topk, indices, experts, form, tokens, b, entry=entry, order=order)
    return None


def _unrolled_layer(topk, indices, experts, position) -> Layer | None:
    """A loop over a ModuleList of experts: for each expert e a mask `indices == e`, a gate
    `sum(values * mask, -1)` (values shaped like the indices, so the gate is zero unless e is
    among the token's top-k, where it is that choice's value), the gate times the expert's
    output, and the products added up in one chain."""
    masks = {u.args[1]: u for u in indices.users
             if u.target is aten.eq.Scalar and isinstance(u.args[1], int)}
    if sorted(masks) != list(range(experts)):
        return None
    path = module_path(topk) or topk.name
    reached = descendants(indices)
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
        raise PassError(unsupported(path, gated[0][0], "expert outputs not added up in one "
                                                        "chain of adds"))
    adds, init = chain
    outputs = [output for _, output in gated.values()]
    tokens, weights, own = _experts(outputs, path, position)
    looped |= own | {product for product, _ in gated.values()} | set(adds[:-1])
    return Layer(topk, indices, experts, "unrolled", tokens, adds[-1], expert_out=outputs[0],
                  routing=values.pop(), expert_weights=weights, init=init,
                  looped=frozenset(looped))


def _experts(outputs: list[fx.Node], path: str, position):
    """(tokens, each expert's parameters, every expert's nodes) for the experts' `outputs`:
    what each computes that the others do not, which must be the same ops on the same shared
    input (the tokens) with parameters of the same shapes."""
    common = set.intersection(*(ancestors(o) | {o} for o in outputs))
    own = [sorted((ancestors(o) | {o}) - common, key=position.get) for o in outputs]
    tokens = {a for nodes in own for n in nodes for a in n.all_input_nodes
              if a in common and a.op != "get_attr"}
    if len(tokens) != 1:
        raise PassError(unsupported(path, outputs[0], f"experts that read {len(tokens)} "
                                                       f"shared values (one: the tokens)"))
    (tokens,) = tokens
    signatures, weights = zip(*(_signature(nodes, tokens) for nodes in own))
    shapes = [[tuple(tensor_of(w).shape) for w in params] for params in weights]
    if any(s != signatures[0] for s in signatures) or any(s != shapes[0] for s in shapes):
        raise PassError(unsupported(path, outputs[0], "experts that do not all compute the "
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


def ancestors(node: fx.Node) -> set[fx.Node]:
    return _reachable(node, lambda n: n.all_input_nodes)


def descendants(node: fx.Node) -> set[fx.Node]:
    return _reachable(node, lambda n: n.users)


def _reachable(node: fx.Node, neighbours) -> set[fx.Node]:
    """Every node reached from `node` (not itself) by following `neighbours`."""
    seen, stack = set(), [node]
    while stack:
        for n in neighbours(stack.pop()):
            if n not in seen:
                seen.add(n)
                stack.append(n)
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




def einsum_parts(node: fx.Node) -> tuple[list[str], str, list[fx.Node]] | None:
    if node.target is not aten.einsum.default:
        return None
    equation, operands = node.args[0], list(node.args[1])
    inputs, _, output = equation.replace(" ", "").partition("->")
    if "." in equation or not output:
        return None
    return inputs.split(","), output, operands


def positions(graph: fx.Graph) -> dict[fx.Node, int]:
    return {node: i for i, node in enumerate(graph.nodes)}


def unsupported(path: str, node: fx.Node, what: str | None = None) -> str:
    what = what or f"{node.target}"
    return (f"MoE layer {path}: its experts compute {what} ({node.name}), which the "
            f"expert-parallel pass cannot run per token: it runs experts whose GEMMs use stacked "
            f"(E, in, out) weights (einsum, Hugging Face's grouped_mm or batched_mm) with "
            f"elementwise ops between them. Set ep=1 for this model")


def is_stacked(node: fx.Node, num_experts: int) -> bool:
    val = tensor_of(node)
    return (node.op == "get_attr" and val is not None and val.dim() == 3
            and val.shape[0] == num_experts)
