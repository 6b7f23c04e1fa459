"""Point the graph's hot ops at the runtime's kernel dispatch (runtime/kernels/dispatch.py).

A table of rules, one per op; each callback returns the replacement (target, args, kwargs) or
None when it does not apply. The replacements run Triton on CUDA 16/32-bit tensors and the
original aten op otherwise, so this pass changes no numbers on CPU.
"""

from __future__ import annotations

import torch
from torch import fx

from runtime.kernels import dispatch

aten = torch.ops.aten


def _attention(node: fx.Node):
    return dispatch.scaled_dot_product_attention, node.args, node.kwargs  # same signature


def _layer_norm(node: fx.Node):
    return dispatch.aten_layer_norm, node.args, node.kwargs


def _swiglu(node: fx.Node):
    """mul(silu(gate), up) -> silu_mul(gate, up), when the silu feeds only this mul."""
    if node.kwargs or len(node.args) != 2:
        return None
    first, second = node.args
    for silu, up in ((first, second), (second, first)):
        if (isinstance(silu, fx.Node) and silu.target is aten.silu.default
                and len(silu.users) == 1 and isinstance(up, fx.Node)):
            return dispatch.silu_mul, (silu.args[0], up), {}
    return None


RULES = {
    aten.scaled_dot_product_attention.default: _attention,  # sdpa -> flash attention
    aten.layer_norm.default: _layer_norm,                    # layer_norm -> fused layer norm
    aten.mul.Tensor: _swiglu,                                # silu(g) * u -> fused swiglu
}


def use_kernels(gm: fx.GraphModule) -> fx.GraphModule:
    for module in gm.modules():  # checkpointed regions are graphs of their own
        if isinstance(module, fx.GraphModule):
            _rewrite(module)
    return gm


def _rewrite(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        rule = RULES.get(node.target) if node.op == "call_function" else None
        replacement = rule(node) if rule else None
        if replacement is None:
            continue
        node.target, node.args, node.kwargs = replacement
        node.meta["kernel"] = node.target.__name__
    gm.graph.eliminate_dead_code()  # the silu nodes folded into silu_mul
    gm.graph.lint()
    gm.recompile()
