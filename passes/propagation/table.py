"""The table: how each aten op family carries a sharded dimension from its inputs to its output.

A rule is `rule(node, dims) -> out`: `dims` maps the node's sharded tensor inputs to the tensor
dimension each is sharded along (a tuple of dims for a multi-output input); `out` is the output
dimension that carries the sharding (a tuple for multi-output ops, None when the output is not
sharded at all), or the rule raises `NotCarried` with the reason (the op reduces, mixes, slices
or splits the sharded dimension). Shapes come from the FakeTensors capture recorded
(`node.meta["val"]`). Rules know nothing about meshes, ranks or sizes of groups: whether a
dimension also *divides* is the caller's question (tensor parallelism's head counts, sequence
parallelism's token counts).
"""

from __future__ import annotations

import math
import operator

import torch
from torch import fx

from core.fx_utils import norm_dim, tensor_of

aten = torch.ops.aten


class NotCarried(Exception):
    """The op does not carry the sharded dimension through; the message says why."""


def tensor_shape(node) -> tuple[int, ...]:
    """`node`'s tensor shape as ints (a multi-output node's first), or NotCarried when it
    carries no tensor."""
    val = tensor_of(node)
    if val is None:
        raise NotCarried(f"{getattr(node, 'name', node)} has no tensor shape in meta['val']")
    return tuple(int(s) for s in val.shape)


