"""One stage's backward in two steps, for the zero-bubble schedules: the input gradients now
(what the stage before waits for), the weight gradients later (what nobody else waits for).

Autograd's engine computes a node's outputs only along edges that lead to the requested
inputs, so `backward(outputs, inputs=stage_inputs)` runs just the input-gradient part of the
graph: at a node that feeds both (a matmul's backward: dX and dW) only dX is computed. The
graph is kept; the gradient arriving at each such node is captured on the way (a pre-hook).
The weight step then restarts the engine at those nodes with the captured gradients and the
weights as inputs, so it runs only the weight-gradient part (dW) and accumulates into `.grad`
exactly as one `backward()` would. torch.distributed.pipelining's `stage_backward_input` /
`stage_backward_weight` do the same; this is our own, on public autograd APIs only
(GradientEdge outputs, node pre-hooks; torch >= 2.7).

Terms, over the stage's autograd graph:
- input side: nodes from which a stage input's gradient accumulator is reachable; the input
  step runs exactly these.
- weight side: nodes that reach some weight but no input; the weight step runs these.
- boundary: an input-side node with a child on the weight side. Its captured gradient is
  complete after the input step (every parent of an input-side node is input-side).
The weight step runs once per group of boundaries that reach a common weight (so one call never
follows an input-side edge to a weight another call also reaches); inside a group, a boundary
reachable from another through the input side (a weight used twice in the stage) would receive
a second, partial gradient there, so each boundary's pre-hook replaces what arrives with what
was captured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge


@dataclass
class WeightStep:
    """The weight-gradient step of one stage backward, ready to run once."""

    groups: list[tuple[list[GradientEdge], list[torch.Tensor], list[torch.Tensor]]] = \
        field(default_factory=list)
    """(roots, their gradients, the weights they reach) per group of boundaries."""
    captured: dict[Node, tuple] = field(default_factory=dict)
    """Boundary node -> the gradients that reached it in the input step."""

    def run(self) -> None:
        """Accumulate every weight's gradient into its `.grad`, then free the graph."""
        for roots, grads, weights in self.groups:
            handles = [edge.node.register_prehook(_replace_with(self.captured[edge.node]))
                       for edge in roots if edge.node in self.captured]
            try:
                torch.autograd.backward(roots, grads, inputs=weights, retain_graph=True)
            finally:
                for handle in handles:
                    handle.remove()
        self.groups, self.captured = [], {}


def _replace_with(grads: tuple):
    return lambda _arriving: grads


def backward_input(outputs: list[torch.Tensor], grads: list[torch.Tensor | None],
                   inputs: list[torch.Tensor]) -> WeightStep:
    """Accumulate the gradients of `inputs` (leaves) into their `.grad` from `outputs` with
    output gradients `grads` (None for a scalar loss); return the step that later accumulates
    every other leaf's (the weights') gradient."""
    roots = [get_gradient_edge(t) for t in outputs]
    order = _nodes_parents_first([edge.node for edge in roots])
    input_nodes = {get_gradient_edge(x).node for x in inputs}
    reaches_input: dict[Node, bool] = {}
    reaches_weight: dict[Node, bool] = {}
    for node in reversed(order):  # children before parents
        children = _children(node)
        is_weight = (node not in input_nodes and hasattr(node, "variable")
                     and node.variable.requires_grad)
        reaches_input[node] = node in input_nodes or any(reaches_input[c] for c in children)
        reaches_weight[node] = is_weight or any(reaches_weight[c] for c in children)

    def weight_side(node: Node) -> bool:
        return reaches_weight[node] and not reaches_input[node]

    boundaries = [n for n in order if reaches_input[n]
                  and any(weight_side(c) for c in _children(n))]
    step = WeightStep()
    handles = [n.register_prehook(_capture_into(step.captured, n)) for n in boundaries]
    try:
        reached = [x for x in inputs if reaches_input.get(get_gradient_edge(x).node)]
        if reached:
            torch.autograd.backward(outputs, grads, inputs=reached, retain_graph=True)
    finally:
        for handle in handles:
            handle.remove()

    # groups: union-find over the weight side, joined to the boundaries above it
    parent: dict[Node, Node] = {}

    def find(n: Node) -> Node:
        while parent.setdefault(n, n) is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for node in order:
        if weight_side(node) or node in step.captured:
            find(node)
            for child in _children(node):
                if weight_side(child):
                    parent[find(child)] = find(node)
    members: dict[Node, tuple[list, list, list]] = {}
    for node in order:
        if node not in parent:
            continue
        roots_, grads_, weights_ = members.setdefault(find(node), ([], [], []))
        if hasattr(node, "variable") and weight_side(node):
            weights_.append(node.variable)
        for index, grad in enumerate(step.captured.get(node, ())):
            if grad is not None:
                roots_.append(GradientEdge(node, index))
                grads_.append(grad)
    for edge, tensor, grad in zip(roots, outputs, grads, strict=True):
        if weight_side(edge.node):  # an output only the weights lead to: its own gradient
            roots_, grads_, _ = members[find(edge.node)]
            roots_.append(edge)
            grads_.append(torch.ones_like(tensor) if grad is None else grad)
    step.groups = [group for group in members.values() if group[0] and group[2]]
    return step


def _capture_into(captured: dict, node: Node):
    def hook(grad_outputs):
        captured[node] = tuple(grad_outputs)
    return hook


def _children(node: Node) -> list[Node]:
    return [child for child, _ in node.next_functions if child is not None]


def _nodes_parents_first(roots: list[Node]) -> list[Node]:
    """Every node reachable from `roots`, each after all of its parents (a topological order
    of the backward graph, iterative: graphs have thousands of nodes)."""
    seen: set[Node] = set()
    postorder: list[Node] = []
    for root in roots:
        if root in seen:
            continue
        seen.add(root)
        stack = [(root, iter(_children(root)))]
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                postorder.append(node)
            elif child not in seen:
                seen.add(child)
                stack.append((child, iter(_children(child))))
    return postorder[::-1]
