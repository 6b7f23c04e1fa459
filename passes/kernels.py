"""Point the graph's hot ops at the kernel ops of `core.ops` (implemented by the runtime's
kernel dispatch, runtime/kernels/dispatch.py).

A table of rules, one per op; each callback returns the replacement (target, args, kwargs) or
None when it does not apply. The replacements run Triton on CUDA 16/32-bit tensors and the
original aten ops otherwise, so this pass changes no numbers on CPU.

Patterns of several nodes are matched at their last node and fold only intermediates that have
no other users (a value used elsewhere must stay in the graph); dead-code elimination then drops
the folded nodes.
"""

from __future__ import annotations

import torch
from torch import fx

from core import ops
from core.fx_utils import erase_unread
from passes import recompile

aten = torch.ops.aten


def _attention(node: fx.Node):
    return ops.scaled_dot_product_attention, node.args, node.kwargs  # same signature


def _layer_norm(node: fx.Node):
    return ops.layer_norm, node.args, node.kwargs


def _swiglu(node: fx.Node):
    """mul(silu(gate), up) -> silu_mul(gate, up), when the silu feeds only this mul."""
    if node.kwargs or len(node.args) != 2:
        return None
    first, second = node.args
    for silu, up in ((first, second), (second, first)):
        if (isinstance(silu, fx.Node) and silu.target is aten.silu.default
                and len(silu.users) == 1 and isinstance(up, fx.Node)):
            return ops.silu_mul, (silu.args[0], up), {}
    return None


def _rms_norm(node: fx.Node):
    """RMSNorm as models write it by hand, matched at its last node:
    `h = x.to(dt)`, `y = h * rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)`, `y.to(dt2) * w`,
    either cast and the weight optional (HF LlamaRMSNorm, partitioner.models.RMSNorm)."""
    weight, y = _rms_weight(node)
    if y is None:  # no weight: `node` itself must be the normalizing mul, and the end
        if any(_rms_weight(user)[1] is node or _cast_of(user) is node for user in node.users):
            return None  # the pattern goes on: match it at its last node
        y = node
    output_dtype, core = None, y
    if _cast_of(y) is not None:  # y = core.to(dt2), the weight mul its only reader
        output_dtype, core = y.args[1], _cast_of(y)
    parts = _rms_core(core)
    if parts is None:
        return None
    x, eps = parts
    compute_dtype = None
    source = _cast_of(x)
    if source is not None and len(x.users) == 2:  # only the pow and the mul read the cast
        x, compute_dtype = source, x.args[1]
    return ops.rms_norm, (x, weight, eps), {
        "compute_dtype": compute_dtype, "output_dtype": output_dtype}


def _rms_weight(node: fx.Node):
    """(weight, y) when `node` is y * weight or weight * y with y the normalized value (the core
    mul or its cast) used only here; (None, None) otherwise."""
    if node.target is not aten.mul.Tensor or node.kwargs or len(node.args) != 2:
        return None, None
    first, second = node.args
    for y, weight in ((first, second), (second, first)):
        if not (isinstance(y, fx.Node) and isinstance(weight, fx.Node)) or len(y.users) != 1:
            continue
        core = _cast_of(y) or y
        if _rms_core(core) is not None and (core is y or len(core.users) == 1):
            return weight, y
    return None, None


def _cast_of(node) -> fx.Node | None:
    """The tensor `node` casts with `.to(dtype)`, or None."""
    if (isinstance(node, fx.Node) and node.target is aten.to.dtype and not node.kwargs
            and len(node.args) == 2 and isinstance(node.args[0], fx.Node)):
        return node.args[0]
    return None


def _rms_core(node: fx.Node):
    """(h, eps) when `node` is h * rsqrt(mean(h^2, -1, keepdim) + eps) whose pow, mean, add and
    rsqrt have no other users; None otherwise."""
    if node.target is not aten.mul.Tensor or node.kwargs or len(node.args) != 2:
        return None
    for h, rsqrt in (node.args, node.args[::-1]):
        add = _only_input(rsqrt, aten.rsqrt.default)
        mean = _only_input(add, aten.add.Tensor)
        power = _only_input(mean, aten.mean.dim)
        base = _only_input(power, aten.pow.Tensor_Scalar)
        if base is None or base is not h:
            continue
        eps, exponent = add.args[1], power.args[1]
        dims, keepdim = mean.args[1], mean.args[2] if len(mean.args) > 2 else False
        last = _last_dim(h)
        last_dims = ([-1], [last]) if last is not None else ([-1],)
        if (isinstance(eps, (int, float)) and exponent == 2 and keepdim is True
                and not mean.kwargs and not add.kwargs and list(dims) in last_dims):
            return h, eps
    return None


def _only_input(node, target):
    """The first argument of `node` when `node` is a call of `target` used by one node."""
    if (isinstance(node, fx.Node) and node.target is target and len(node.users) == 1
            and node.args and isinstance(node.args[0], fx.Node)):
        return node.args[0]
    return None


def _last_dim(node: fx.Node) -> int | None:
    """Index of the last dimension of `node`'s value, from its FakeTensor, if recorded."""
    value = node.meta.get("val")
    return value.dim() - 1 if isinstance(value, torch.Tensor) else None


RULES = (
    (aten.scaled_dot_product_attention.default, _attention),  # sdpa -> flash attention
    (aten.layer_norm.default, _layer_norm),                    # layer_norm -> fused layer norm
    (aten.mul.Tensor, _swiglu),                                # silu(g) * u -> fused swiglu
    (aten.mul.Tensor, _rms_norm),        # x * rsqrt(mean(x^2) + eps) * w -> fused rms norm
)


# What inductor does not generate itself (compile=on): attention with its log-sum-exp. Norms
# and swiglu stay aten ops there, which inductor fuses with their neighbours (an opaque kernel
# op would cut the fusion).
COMPILED_RULES = RULES[:1]


def use_kernels(gm: fx.GraphModule, compiled: bool = False) -> fx.GraphModule:
    """Point hot ops at runtime kernels; `compiled` (inductor compiles the graph) keeps only
    the kernels inductor does not generate."""
    rules = COMPILED_RULES if compiled else RULES
    for module in gm.modules():  # checkpointed regions are graphs of their own
        if isinstance(module, fx.GraphModule):
            _rewrite(module, rules)
    return gm


def _rewrite(gm: fx.GraphModule, rules) -> None:
    rewritten, bypassed = 0, []  # inputs of rewritten nodes: those only they read are dead
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        replacement = None
        for target, rule in rules:  # the first rule of this op that applies
            if node.target is target:
                replacement = rule(node)
                if replacement is not None:
                    break
        if replacement is None:
            continue
        rewritten += 1
        bypassed += node.all_input_nodes
        node.target, node.args, node.kwargs = replacement
        node.meta["kernel"] = node.target._opname
    if not rewritten:  # (a graph this pass did not change keeps its code)
        return
    erase_unread(gm.graph, bypassed)  # the nodes folded into silu_mul and rms_norm
    gm.graph.lint()
    recompile(gm)