def _arg(node: fx.Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _tensors(node: fx.Node) -> list[fx.Node]:
    """The positional tensor operands (what broadcasting lines up)."""
    return [a for a in node.args if isinstance(a, fx.Node) and tensor_of(a) is not None]


# --- one rule per op family ---------------------------------------------------------------------

def elementwise(node, dims):
    """An op of one tensor (activations, casts, copies, scalar arithmetic): its first operand's
    sharding passes through; other operands (type_as's) do not shard the output."""
    return dims.get(node.args[0])


def broadcasting(node, dims):
    """Elementwise ops of several tensors, right-aligned: every sharded operand lines up on one
    output dim, which every unsharded operand broadcasts over (size 1 or absent)."""
    out_ndim = len(tensor_shape(node))
    tensors = _tensors(node)
    aligned = {dims[a] + out_ndim - len(tensor_shape(a)) for a in tensors if a in dims}
    if len(aligned) != 1:
        raise NotCarried("operands sharded along different dimensions")
    (dim,) = aligned
    for a in tensors:
        pos = dim - (out_ndim - len(tensor_shape(a)))
        if a not in dims and pos >= 0 and tensor_shape(a)[pos] != 1:
            raise NotCarried(f"unsharded operand {a.name} {tensor_shape(a)} spans the sharded "
                             f"dimension {dim}")
    return dim


def reshape(node, dims):
    """view/reshape: the sharded dim becomes the first output dim (of size > 1) whose leading
    dims hold as many elements as the ones before it; merging it with later dims, or splitting
    it into leading pieces, keeps each rank's chunk contiguous."""
    x = node.args[0]
    src, dst = tensor_shape(x), tensor_shape(node)
    outer = math.prod(src[:dims[x]])
    for e, size in enumerate(dst):
        if math.prod(dst[:e]) == outer and size != 1:
            return e
    raise NotCarried(f"view/reshape {src} -> {dst} mixes the sharded dimension {dims[x]} with "
                     f"the dimensions before it")


def transpose(node, dims):
    """transpose(x, a, b) and t(x): the sharded dim moves with the axes."""
    x = node.args[0]
    ndim = len(tensor_shape(node))
    a, b = ((norm_dim(node.args[1], ndim), norm_dim(node.args[2], ndim))
            if node.target is not aten.t.default else (0, 1 if ndim > 1 else 0))
    return {a: b, b: a}.get(dims[x], dims[x])


def permute(node, dims):
    order = [norm_dim(d, len(tensor_shape(node))) for d in node.args[1]]
    return order.index(dims[node.args[0]])


def unsqueeze(node, dims):
    new = norm_dim(node.args[1], len(tensor_shape(node)))
    return dims[node.args[0]] + (new <= dims[node.args[0]])


def squeeze(node, dims):
    """squeeze removes size-1 dims (all of them, or those named); never the sharded one."""
    x, dim = node.args[0], dims[node.args[0]]
    src, out = tensor_shape(x), tensor_shape(node)
    named = node.args[1] if len(node.args) > 1 else range(len(src))
    named = [named] if isinstance(named, int) else named
    removed = {norm_dim(d, len(src)) for d in named if src[norm_dim(d, len(src))] == 1}
    if dim in removed or len(out) != len(src) - len(removed):
        raise NotCarried("squeeze removes the sharded dimension")
    return dim - sum(d < dim for d in removed)


def select(node, dims):
    """select(x, dim, index) drops `dim`."""
    x = node.args[0]
    dim = norm_dim(node.args[1], len(tensor_shape(x)))
    if dim == dims[x]:
        raise NotCarried("select picks one index of the sharded dimension")
    return dims[x] - (dim < dims[x])


def slicing(node, dims):
    """slice(x, dim, start, end, step) / narrow(x, dim, start, length): other dims pass; the
    sharded dim only when taken whole (a part of it is not this rank's chunk of anything)."""
    x = node.args[0]
    src = tensor_shape(x)
    dim = norm_dim(_arg(node, 1, "dim", 0), len(src))
    if dim != dims[x]:
        return dims[x]
    if node.target is aten.narrow.default:
        whole = node.args[2] == 0 and node.args[3] == src[dim]
    else:
        start, end, step = (_arg(node, 2, "start"), _arg(node, 3, "end"),
                            _arg(node, 4, "step", 1))
        whole = start in (0, None) and step == 1 and (end is None or end >= src[dim])
    if not whole:
        raise NotCarried(f"slices part of the sharded dimension {dim}")
    return dims[x]


def repeat_interleave(node, dims):
    """repeat_interleave(x, repeats, dim) along another dim (GQA's kv heads for the sequence)."""
    x = node.args[0]
    dim = _arg(node, 2, "dim")
    if dim is None or norm_dim(dim, len(tensor_shape(x))) == dims[x]:
        raise NotCarried("repeat_interleave repeats along the sharded dimension")
    return dims[x]


def expand(node, dims):
    x = node.args[0]
    return dims[x] + len(tensor_shape(node)) - len(tensor_shape(x))


def cat(node, dims):
    """cat along another dim of operands all sharded along the same one."""
    tensors = node.args[0]
    dim = norm_dim(_arg(node, 1, "dim", 0), len(tensor_shape(node)))
    if any(t not in dims for t in tensors) or len({dims[t] for t in tensors}) != 1:
        raise NotCarried("cat of operands not all sharded along one dimension")
    if dims[tensors[0]] == dim:
        raise NotCarried("cat along the sharded dimension")
    return dims[tensors[0]]


def split(node, dims):
    """split / split_with_sizes / chunk along another dim: every piece sharded as the input."""
    x = node.args[0]
    dim = norm_dim(_arg(node, 2, "dim", 0), len(tensor_shape(x)))
    if dim == dims[x]:
        raise NotCarried("splits the sharded dimension into pieces")
    return (dims[x],) * len(tensor_list(node))


def getitem(node, dims):
    """One output of a multi-output op."""
    pieces = dims[node.args[0]]
    return pieces[node.args[1]] if isinstance(pieces, tuple) else None


def reduction(node, dims):
    """sum/mean/amax/var over dims that leave the sharded one (keepdim or not)."""
    x = node.args[0]
    ndim = len(tensor_shape(x))
    reduced = _arg(node, 1, "dim")
    if reduced is None or reduced == []:
        raise NotCarried("reduces over every dimension")
    reduced = {norm_dim(d, ndim) for d in ([reduced] if isinstance(reduced, int) else reduced)}
    if dims[x] in reduced:
        raise NotCarried(f"reduces over the sharded dimension {dims[x]}")
    if node.target is aten.var.dim:  # var(x, dim, unbiased, keepdim)
        keepdim = _arg(node, 3, "keepdim", False)
    elif node.target in (aten.var.correction, aten.var_mean.correction):  # keepdim: keyword
        keepdim = node.kwargs.get("keepdim", False)
    else:  # sum / mean / amax / amin (x, dim, keepdim)
        keepdim = _arg(node, 2, "keepdim", False)
    dim = dims[x] if keepdim else dims[x] - sum(d < dims[x] for d in reduced)
    return (dim, dim) if node.target is aten.var_mean.correction else dim


def softmax(node, dims):
    """softmax / log_softmax over another dim."""
    x = node.args[0]
    if norm_dim(node.args[1], len(tensor_shape(x))) == dims[x]:
        raise NotCarried("softmax over the sharded dimension")
    return dims[x]


def normalization(node, dims):
    """layer_norm / rms_norm over trailing dims that leave the sharded one; its statistics
    (native_layer_norm's mean and rstd) keep the leading dims."""
    x, normalized = node.args[0], node.args[1]
    ndim = len(tensor_shape(x))
    if dims[x] >= ndim - len(normalized):
        raise NotCarried("normalizes over the sharded dimension")
    return (dims[x],) * 3 if node.target is aten.native_layer_norm.default else dims[x]


def matmul(node, dims):
    """Batched matmul: both operands sharded along one shared batch dim (not the two
    contracted/kept matrix dims)."""
    a, b = node.args[:2]
    ndim = len(tensor_shape(node))
    aligned = {dims[t] + ndim - len(tensor_shape(t)) for t in (a, b) if t in dims}
    if a not in dims or b not in dims or len(aligned) != 1 or next(iter(aligned)) >= ndim - 2:
        raise NotCarried("matmul contracts or mixes the sharded dimension")
    return next(iter(aligned))


def attention(node, dims):
    """scaled_dot_product_attention(q, k, v, mask): q, k, v sharded along one batch or head dim
    (attention mixes the sequence and contracts the features); the mask, unsharded, broadcasts
    over it."""
    q, k, v = node.args[:3]
    ndim = len(tensor_shape(node))
    aligned = {dims[t] + ndim - len(tensor_shape(t)) for t in (q, k, v) if t in dims}
    if any(t not in dims for t in (q, k, v)) or len(aligned) != 1 or \
            next(iter(aligned)) >= ndim - 2:
        raise NotCarried("attention mixes or contracts the sharded dimension")
    (dim,) = aligned
    mask = _arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node):
        pos = dim - (ndim - len(tensor_shape(mask)))
        if mask in dims or (pos >= 0 and tensor_shape(mask)[pos] != 1):
            raise NotCarried("the attention mask spans the sharded dimension")
    return dim


