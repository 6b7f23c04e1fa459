"""Fold attention masks that are exactly causal into SDPA's `is_causal=True`.

Hugging Face models build their causal mask from tensor ops (aranges, comparisons, a cumsum
that detects packed sequences). Eager SDPA skips it and runs `is_causal=True`, but torch.export
traces it, so the captured graph hands SDPA a materialized (batch, 1, q, k) mask: no flash
kernel (ours or torch's), the mask rebuilt every step, and one more tensor crossing pipeline
stages. When a mask depends on no model input, parameter or buffer (only constants and shapes),
this pass evaluates it once on CPU; if it is the causal mask (keys up to the query's position,
square), the call gets no mask and `is_causal=True`, and the mask's ops, unused now, go away.
A mask built from an input (padding, documents) is left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import fx

from core import meta
from passes import PassContext, recompile

log = logging.getLogger(__name__)

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
              "enable_gqa")
MAX_EVALUATED = 1 << 26
"""Largest mask (elements) evaluated at compile time; bigger ones are kept as they are."""


@dataclass(frozen=True)
class CausalMaskRecord:
    attention_calls: int
    """SDPA calls in the graph."""
    folded_calls: int
    """Calls that now run `is_causal=True` without a mask."""
    folded_masks: int
    """Distinct constant causal masks removed from the graph."""
    kept_masks: int
    """Masks left as they are (built from an input, or not causal)."""

    def summary(self) -> str:
        if not self.folded_masks and not self.kept_masks:
            return f"no attention mask to fold ({self.attention_calls} attention calls)"
        return (f"{self.folded_masks} constant causal mask(s) folded: {self.folded_calls} of "
                f"{self.attention_calls} attention calls run is_causal; {self.kept_masks} "
                f"mask(s) kept")


def fold_causal_masks(gm: fx.GraphModule, ctx: PassContext | None = None) -> fx.GraphModule:
    """Give SDPA `is_causal=True` in place of every constant mask that is causal."""
    folded: dict[fx.Node, bool] = {}  # mask node -> is it causal (evaluated once, shared)
    calls = folded_calls = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _SDPA:
            continue
        calls += 1
        call = dict(zip(_SDPA_ARGS, node.args)) | dict(node.kwargs)
        mask = call.get("attn_mask")
        if not isinstance(mask, fx.Node) or call.get("is_causal"):
            continue
        if mask not in folded:
            folded[mask] = _is_causal(mask, node)
        if folded[mask]:
            folded_calls += 1
            call.update(attn_mask=None, is_causal=True)
            node.args = (call.pop("query"), call.pop("key"), call.pop("value"))
            node.kwargs = {k: v for k, v in call.items() if k != "attn_mask"}
    for mask, causal in folded.items():
        if causal:
            _erase_unused(gm.graph, mask)
    causal = sum(folded.values())
    gm.meta[meta.CAUSAL_MASK_RECORD] = CausalMaskRecord(calls, folded_calls, causal,
                                                        len(folded) - causal)
    if folded_calls:  # (a graph this pass did not change keeps its code)
        gm.graph.lint()
        recompile(gm)
    return gm


def _constant_ancestors(mask: fx.Node) -> list[fx.Node] | None:
    """The ops `mask` is computed from, in graph order, if none reads an input or a tensor."""
    seen, todo = set(), [mask]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        if node.op != "call_function":
            return None  # a placeholder (input) or a get_attr (parameter, buffer, constant)
        seen.add(node)
        todo.extend(node.all_input_nodes)
    order = {node: i for i, node in enumerate(mask.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _on_cpu(value):
    if isinstance(value, torch.device):
        return torch.device("cpu")
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


def _is_causal(mask: fx.Node, sdpa: fx.Node) -> bool:
    ancestors = _constant_ancestors(mask)
    shape = getattr(mask.meta.get("val"), "shape", None)
    q, k = (getattr(n.meta.get("val"), "shape", None) for n in sdpa.args[:2])
    if ancestors is None or shape is None or q is None or k is None or q[-2] != k[-2] \
            or shape.numel() > MAX_EVALUATED:
        return False
    values: dict[fx.Node, object] = {}
    try:
        for node in ancestors:
            args = fx.node.map_arg(node.args, values.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, values.__getitem__)
            values[node] = node.target(*_on_cpu(args), **{k: _on_cpu(v)
                                                            for k, v in kwargs.items()})
    except Exception as error:  # noqa: BLE001 - an op we cannot replay: keep the mask
        log.info("causal_mask: cannot evaluate %s (%s: %s)", mask.name, type(error).__name__,
                 error)
        return False
    value = values[mask]
    causal = torch.ones(q[-2], k[-2], dtype=torch.bool).tril()
    if value.dtype == torch.bool:
        allowed = value
    elif value.is_floating_point():
        blocked = (value == float("-inf")) | (value == torch.finfo(value.dtype).min)
        if not bool(((value == 0) | blocked).all()):
            return False  # a bias, not a mask
        allowed = value == 0
    else:
        return False
    try:
        return bool((allowed == causal).all())  # broadcast over batch and heads
    except RuntimeError:
        return False


def _erase_unused(graph: fx.Graph, mask: fx.Node) -> None:
    """Drop `mask` and the ops only it needed, now that nothing reads it."""
    todo, erased = [mask], set()
    while todo:
        node = todo.pop()
        if node in erased or node.users or node.op != "call_function":
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erased.add(node)
        todo.extend(inputs)
