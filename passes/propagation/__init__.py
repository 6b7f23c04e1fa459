"""Sharding propagation: one table of how each op carries a sharded dimension, shared by every
pass that shards values (tensor, sequence, context and expert parallelism, the loss path).

The question the table answers is the one DTensor's op strategies and XLA's sharding
propagation answer: *this value is sharded along dim d; along which dim is the op's output
sharded, or does the op not carry it?* `carry(node, dims)` asks it for one node
(`passes.propagation.table` holds the rules, one per op family); `propagate` asks it over a
graph, in order, from seed values, collecting where and why the sharding stops. A pass adds its
own knowledge on top (tensor parallelism: which constants count heads and become local counts;
sequence parallelism: which dims are tokens) without writing the dimension rules again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from torch import fx

from passes.propagation.table import TABLE, NotCarried, aten_ops, tensor_shape

__all__ = ["NotCarried", "Propagation", "aten_ops", "carry", "propagate", "supports",
           "tensor_shape"]

Dims = Mapping[fx.Node, "int | tuple[int, ...]"]


def supports(node: fx.Node) -> bool:
    """Whether the table has a rule for `node`'s op."""
    return node.op == "call_function" and node.target in TABLE


def carry(node: fx.Node, dims: Dims) -> "int | tuple[int, ...] | None":
    """The dim of `node`'s output that carries the sharding of its inputs `dims` (input node ->
    the dim it is sharded along; a tuple per output for multi-output inputs): a tuple for
    multi-output ops, None when the output is not sharded. Raises NotCarried with the reason
    when the op reduces, mixes or cuts the sharded dim, or has no rule."""
    if not supports(node):
        what = node.target if node.op == "call_function" else node.op
        raise NotCarried(f"no propagation rule for {what}")
    return TABLE[node.target](node, {a: d for a, d in dims.items() if a in node.all_input_nodes})


@dataclass
class Propagation:
    """Where a sharding reached: node -> its sharding, node -> why it stopped there, and the
    nodes downstream of a stop (or of a blocked seed), left alone."""

    dims: dict[fx.Node, object] = field(default_factory=dict)
    stopped: dict[fx.Node, NotCarried] = field(default_factory=dict)
    blocked: set[fx.Node] = field(default_factory=set)


Rule = Callable[[fx.Node, Mapping[fx.Node, object]], object]


def propagate(nodes: Iterable[fx.Node], seeds: Mapping[fx.Node, object],
              rule: Rule | None = None, blocked: Iterable[fx.Node] = ()) -> Propagation:
    """Forward from `seeds` (value -> its sharding) through `nodes` in the order given (graph
    order): each node reading a sharded value gets `rule(node, shardings so far)`, by default
    `carry` (a pass may pass its own rule, which adds to `carry`). A node whose rule raises
    NotCarried is recorded with the reason, and the nodes downstream of it are left alone
    (one reason per broken path, not one per node after it), as are those downstream of
    `blocked` (seeds that could not be sharded). Nodes reading no sharded value are skipped;
    a rule returning None leaves its node unsharded."""
    rule = rule or carry
    out = Propagation(dims=dict(seeds), blocked=set(blocked))
    blocked = out.blocked
    for node in nodes:
        if node in out.dims:
            continue
        inputs = node.all_input_nodes
        if blocked.intersection(inputs) or out.stopped.keys() & set(inputs):
            blocked.add(node)
            continue
        if not any(a in out.dims for a in inputs):
            continue
        try:
            result = rule(node, out.dims)
        except NotCarried as why:
            out.stopped[node] = why
            continue
        if result is not None:
            out.dims[node] = result
    return out