def tensor_list(node) -> list:
    val = node.meta.get("val")
    return list(val) if isinstance(val, (list, tuple)) else [val]


# --- the table ------------------------------------------------------------------------------

UNARY = [  # one tensor, elementwise (and the casts and copies that keep its layout)
    "gelu.default", "gelu_.default", "silu.default", "relu.default", "tanh.default",
    "sigmoid.default", "neg.default", "exp.default", "cos.default", "sin.default",
    "rsqrt.default", "sqrt.default",
    "reciprocal.default", "abs.default", "square.default", "dropout.default",
    "native_dropout.default", "clone.default", "contiguous.default", "alias.default",
    "detach.default", "_to_copy.default", "to.dtype", "to.dtype_layout", "to.device",
    "type_as.default", "pow.Tensor_Scalar", "mul.Scalar", "add.Scalar", "div.Scalar",
    "sub.Scalar",
]
BINARY = [  # several tensors, elementwise with broadcasting
    "add.Tensor", "sub.Tensor", "mul.Tensor", "div.Tensor", "pow.Tensor_Tensor", "where.self",
    "masked_fill.Scalar", "masked_fill.Tensor", "maximum.default", "minimum.default",
]
REDUCTIONS = ["sum.dim_IntList", "mean.dim", "amax.default", "amin.default", "var.correction",
              "var.dim", "var_mean.correction"]
SOFTMAX = ["softmax.int", "_softmax.default", "log_softmax.int", "_log_softmax.default"]
NORMS = ["layer_norm.default", "native_layer_norm.default", "rms_norm.default"]


def aten_ops(names: list[str]) -> list:
    """The aten overloads named "packet.overload" that this torch has."""
    ops = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet, None), overload, None)
        if op is not None:
            ops.append(op)
    return ops


def _table() -> dict:
    table = {op: elementwise for op in aten_ops(UNARY)}
    table.update({op: broadcasting for op in aten_ops(BINARY)})
    table.update({op: reduction for op in aten_ops(REDUCTIONS)})
    table.update({op: softmax for op in aten_ops(SOFTMAX)})  # over another dim
    table.update({op: normalization for op in aten_ops(NORMS)})  # over trailing dims
    table.update({
        aten.view.default: reshape,              # (B, S, H) -> (B, S, nh, hd) and back
        aten.reshape.default: reshape,
        aten._unsafe_view.default: reshape,
        aten.transpose.int: transpose,           # the sharded dim moves with the axes
        aten.t.default: transpose,
        aten.permute.default: permute,
        aten.unsqueeze.default: unsqueeze,       # a new axis before it shifts it
        aten.squeeze.default: squeeze,           # removed axes before it shift it
        aten.squeeze.dim: squeeze,
        aten.squeeze.dims: squeeze,
        aten.select.int: select,                 # another dim dropped
        aten.slice.Tensor: slicing,              # another dim sliced, or this one whole
        aten.narrow.default: slicing,
        aten.expand.default: expand,             # new leading axes shift it
        aten.repeat_interleave.self_int: repeat_interleave,  # along another dim
        aten.cat.default: cat,                   # along another dim
        aten.split.Tensor: split,                # along another dim: every piece
        aten.split_with_sizes.default: split,
        aten.chunk.default: split,
        operator.getitem: getitem,               # one piece of a multi-output op
        aten.matmul.default: matmul,             # along a batch dim
        aten.bmm.default: matmul,
        aten.scaled_dot_product_attention.default: attention,  # along batch or heads
    })
    return table


TABLE = _table()
"""aten op -> its rule."""
