"""The tensor-parallel rules: what an op inside a region does to the split beyond moving its
dim (which the shared propagation table answers, `_carried`): which of its constants (view
sizes, split sizes, slice bounds, expand sizes, repeat counts) count heads or hidden units and
become local counts, how fused blocks and kv heads replicated over ranks go through it. One
rule per op family, in the table at the bottom (`RULES`, also the list of ops a region may
hold); a rule raises `Broken` when the op cannot carry the split.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass

import torch
from torch import fx

from core.fx_utils import norm_dim, val_of
from core.placement import Shard, SplitPlacement, StridedShard
from passes.propagation import NotCarried, aten_ops, carry, tensor_shape

aten = torch.ops.aten
MESH_DIM = "tp"


Split = SplitPlacement
"""How a value inside a region is laid over tp: `Shard(dim)` (kv heads held by `replicas`
consecutive ranks where there are fewer than tp), or `StridedShard(dim, blocks)` for a fused
projection's output, each of its sub-blocks split (Megatron's stride)."""


def tp_split(dim: int, blocks: tuple[int, ...] = (), replicas: int = 1) -> Split:
    """The split along `dim` of a value with these sub-blocks (one block: a plain Shard)."""
    if len(blocks) > 1:
        return StridedShard(dim, tuple(blocks))
    return Shard(dim, replicas=replicas)


def parts(split: Split, tp: int) -> int:
    """How many distinct pieces tp ranks hold."""
    return tp // replicas_of(split)


def replicas_of(split: Split) -> int:
    return split.replicas if isinstance(split, Shard) else 1


def blocks_of(split: Split, size: int) -> tuple[int, ...]:
    """The full sizes of the sub-blocks along the split dim (`size`: the dim's full size)."""
    return split.blocks if isinstance(split, StridedShard) else (size,)


def moved(split: Split, dim: int) -> Split:
    """The same split, now along `dim` (the op moved the axes)."""
    return dataclasses.replace(split, dim=dim)


class Broken(NotCarried):
    """An op cannot carry the split. `structural`: the region is not one (replicate it);
    otherwise a count does not divide by tp (the model and plan disagree: refuse)."""

    def __init__(self, rule: str, structural: bool = False, heads: int | None = None) -> None:
        super().__init__(rule)
        self.rule = rule
        self.structural = structural
        self.heads = heads  # a head count tp does not divide (kv heads may be replicated)


@dataclass(frozen=True)
class Call:
    """A rule's rewritten args when its kwargs change too (a plain tuple otherwise)."""

    args: tuple
    kwargs: dict


@dataclass(frozen=True)
class Narrow:
    """A rewritten argument: `node` narrowed along `dim` to the `length` slice this rank takes
    among the `replicas` ranks that hold the same piece (the rank is known only at rewrite)."""

    node: fx.Node
    dim: int
    length: int
    replicas: int


# --- helpers on node metadata --------------------------------------------------------------

def ndim(node) -> int:
    return len(tensor_shape(node))


def local_shape(shape, split: Split, tp: int) -> tuple[int, ...]:
    out = list(shape)
    out[split.dim] //= parts(split, tp)
    return tuple(out)


# --- per-op split rules: (node, state of each arg node, tp) -> (output state, new args) -----
# A rule returns the output's state (a Split, None for replicated, or a list for multi-output
# ops) and the node's rewritten args (None: unchanged), or raises Broken.

def _split_of(states, node) -> Split | None:
    return states.get(node) if isinstance(node, fx.Node) else None


def _carried(node, states, tp):
    """Ops that only move the split dim (the shared propagation table says where) and whose
    constants count no heads: every split operand must be split into the same pieces."""
    sharded = {a: split for a in node.all_input_nodes if (split := states.get(a)) is not None}
    try:
        out = carry(node, {a: split.dim for a, split in sharded.items()})
    except NotCarried as why:
        raise Broken(str(why), structural=True) from None
    if out is None:
        return None, None
    first = out[0] if isinstance(out, tuple) else out
    pieces = {moved(split, first) for split in sharded.values()}
    if len(pieces) != 1:
        raise Broken("operands split into different pieces", structural=True)
    (split,) = pieces
    return ([moved(split, d) for d in out] if isinstance(out, tuple) else split), None


def _reshape(node, states, tp):  # view/reshape: follow the split into the new shape
    split = states[node.args[0]]
    src, dst = tensor_shape(node.args[0]), tensor_shape(node)
    if parts(split, tp) == 1 and len(dst) > len(src) and dst[split.dim] == 1:
        e = split.dim  # one kv head on every rank (MQA): (.., hd) -> (.., 1 head, hd)
    else:
        try:
            e = carry(node, {node.args[0]: split.dim})
        except NotCarried as why:
            raise Broken(str(why), structural=True) from None
    if isinstance(split, StridedShard) and dst[e] != src[split.dim]:
        raise Broken("view/reshape splits a fused (multi-block) projection output",
                     structural=True)
    if replicas_of(split) > 1 and dst[e] > src[split.dim]:
        return _merge_kv_copies(node, split, src, dst, e, tp)
    if dst[e] % parts(split, tp):
        raise Broken(f"view/reshape {src} -> {dst} puts the split on dim {e} of size "
                     f"{dst[e]}, which tp={tp} does not divide (attention heads must be "
                     f"multiples of tp; kv heads multiples of tp, or divisors of tp when "
                     f"k and v have projections of their own)", heads=dst[e])
    local = list(dst)
    local[e] //= parts(split, tp)
    return moved(split, e), (node.args[0], local, *node.args[2:])


def _merge_kv_copies(node, split: Split, src, dst, e: int, tp: int):
    """reshape (B, kv, n_rep, S, hd) -> (B, heads, S, hd) of replicated kv heads (HF's
    repeat_kv after unsqueeze/expand). This rank holds one kv head (one local entry along the
    kv dim); of its n_rep copies it keeps the n_rep/replicas that line up with its own query
    heads, so the merged heads are a plain tp split: rank r's local heads are
    [r*heads/tp, (r+1)*heads/tp), all copies of kv head r // replicas, as its queries need.
    Narrowing the expanded copies is a view, so only the local heads are ever materialized."""
    d = split.dim
    rep = src[d + 1] if d + 1 < len(src) else 0
    if src[d] != parts(split, tp) or dst[e] != src[d] * rep or rep % split.replicas:
        raise Broken(f"view/reshape {src} -> {dst} merges kv heads replicated on "
                     f"{split.replicas} ranks with something other than their copies "
                     f"(expected (.., kv, n_rep, ..) -> (.., kv*n_rep, ..))")
    local = list(dst)
    local[e] //= tp
    x = Narrow(node.args[0], d + 1, rep // split.replicas, split.replicas)
    return Shard(e), (x, local, *node.args[2:])


def _pieces(node, sizes: list[int], split: Split, tp: int) -> list[int]:
    """Split sizes along the split dim must be the fused blocks; -> their local sizes."""
    fused = blocks_of(split, sum(sizes))
    if tuple(sizes) != fused:
        raise Broken(f"split sizes {list(sizes)} along the split dimension do not match the "
                     f"projection's blocks {list(fused)}", structural=True)
    return [s // parts(split, tp) for s in sizes]


def _split_sizes(node, states, tp):  # split_with_sizes / split / chunk
    split = states[node.args[0]]
    src = tensor_shape(node.args[0])
    # split_with_sizes(x, sizes, dim) / split.Tensor(x, size, dim) / chunk(x, n, dim)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim = norm_dim(dim, len(src))
    outs = [tuple(int(s) for s in v.shape) for v in val_of(node)]
    if dim != split.dim:
        return _carried(node, states, tp)
    sizes = [o[dim] for o in outs]
    local = _pieces(node, sizes, split, tp)
    states_out = [Shard(dim, replicas=replicas_of(split)) for _ in sizes]
    if node.target is aten.split_with_sizes.default:
        return states_out, (node.args[0], local, *node.args[2:])
    if node.target is aten.chunk.default:
        return states_out, None
    if len(set(local)) != 1:
        raise Broken("split with a ragged last piece along the split dimension", structural=True)
    return states_out, (node.args[0], local[0], *node.args[2:])


def _getitem(node, states, tp):
    outs = states.get(node.args[0])
    return (outs[node.args[1]] if outs is not None else None), None


def _slice(node, states, tp):  # slice.Tensor(x, dim, start, end, step) / narrow(x, dim, start, n)
    split = states[node.args[0]]
    src = tensor_shape(node.args[0])
    dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, len(src))
    if dim != split.dim:
        return _carried(node, states, tp)
    if node.target is aten.narrow.default:
        start, end, step = node.args[2], node.args[2] + node.args[3], 1
    else:
        start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else src[dim]
        step = node.args[4] if len(node.args) > 4 else 1
        end = min(end, src[dim])
    fused = blocks_of(split, src[dim])
    bounds = [0]
    for block in fused:
        bounds.append(bounds[-1] + block)
    if step != 1 or start not in bounds or end not in bounds or end <= start:
        raise Broken(f"slice [{start}:{end}:{step}] along the split dimension does not follow "
                     f"the projection's blocks {list(fused)}", structural=True)
    first, last = bounds.index(start), bounds.index(end)
    pieces = parts(split, tp)
    lstart, lend = bounds[first] // pieces, bounds[last] // pieces
    out = tp_split(dim, fused[first:last], replicas_of(split))
    if node.target is aten.narrow.default:
        return out, (node.args[0], node.args[1], lstart, lend - lstart)
    return out, (node.args[0], node.args[1], lstart, lend, *node.args[4:])


def _expand(node, states, tp):
    split = states[node.args[0]]
    dim = carry(node, {node.args[0]: split.dim})
    sizes = list(node.args[1])
    if sizes[dim] != -1:
        sizes[dim] //= parts(split, tp)
    return moved(split, dim), (node.args[0], sizes, *node.args[2:])


def _attention(node, states, tp):  # sdpa(q, k, v, mask, ...): heads are dim -3
    q, k, v = node.args[:3]
    nd = ndim(node)
    heads = nd - 3
    for t in (q, k, v):
        split = _split_of(states, t)
        if split is None or split.dim != ndim(t) - 3:
            raise Broken(f"attention input {t.name} is not split along its heads",
                         structural=True)
        if replicas_of(split) == 1:
            continue
        # A replicated kv head (one per rank) serves all this rank's query heads: right for
        # SDPA's own grouping (enable_gqa), wrong for anything that pairs heads one to one.
        if t is q or not node.kwargs.get("enable_gqa") or \
                local_shape(tensor_shape(t), split, tp)[split.dim] != 1:
            raise Broken(f"attention input {t.name} holds kv heads replicated on "
                         f"{split.replicas} ranks but reaches attention without a kv-head "
                         f"repeat the pass can rewrite (repeat_interleave, unsqueeze/expand/"
                         f"reshape, or enable_gqa=True)")
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node):
        if _split_of(states, mask) is not None:
            raise Broken("split attention mask", structural=True)
        pos = heads - (nd - ndim(mask))
        if pos >= 0 and tensor_shape(mask)[pos] != 1:
            raise Broken("attention mask spans the heads dimension", structural=True)
    return Shard(heads), None


def _repeat_interleave(node, states, tp):  # GQA: kv heads repeated to the query heads
    x = node.args[0]
    split = states[x]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if dim is None or norm_dim(dim, ndim(node)) != split.dim:
        return Shard(split.dim, replicas=replicas_of(split)), None
    out = tensor_shape(node)[split.dim]
    args, kwargs = list(node.args), dict(node.kwargs)
    if replicas_of(split) > 1:
        # This rank's one kv head, repeated once per query head this rank holds (all of them
        # map to it): a plain tp split of the repeated heads.
        if local_shape(tensor_shape(x), split, tp)[split.dim] != 1 or not isinstance(args[1], int):
            raise Broken(f"repeat_interleave of kv heads replicated on {split.replicas} ranks "
                         f"holds more than one kv head per rank")
        args[1] = out // tp
    if kwargs.get("output_size") is not None:
        kwargs["output_size"] = out // tp
    return Shard(split.dim), Call(tuple(args), kwargs)


def _matmul(node, states, tp):  # batched matmul: split along a shared batch dimension only
    a, b = node.args[:2]
    sa, sb = _split_of(states, a), _split_of(states, b)
    if sa is not None and sb is not None and replicas_of(sa) != replicas_of(sb):
        raise Broken(f"matmul pairs heads split into different pieces ({sa} and {sb}): kv "
                     f"heads replicated over ranks need a kv-head repeat before they meet "
                     f"the query heads")
    return _carried(node, states, tp)


CARRIED = [  # the shared table's elementwise ops that may sit inside a region
    "gelu.default", "silu.default", "relu.default", "tanh.default", "sigmoid.default",
    "neg.default", "exp.default", "rsqrt.default", "sqrt.default", "dropout.default",
    "clone.default", "contiguous.default", "alias.default", "_to_copy.default", "to.dtype",
    "to.dtype_layout", "to.device", "pow.Tensor_Scalar", "mul.Scalar", "add.Scalar",
    "div.Scalar", "sub.Scalar", "type_as.default", "detach.default", "gelu_.default",
    "add.Tensor", "sub.Tensor", "mul.Tensor", "div.Tensor", "where.self",
    "masked_fill.Scalar", "masked_fill.Tensor", "maximum.default", "minimum.default",
    "softmax.int", "_softmax.default",
]


def _rule_table():
    """Op -> split rule: which ops can sit inside a tensor-parallel region."""
    table = {op: _carried for op in aten_ops(CARRIED)}  # (softmax over another dim)
    table.update({
        aten.view.default: _reshape,             # (B,S,h) -> (B,S,nh/tp,hd) and back
        aten.reshape.default: _reshape,
        aten._unsafe_view.default: _reshape,
        aten.transpose.int: _carried,            # the split dim moves with the axes
        aten.permute.default: _carried,
        aten.t.default: _carried,
        aten.unsqueeze.default: _carried,
        aten.squeeze.dim: _carried,
        aten.squeeze.dims: _carried,
        aten.split_with_sizes.default: _split_sizes,  # fused q|k|v sizes -> local sizes
        aten.split.Tensor: _split_sizes,
        aten.chunk.default: _split_sizes,        # fused gate|up: equal blocks, args unchanged
        operator.getitem: _getitem,
        aten.slice.Tensor: _slice,               # [..., :q_size] -> [..., :q_size/tp]
        aten.narrow.default: _slice,
        aten.expand.default: _expand,
        aten.cat.default: _carried,              # along another dim
        aten.scaled_dot_product_attention.default: _attention,
        aten.repeat_interleave.self_int: _repeat_interleave,
        aten.matmul.default: _matmul,
        aten.bmm.default: _matmul,
    })
    return table


RULES = _rule_table()
