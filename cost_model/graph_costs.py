"""Per-node FLOPs and bytes of a captured aten graph (for the pipeline cut and reports).

`node_cost(node)` reads the op (`node.target`) and the FakeTensor shapes in `node.meta["val"]`
that capture leaves on every node; `graph_cost(gm)` sums them. Backward is costed as the
conventional 2x forward for matmuls and a per-op ratio for memory-bound kernels; views cost 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_VIEWS = {"view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "unsqueeze",
          "squeeze", "slice", "select", "split", "split_with_sizes", "chunk", "unbind",
          "as_strided", "alias", "detach", "contiguous", "clone_view", "lift_fresh_copy",
          "sym_size", "getitem", "_to_copy_view", "unflatten", "flatten", "view_as", "expand_as",
          "narrow"}
_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "einsum"}
_NORMS = {"native_layer_norm", "layer_norm", "rms_norm", "_fused_rms_norm", "native_group_norm",
          "group_norm", "batch_norm", "_native_batch_norm_legit_no_training"}
_ATTENTION = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention"}
_EMBEDDING = {"embedding"}


@dataclass(frozen=True)
class NodeCost:
    fwd_flops: float = 0.0
    bwd_flops: float = 0.0
    bytes: float = 0.0
    """Bytes read plus written by the forward kernel."""
    saved_bytes: float = 0.0
    """Activation bytes this node's output keeps alive for backward (upper bound)."""

    def __add__(self, other: "NodeCost") -> "NodeCost":
        return NodeCost(self.fwd_flops + other.fwd_flops, self.bwd_flops + other.bwd_flops,
                        self.bytes + other.bytes, self.saved_bytes + other.saved_bytes)


def _op_name(target) -> str:
    name = getattr(target, "__name__", None) or str(target)
    # aten.mm.default -> "mm.default" ; strip the overload
    packet = getattr(target, "_overloadpacket", None)
    if packet is not None:
        name = getattr(packet, "__name__", name)
    return name.split(".")[0].lstrip("_") if name.startswith("_") and name.lstrip("_") in (
        _MATMULS | _NORMS) else name.split(".")[0]


def _tensors(value) -> list:
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return [value] if hasattr(value, "shape") and hasattr(value, "dtype") else []


def _nbytes(t) -> float:
    try:
        return float(math.prod(int(s) for s in t.shape) * t.element_size())
    except (TypeError, ValueError, RuntimeError):
        return 0.0


def _numel(t) -> float:
    return float(math.prod(int(s) for s in t.shape))


def _val(arg):
    meta = getattr(arg, "meta", None)
    return meta.get("val") if meta else None


def node_cost(node) -> NodeCost:
    """FLOPs/bytes of one fx node from its aten target and FakeTensor shapes."""
    if node.op != "call_function":
        return NodeCost()
    name = _op_name(node.target)
    outs = _tensors(node.meta.get("val"))
    if not outs or name in _VIEWS:
        return NodeCost()
    ins = [t for a in node.args for t in _tensors(_val(a) if hasattr(a, "meta") else
                                                   [_val(x) for x in a] if isinstance(a, (list, tuple)) else None)]
    ins = [t for t in ins if t is not None]
    out_bytes = sum(_nbytes(t) for t in outs)
    in_bytes = sum(_nbytes(t) for t in ins)
    traffic = out_bytes + in_bytes
    out = outs[0]
    if name in _MATMULS:
        # FLOPs = 2 x (output elements) x (contraction length)
        if name == "einsum":
            k = _einsum_contraction(node)
        elif name in ("linear",):
            k = int(ins[0].shape[-1])
        elif name in ("addmm", "baddbmm"):
            k = int(ins[1].shape[-1])
        else:
            k = int(ins[0].shape[-1])
        flops = 2.0 * _numel(out) * k
        return NodeCost(flops, 2 * flops, traffic, in_bytes)
    if name in _ATTENTION:
        q, kk = ins[0], ins[1]
        *batch, sq, d = (int(s) for s in q.shape)
        sk = int(kk.shape[-2])
        flops = 4.0 * math.prod(batch) * sq * sk * d
        return NodeCost(flops, 2.5 * flops, traffic, in_bytes + out_bytes)
    if name in _NORMS:
        n = _numel(out)
        return NodeCost(5 * n, 8 * n, traffic, _nbytes(ins[0]) if ins else 0.0)
    if name in _EMBEDDING:
        return NodeCost(0.0, _numel(out), 2 * out_bytes, 0.0)
    # elementwise / reductions / softmax: one FLOP per output element, memory bound
    n = _numel(out)
    return NodeCost(n, 2 * n, traffic, in_bytes)


def _einsum_contraction(node) -> int:
    eq = node.args[0]
    operands = node.args[1]
    lhs, _, rhs = eq.replace(" ", "").partition("->")
    sizes = {}
    for spec, arg in zip(lhs.split(","), operands, strict=True):
        v = _val(arg)
        if v is None:
            continue
        for ch, s in zip(spec, v.shape, strict=False):
            sizes[ch] = int(s)
    k = 1
    for ch, s in sizes.items():
        if ch not in rhs:
            k *= s
    return k


def graph_cost(gm) -> NodeCost:
    """The sum over a GraphModule's (or Graph's) nodes."""
    graph = getattr(gm, "graph", gm)
    total = NodeCost()
    for node in graph.nodes:
        total = total + node_cost(node)
    return total
