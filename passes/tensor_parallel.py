"""Tensor parallelism (Megatron-style column/row splits) as an fx pass, found from dataflow.

A *region* starts at column-parallel linears (each rank keeps a slice of the output features)
and ends at the row-parallel linears their outputs flow into (each rank holds the matching slice
of the input features). Regions are found by walking node users from every linear through ops
that can carry a split (views, elementwise ops, attention, ...) until other linears close them;
linears whose walk reaches anything else (a norm, the graph output, a residual add) stay
replicated. `Plan.rules` overrides the finder by module path.

Inside a region every value is split along exactly one tensor dimension (`Split`); each op's
rule maps the split through the op and rewrites the constants that count heads or hidden units
(view/reshape sizes, split sizes, slice bounds) into local counts, from the FakeTensor shapes in
`node.meta["val"]`. Where a count does not divide by tp the pass refuses, naming the node, its
module path and the rule broken, before any collective runs.

Rewrite (Megatron-Core's f/g pair): `copy_to_region(x, "tp")` before the column linears (identity
forward, all-reduce backward); `linear(x, w)` -> `all_reduce(., "tp")` -> `+ bias` for the row
linears. A `vocab` rule makes a linear column-parallel over its output features followed by
`all_gather(., "tp", -1)`, so every rank sees the full output. The word embedding and the LM
head are `vocab` by default, as in Megatron-Core and torchtitan (`_default_vocab`; a
`replicate` rule keeps them whole). A `vocab` rule on an embedding
(Megatron's VocabParallelEmbedding) shards the table's rows: ids outside this rank's rows look up
row 0, their outputs are zeroed, and `all_reduce(., "tp")` sums the one rank that had each id.
A vocabulary tp does not divide is padded with zero rows (`Shard.padded`). A table tied to
an LM head takes one row shard for both uses when both are ruled `vocab`.

Grouped-query attention whose kv heads tp does not divide but which divide tp (kv=2, tp=4):
the k/v projections keep their weights replicated, read through `copy_to_region(w, "tp")` and
narrowed to this rank's kv head, so each kv head is computed on tp/kv ranks (`Split.replicas`)
and the all-reduce in the copy's backward sums the per-rank gradient pieces into the true
gradient. The kv-head repeat (repeat_interleave, or HF's unsqueeze/expand/reshape) is rewritten
to produce exactly the query heads this rank holds; SDPA with enable_gqa takes the one kv head
as is.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass

import torch
from torch import fx

from core.placement import ParamLayout, Placements, Shard, local_size, split_placement
from core.fx_utils import module_path
from passes import PassContext, PassError
from core.ops import all_gather, all_reduce, copy_to_region

log = logging.getLogger(__name__)

aten = torch.ops.aten
MESH_DIM = "tp"
LAYOUTS_KEY = "partitioner.layouts"
PLACEMENT_KEY = "tp.placement"


@dataclass(frozen=True)
class Split:
    """A value split over tp along tensor dim `dim`; `blocks` are the full sizes of the
    sub-blocks along it (fused projections: each block is split, Megatron's stride)."""

    dim: int
    blocks: tuple[int, ...]
    replicas: int = 1
    """Ranks holding the same piece: 1 for a plain split (tp pieces); tp/kv for grouped-query kv
    heads replicated on consecutive ranks (tp/replicas pieces, rank r holds r // replicas)."""

    def parts(self, tp: int) -> int:
        return tp // self.replicas

    def __str__(self) -> str:
        # tp/2: split into tp/2 pieces (each held by 2 ranks)
        more = f"/{self.replicas}" if self.replicas > 1 else ""
        return f"S({self.dim})@{MESH_DIM}{more}"


class _Broken(Exception):
    """An op cannot carry the split. `structural`: the region is not one (replicate it);
    otherwise a count does not divide by tp (the model and plan disagree: refuse)."""

    def __init__(self, rule: str, structural: bool = False, heads: int | None = None) -> None:
        super().__init__(rule)
        self.rule = rule
        self.structural = structural
        self.heads = heads  # a head count tp does not divide (kv heads may be replicated)


@dataclass(frozen=True)
class _Call:
    """A rule's rewritten args when its kwargs change too (a plain tuple otherwise)."""

    args: tuple
    kwargs: dict


@dataclass(frozen=True)
class _Narrow:
    """A rewritten argument: `node` narrowed along `dim` to the `length` slice this rank takes
    among the `replicas` ranks that hold the same piece (the rank is known only at rewrite)."""

    node: fx.Node
    dim: int
    length: int
    replicas: int


# --- helpers on node metadata --------------------------------------------------------------

def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _shape(node) -> tuple[int, ...]:
    val = _val(node)
    if not isinstance(val, torch.Tensor):
        raise _Broken(f"{getattr(node, 'name', node)} has no tensor shape in meta['val']",
                      structural=True)
    return tuple(int(s) for s in val.shape)


def _ndim(node) -> int:
    return len(_shape(node))


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _local(shape, split: Split, tp: int) -> tuple[int, ...]:
    out = list(shape)
    out[split.dim] //= split.parts(tp)
    return tuple(out)


@dataclass(frozen=True)
class _Proj:
    """A matmul with a parameter weight: aten.linear (weight (out, in)) or addmm/mm/matmul with
    a transposed (in, out) weight (Hugging Face GPT-2's Conv1D)."""

    node: fx.Node
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    out_dim: int
    """The weight's output-feature dimension: 0 for linear, 1 for (in, out) weights."""


def _is_param(node) -> bool:
    return (isinstance(node, fx.Node) and node.op == "get_attr"
            and isinstance(_val(node), torch.Tensor))


def _projection(node: fx.Node) -> _Proj | None:
    """The projection `node` computes, or None (the table of what counts as one)."""
    if node.op != "call_function" or node.kwargs.get("beta", 1) != 1 or \
            node.kwargs.get("alpha", 1) != 1:
        return None
    args = node.args
    if node.target is aten.linear.default and len(args) >= 2:  # x @ w.T + b
        bias = args[2] if len(args) > 2 else node.kwargs.get("bias")
        proj = _Proj(node, args[0], args[1], bias, 0)
    elif node.target is aten.addmm.default and len(args) == 3:  # b + x @ w (Conv1D)
        proj = _Proj(node, args[1], args[2], args[0], 1)
    elif node.target in (aten.mm.default, aten.matmul.default) and len(args) == 2:  # x @ w
        proj = _Proj(node, args[0], args[1], None, 1)
    else:
        return None
    if not _is_param(proj.weight) or _val(proj.weight).dim() != 2 or \
            not isinstance(proj.x, fx.Node):
        return None
    if proj.bias is not None and not (_is_param(proj.bias) and _val(proj.bias).dim() == 1):
        return None
    return proj


# --- per-op split rules: (node, state of each arg node, tp) -> (output state, new args) -----
# A rule returns the output's state (a Split, None for replicated, or a list for multi-output
# ops) and the node's rewritten args (None: unchanged), or raises _Broken.

def _split_of(states, node) -> Split | None:
    return states.get(node) if isinstance(node, fx.Node) else None


def _same(node, states, tp):  # unary / dtype / copy ops: the split passes through
    return _split_of(states, node.args[0]), None


def _softmax(node, states, tp):  # softmax over a dim other than the split one
    split = _split_of(states, node.args[0])
    if split and _norm_dim(node.args[1], _ndim(node)) == split.dim:
        raise _Broken("softmax over the split dimension", structural=True)
    return split, None


def _broadcast(node, states, tp):  # elementwise ops with broadcasting
    out_ndim = _ndim(node)
    tensors = [a for a in node.args if isinstance(a, fx.Node) and isinstance(_val(a), torch.Tensor)]
    splits = {(s.dim + out_ndim - _ndim(a), s.blocks, s.replicas) for a in tensors
              if (s := _split_of(states, a)) is not None}
    if len(splits) != 1:
        raise _Broken("operands split along different dimensions or into different pieces",
                      structural=True)
    dim, blocks, replicas = next(iter(splits))
    for a in tensors:
        if _split_of(states, a) is None:
            pos = dim - (out_ndim - _ndim(a))
            if pos >= 0 and _shape(a)[pos] != 1:
                raise _Broken(f"replicated operand {a.name} {_shape(a)} spans the split "
                              f"dimension {dim}", structural=True)
    return Split(dim, blocks, replicas), None


def _reshape(node, states, tp):  # view/reshape: follow the split into the new shape
    split = states[node.args[0]]
    src, dst = _shape(node.args[0]), _shape(node)
    outer = math.prod(src[:split.dim])
    dims = [e for e in range(len(dst)) if math.prod(dst[:e]) == outer and dst[e] != 1]
    if split.parts(tp) == 1 and len(dst) > len(src) and dst[split.dim] == 1:
        dims = [split.dim]  # one kv head on every rank (MQA): (.., hd) -> (.., 1 head, hd)
    if not dims:
        raise _Broken(f"view/reshape {src} -> {dst} mixes the split dimension {split.dim} "
                      f"with the dimensions before it", structural=True)
    e = dims[0]
    if len(split.blocks) > 1 and dst[e] != src[split.dim]:
        raise _Broken("view/reshape splits a fused (multi-block) projection output",
                      structural=True)
    if split.replicas > 1 and dst[e] > src[split.dim]:
        return _merge_kv_copies(node, split, src, dst, e, tp)
    if dst[e] % split.parts(tp):
        raise _Broken(f"view/reshape {src} -> {dst} puts the split on dim {e} of size "
                      f"{dst[e]}, which tp={tp} does not divide (attention heads must be "
                      f"multiples of tp; kv heads multiples of tp, or divisors of tp when "
                      f"k and v have projections of their own)", heads=dst[e])
    local = list(dst)
    local[e] //= split.parts(tp)
    blocks = split.blocks if len(split.blocks) > 1 else (dst[e],)
    return Split(e, blocks, split.replicas), (node.args[0], local, *node.args[2:])


def _merge_kv_copies(node, split: Split, src, dst, e: int, tp: int):
    """reshape (B, kv, n_rep, S, hd) -> (B, heads, S, hd) of replicated kv heads (HF's
    repeat_kv after unsqueeze/expand). This rank holds one kv head (one local entry along the
    kv dim); of its n_rep copies it keeps the n_rep/replicas that line up with its own query
    heads, so the merged heads are a plain tp split: rank r's local heads are
    [r*heads/tp, (r+1)*heads/tp), all copies of kv head r // replicas, as its queries need.
    Narrowing the expanded copies is a view, so only the local heads are ever materialized."""
    d = split.dim
    rep = src[d + 1] if d + 1 < len(src) else 0
    if src[d] != split.parts(tp) or dst[e] != src[d] * rep or rep % split.replicas:
        raise _Broken(f"view/reshape {src} -> {dst} merges kv heads replicated on "
                      f"{split.replicas} ranks with something other than their copies "
                      f"(expected (.., kv, n_rep, ..) -> (.., kv*n_rep, ..))")
    local = list(dst)
    local[e] //= tp
    x = _Narrow(node.args[0], d + 1, rep // split.replicas, split.replicas)
    return Split(e, (dst[e],)), (x, local, *node.args[2:])


def _moved(split: Split, dim: int) -> Split:
    return Split(dim, split.blocks, split.replicas)


def _transpose(node, states, tp):
    split = states[node.args[0]]
    nd = _ndim(node)
    a, b = _norm_dim(node.args[1], nd), _norm_dim(node.args[2], nd)
    dim = {a: b, b: a}.get(split.dim, split.dim)
    return _moved(split, dim), None


def _permute(node, states, tp):
    split = states[node.args[0]]
    order = [_norm_dim(d, _ndim(node)) for d in node.args[1]]
    return _moved(split, order.index(split.dim)), None


def _unsqueeze(node, states, tp):
    split = states[node.args[0]]
    d = _norm_dim(node.args[1], _ndim(node))
    return _moved(split, split.dim + (d <= split.dim)), None


def _squeeze(node, states, tp):
    split = states[node.args[0]]
    src = _shape(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else [i for i, s in enumerate(src) if s == 1]
    dims = [dims] if isinstance(dims, int) else dims
    dims = {_norm_dim(d, len(src)) for d in dims if src[_norm_dim(d, len(src))] == 1}
    return _moved(split, split.dim - sum(d < split.dim for d in dims)), None


def _pieces(node, sizes: list[int], split: Split, tp: int) -> list[int]:
    """Split sizes along the split dim must be the fused blocks; -> their local sizes."""
    if tuple(sizes) != split.blocks:
        raise _Broken(f"split sizes {list(sizes)} along the split dimension do not match the "
                      f"projection's blocks {list(split.blocks)}", structural=True)
    return [s // split.parts(tp) for s in sizes]


def _split_sizes(node, states, tp):  # split_with_sizes / split / chunk
    split = states[node.args[0]]
    src = _shape(node.args[0])
    # split_with_sizes(x, sizes, dim) / split.Tensor(x, size, dim) / chunk(x, n, dim)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim = _norm_dim(dim, len(src))
    outs = [tuple(int(s) for s in v.shape) for v in _val(node)]
    if dim != split.dim:
        return [split] * len(outs), None
    sizes = [o[dim] for o in outs]
    local = _pieces(node, sizes, split, tp)
    states_out = [Split(dim, (s,), split.replicas) for s in sizes]
    if node.target is aten.split_with_sizes.default:
        return states_out, (node.args[0], local, *node.args[2:])
    if node.target is aten.chunk.default:
        return states_out, None
    if len(set(local)) != 1:
        raise _Broken("split with a ragged last piece along the split dimension", structural=True)
    return states_out, (node.args[0], local[0], *node.args[2:])


def _getitem(node, states, tp):
    parts = states.get(node.args[0])
    return (parts[node.args[1]] if parts is not None else None), None


def _slice(node, states, tp):  # slice.Tensor(x, dim, start, end, step) / narrow(x, dim, start, n)
    split = states[node.args[0]]
    src = _shape(node.args[0])
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, len(src))
    if dim != split.dim:
        return split, None
    if node.target is aten.narrow.default:
        start, end, step = node.args[2], node.args[2] + node.args[3], 1
    else:
        start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else src[dim]
        step = node.args[4] if len(node.args) > 4 else 1
        end = min(end, src[dim])
    bounds = [0]
    for block in split.blocks:
        bounds.append(bounds[-1] + block)
    if step != 1 or start not in bounds or end not in bounds or end <= start:
        raise _Broken(f"slice [{start}:{end}:{step}] along the split dimension does not follow "
                      f"the projection's blocks {list(split.blocks)}", structural=True)
    first, last = bounds.index(start), bounds.index(end)
    blocks = split.blocks[first:last]
    parts = split.parts(tp)
    lstart, lend = bounds[first] // parts, bounds[last] // parts
    out = Split(dim, blocks, split.replicas)
    if node.target is aten.narrow.default:
        return out, (node.args[0], node.args[1], lstart, lend - lstart)
    return out, (node.args[0], node.args[1], lstart, lend, *node.args[4:])


def _expand(node, states, tp):
    split = states[node.args[0]]
    nd = _ndim(node)
    dim = split.dim + nd - _ndim(node.args[0])
    sizes = list(node.args[1])
    if sizes[dim] != -1:
        sizes[dim] //= split.parts(tp)
    return _moved(split, dim), (node.args[0], sizes, *node.args[2:])


def _cat(node, states, tp):
    tensors = node.args[0]
    nd = _ndim(node)
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, nd)
    splits = {_split_of(states, t) for t in tensors}
    if len(splits) != 1 or None in splits:
        raise _Broken("cat of split and replicated tensors", structural=True)
    split = next(iter(splits))
    if split.dim == dim:
        raise _Broken("cat along the split dimension", structural=True)
    return split, None


def _attention(node, states, tp):  # sdpa(q, k, v, mask, ...): heads are dim -3
    q, k, v = node.args[:3]
    nd = _ndim(node)
    heads = nd - 3
    for t in (q, k, v):
        split = _split_of(states, t)
        if split is None or split.dim != _ndim(t) - 3:
            raise _Broken(f"attention input {t.name} is not split along its heads",
                          structural=True)
        if split.replicas == 1:
            continue
        # A replicated kv head (one per rank) serves all this rank's query heads: right for
        # SDPA's own grouping (enable_gqa), wrong for anything that pairs heads one to one.
        if t is q or not node.kwargs.get("enable_gqa") or \
                _local(_shape(t), split, tp)[split.dim] != 1:
            raise _Broken(f"attention input {t.name} holds kv heads replicated on "
                          f"{split.replicas} ranks but reaches attention without a kv-head "
                          f"repeat the pass can rewrite (repeat_interleave, unsqueeze/expand/"
                          f"reshape, or enable_gqa=True)")
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node):
        if _split_of(states, mask) is not None:
            raise _Broken("split attention mask", structural=True)
        pos = heads - (nd - _ndim(mask))
        if pos >= 0 and _shape(mask)[pos] != 1:
            raise _Broken("attention mask spans the heads dimension", structural=True)
    return Split(heads, (_shape(node)[heads],)), None


def _repeat_interleave(node, states, tp):  # GQA: kv heads repeated to the query heads
    x = node.args[0]
    split = states[x]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if dim is None or _norm_dim(dim, _ndim(node)) != split.dim:
        return Split(split.dim, (_shape(node)[split.dim],), split.replicas), None
    out = _shape(node)[split.dim]
    args, kwargs = list(node.args), dict(node.kwargs)
    if split.replicas > 1:
        # This rank's one kv head, repeated once per query head this rank holds (all of them
        # map to it): a plain tp split of the repeated heads.
        if _local(_shape(x), split, tp)[split.dim] != 1 or not isinstance(args[1], int):
            raise _Broken(f"repeat_interleave of kv heads replicated on {split.replicas} ranks "
                          f"holds more than one kv head per rank")
        args[1] = out // tp
    if kwargs.get("output_size") is not None:
        kwargs["output_size"] = out // tp
    return Split(split.dim, (out,)), _Call(tuple(args), kwargs)


def _matmul(node, states, tp):  # batched matmul: split along a shared batch dimension only
    a, b = node.args[:2]
    sa, sb = _split_of(states, a), _split_of(states, b)
    nd = _ndim(node)
    dims = {s.dim + nd - _ndim(t) for s, t in ((sa, a), (sb, b)) if s is not None}
    if sa is None or sb is None or len(dims) != 1 or next(iter(dims)) >= nd - 2:
        raise _Broken("matmul contracts or mixes the split dimension", structural=True)
    if sa.replicas != sb.replicas:
        raise _Broken(f"matmul pairs heads split into different pieces ({sa} and {sb}): kv "
                      f"heads replicated over ranks need a kv-head repeat before they meet "
                      f"the query heads")
    return Split(next(iter(dims)), sa.blocks, sa.replicas), None


ELEMENTWISE_UNARY = [
    "gelu.default", "silu.default", "relu.default", "tanh.default", "sigmoid.default",
    "neg.default", "exp.default", "rsqrt.default", "sqrt.default", "dropout.default",
    "clone.default", "contiguous.default", "alias.default", "_to_copy.default", "to.dtype",
    "to.dtype_layout", "to.device", "pow.Tensor_Scalar", "mul.Scalar", "add.Scalar",
    "div.Scalar", "sub.Scalar", "type_as.default", "detach.default", "gelu_.default",
]
ELEMENTWISE_BINARY = ["add.Tensor", "sub.Tensor", "mul.Tensor", "div.Tensor", "where.self",
                      "masked_fill.Scalar", "masked_fill.Tensor", "maximum.default",
                      "minimum.default"]


def aten_ops(names: list[str]) -> list:
    """The aten overloads named "packet.overload" that this torch has."""
    ops = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet, None), overload, None)
        if op is not None:
            ops.append(op)
    return ops


def _rule_table():
    """Op -> split rule: which ops can sit inside a tensor-parallel region."""
    table = {op: _same for op in aten_ops(ELEMENTWISE_UNARY)}
    table.update({op: _broadcast for op in aten_ops(ELEMENTWISE_BINARY)})
    table.update({
        aten.view.default: _reshape,             # (B,S,h) -> (B,S,nh/tp,hd) and back
        aten.reshape.default: _reshape,
        aten._unsafe_view.default: _reshape,
        aten.transpose.int: _transpose,          # the split dim moves with the axes
        aten.permute.default: _permute,
        aten.t.default: _transpose,
        aten.unsqueeze.default: _unsqueeze,
        aten.squeeze.dim: _squeeze,
        aten.squeeze.dims: _squeeze,
        aten.split_with_sizes.default: _split_sizes,  # fused q|k|v sizes -> local sizes
        aten.split.Tensor: _split_sizes,
        aten.chunk.default: _split_sizes,        # fused gate|up: equal blocks, args unchanged
        operator.getitem: _getitem,
        aten.slice.Tensor: _slice,               # [..., :q_size] -> [..., :q_size/tp]
        aten.narrow.default: _slice,
        aten.expand.default: _expand,
        aten.cat.default: _cat,
        aten.scaled_dot_product_attention.default: _attention,
        aten.repeat_interleave.self_int: _repeat_interleave,
        aten.matmul.default: _matmul,
        aten.bmm.default: _matmul,
        aten.softmax.int: _softmax,
        aten._softmax.default: _softmax,
    })
    return table


RULES = _rule_table()


# --- regions --------------------------------------------------------------------------------

@dataclass
class _Region:
    columns: list[fx.Node]
    rows: set[fx.Node]
    nodes: set[fx.Node]
    broken: str | None = None  # why this is not a region (structural), None if it is one


def _walk(start: fx.Node, linears: dict[fx.Node, _Proj]) -> tuple[set, set, str | None]:
    """Nodes reachable from a column candidate's output through region ops, the linears that
    close them, and why the walk failed (None if every path ends at a linear's input)."""
    seen, ends, todo = set(), set(), [start]
    while todo:
        node = todo.pop()
        for user in node.users:
            if user in linears and linears[user].x is node:
                ends.add(user)
            elif user.op == "call_function" and user.target in RULES and user not in linears:
                if user not in seen:
                    seen.add(user)
                    todo.append(user)
            else:
                what = user.name if user.op != "output" else "the graph output"
                return seen, ends, f"its output reaches {what} ({_target(user)}), which no " \
                                   f"row-parallel linear closes"
    if not ends:
        return seen, ends, "no linear closes its output"
    return seen, ends, None


def _target(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_function" else node.op


def _find_regions(linears: dict[fx.Node, _Proj], rule_of, skip: set):
    """Group column candidates whose walks meet (q, k, v at attention; gate, up at mul)."""
    all_linears = linears
    walks, why_not = {}, {}
    for lin in linears:
        if lin in skip:
            continue
        walks[lin] = _walk(lin, all_linears)
    parent = {lin: lin for lin in walks}

    def find(x):
        while parent[x] is not x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    owner: dict[fx.Node, fx.Node] = {}
    for lin, (nodes, ends, _) in walks.items():
        for n in nodes | ends:
            if n in owner:
                parent[find(lin)] = find(owner[n])
            else:
                owner[n] = lin
    groups: dict[fx.Node, _Region] = {}
    for lin in walks:
        region = groups.setdefault(find(lin), _Region([], set(), set()))
        nodes, ends, broken = walks[lin]
        region.columns.append(lin)
        region.rows |= ends
        region.nodes |= nodes
        if broken and not region.broken:
            region.broken = f"{lin.name}: {broken}"
    regions = list(groups.values())
    # A linear cannot be both the end of one region and the start of another, and a region
    # must not end at a linear ruled replicate/colwise.
    changed = True
    while changed:
        changed = False
        ends = {r for region in regions if not region.broken for r in region.rows}
        for region in regions:
            if region.broken:
                continue
            for col in region.columns:
                if col in ends:
                    region.broken = f"{col.name} also closes another region"
            for row in region.rows:
                if rule_of(row) in ("replicate", "colwise", "vocab"):
                    region.broken = f"{row.name} is ruled {rule_of(row)}"
            changed |= bool(region.broken)
    for region in regions:
        if region.broken:
            for col in region.columns:
                why_not[col] = region.broken
    return regions, why_not


_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _fused_blocks(lin: fx.Node) -> tuple[int, ...]:
    """Sub-block sizes of a fused projection, read from how its output is split along the
    features (looking through reshapes that keep the feature dim, as Conv1D's view)."""
    out = _shape(lin)[-1]
    todo = [lin]
    while todo:
        node = todo.pop()
        nd = _ndim(node)
        for user in node.users:
            if user.op != "call_function":
                continue
            if user.target in _RESHAPES and _shape(user)[-1] == out:
                todo.append(user)
                continue
            dim = user.args[2] if len(user.args) > 2 else user.kwargs.get("dim", 0)
            if user.target in (aten.split_with_sizes.default, aten.split.Tensor,
                               aten.chunk.default) and _norm_dim(dim, nd) == nd - 1:
                return tuple(int(v.shape[-1]) for v in _val(user))
    return (out,)


# --- layouts --------------------------------------------------------------------------------

def _base_layouts(gm: fx.GraphModule) -> dict:
    """Every parameter and buffer replicated, as `partitioner.lower.layouts_from_capture`.

    compile_rank may seed gm.meta[LAYOUTS_KEY] with exactly that (it knows the tied names);
    otherwise they are rebuilt from the graph module: a parameter no get_attr reads is taken
    as a tied alias of the one read parameter of the same shape and dtype, if there is exactly
    one, preferring an embedding table (capture reads tied tensors through one canonical name).
    This guess is why compile_rank should seed the key from the capture.
    """
    seeded = gm.meta.get(LAYOUTS_KEY)
    if seeded:
        return dict(seeded)
    read = {n.target for n in gm.graph.find_nodes(op="get_attr")}
    layouts, unread = {}, []
    for name, param in gm.named_parameters(remove_duplicate=False):
        if name in read:
            layouts[name] = ParamLayout(name, tuple(param.shape), param.dtype,
                                        param.requires_grad)
        else:
            unread.append((name, param))
    for name, buf in gm.named_buffers(remove_duplicate=False):
        owner_path, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        layouts[name] = ParamLayout(name, tuple(buf.shape), buf.dtype, False, is_buffer=True,
                                    persistent=leaf not in owner._non_persistent_buffers_set)
    embedded = {n.args[0].target for n in gm.graph.nodes
                if n.op == "call_function" and n.target is aten.embedding.default
                and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr"}
    for name, param in unread:
        same = [l for l in layouts.values() if not l.is_buffer
                and l.full_shape == tuple(param.shape) and l.dtype == param.dtype]
        if len(same) > 1:  # tied LM heads are the common case: prefer the embedding table
            same = [l for l in same if l.name in embedded]
        if len(same) == 1:
            target = same[0]
            layouts[target.name] = _replace(target, aliases=target.aliases + (name,))
        else:
            layouts[name] = ParamLayout(name, tuple(param.shape), param.dtype,
                                        param.requires_grad)
    return layouts


def _replace(layout, **changes):
    import dataclasses
    return dataclasses.replace(layout, **changes)


# --- the pass -------------------------------------------------------------------------------

def tensor_parallel(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Split column/row-parallel regions over the "tp" mesh dimension (see module docstring)."""
    tp = ctx.plan.tp
    layouts = _base_layouts(gm)
    if tp == 1:
        gm.meta[LAYOUTS_KEY] = layouts
        return gm
    graph = gm.graph
    projs = {n: p for n in graph.nodes if (p := _projection(n)) is not None}
    lookups = [n for n in graph.nodes if _is_lookup(n)]
    linears = list(projs)
    ruled = lambda node: ctx.plan.rule_for(module_path(node))  # noqa: E731
    by_default = _default_vocab(graph, projs, lookups, ruled)

    def rule_of(node: fx.Node):
        kind = ruled(node)
        return "vocab" if kind is None and node in by_default else kind

    problems: list[str] = []

    def problem(node: fx.Node, rule: str, fix: str | None = None) -> None:
        path = module_path(node)
        glob = ".".join("*" if part.isdigit() else part for part in path.split("."))
        fix = fix or (f"rules={glob}.*:replicate keeps these layers replicated, or pick a tp "
                      f"that divides the sizes" if path else "a `rules` override")
        problems.append(f"node {node.name} ({_target(node)}) in module {path!r}: {rule}; "
                        f"fix: {fix}")

    # A placement rule that matches nothing is a typo or a partial path ("embed_tokens" for
    # HF's "model.embed_tokens"): silently ignoring it would run another plan than asked.
    placed = [module_path(n) for n in linears + lookups]
    for rule in ctx.plan.rules:
        if rule.kind in ("colwise", "rowwise", "vocab", "replicate") and \
                not any(rule.matches(path) for path in placed):
            paths = dict.fromkeys(".".join("*" if part.isdigit() else part
                                           for part in path.split(".")) for path in placed)
            problems.append(f"rule {str(rule)!r} matches no linear or embedding (globs match the "
                            f"whole module path; these are: {', '.join(paths)}); fix: e.g. "
                            f"rules=*{rule.pattern.split('.')[-1]}:{rule.kind}")

    # A tensor read by several nodes (tied embedding and LM head) has one placement: one row
    # shard when every use is ruled vocab (the table's rows are the head's output features),
    # otherwise replicated.
    def vocab_use(user: fx.Node, table: fx.Node) -> bool:
        if user in projs:
            return projs[user].weight is table and rule_of(user) == "vocab"
        return user in lookups and user.args[0] is table and rule_of(user) == "vocab"

    tables = {p.weight for p in projs.values()} | {n.args[0] for n in lookups}
    tied_vocab = {t for t in tables
                  if len(t.users) > 1 and all(vocab_use(u, t) for u in t.users)}
    shared = {lin for lin in linears
              if len(projs[lin].weight.users) > 1 and projs[lin].weight not in tied_vocab}
    # Linears ruled replicate or vocab are never region starts.
    skip = {lin for lin in linears if rule_of(lin) in ("replicate", "vocab", "rowwise")} | shared
    regions, why_not = _find_regions(projs, rule_of, skip)
    for lin in linears:
        kind = rule_of(lin)
        if kind == "colwise" and lin in why_not:
            problem(lin, f"ruled colwise but {why_not[lin]}")
        if kind == "colwise" and lin in shared:
            problem(lin, f"ruled colwise but its weight {projs[lin].weight.target!r} is tied to "
                         f"{_other_uses(projs[lin].weight, lin)}, which needs the same placement",
                    f"rules={module_path(lin)}:replicate")
        if kind == "vocab" and lin in shared:
            problem(lin, *_tied_vocab_problem(projs[lin].weight, lin, vocab_use))
    vocab_lookups = [n for n in lookups if rule_of(n) == "vocab"]
    for lookup in vocab_lookups:
        table = lookup.args[0]
        if len(table.users) > 1 and table not in tied_vocab:
            problem(lookup, *_tied_vocab_problem(table, lookup, vocab_use))
        if _lookup_arg(lookup, 3, "scale_grad_by_freq", False):
            problem(lookup, "ruled vocab but the embedding scales gradients by frequency, "
                            "which a rank cannot count over ids outside its rows",
                    f"rules={module_path(lookup)}:replicate")

    # Propagate the split through every region, collecting every broken rule.
    states: dict[fx.Node, object] = {}
    rewrites: dict[fx.Node, _Call] = {}
    active = [r for r in regions if not r.broken]
    order = {node: i for i, node in enumerate(graph.nodes)}
    kept = []
    for region in active:
        replicas: dict[fx.Node, int] = {}
        local_states, local_rewrites, errors = _propagate(region, projs, order, tp, replicas)
        while errors:  # again with kv heads replicated, if that is what the errors ask for
            more = _kv_replicas(region, errors, replicas, tp)
            guess = not more
            if guess:  # or a one-head kv projection (MQA), which no shape error points to
                more = _kv_replicas(region, errors, replicas, tp, single=True)
            if not more:
                break
            retry = _propagate(region, projs, order, tp, {**replicas, **more})
            if guess and retry[2]:
                break  # not MQA after all: report the first try's errors
            replicas.update(more)
            local_states, local_rewrites, errors = retry
        structural = [e for e in errors if e[1].structural]
        if structural and not any(rule_of(c) == "colwise" for c in region.columns):
            log.info("tensor_parallel: %s stays replicated: %s", region.columns[0].name,
                     structural[0][1].rule)
            for col in region.columns:
                why_not[col] = f"{structural[0][0].name}: {structural[0][1].rule}"
            continue
        for node, error in errors:
            problem(node, error.rule)
        states.update(local_states)
        rewrites.update(local_rewrites)
        kept.append(region)
    vocab = [lin for lin in linears if rule_of(lin) == "vocab" and lin not in shared]
    if not kept and not vocab and not vocab_lookups and not problems:
        reasons = "; ".join(f"{lin.name} ({module_path(lin)}): {why_not.get(lin, 'skipped')}"
                            for lin in linears) or "the graph has no linear with a weight"
        problems.append(f"no column/row-parallel region found with tp={tp}: {reasons}; fix: "
                        f"rules=<module glob>:colwise / :rowwise, or run with tp=1")
    if problems:
        # The first line stands alone (the CLI prints only it); then every broken rule.
        more = f" (and {len(problems) - 1} more, listed below)" if len(problems) > 1 else ""
        raise PassError(f"tensor_parallel (tp={tp}) cannot split this model: {problems[0]}"
                        f"{more}\n  - " + "\n  - ".join(problems))

    rewriter = _Rewriter(gm, projs, states, layouts, tp, ctx.coords[MESH_DIM])
    rewriter.run(kept, rewrites, vocab, vocab_lookups)
    gm.meta[LAYOUTS_KEY] = layouts
    graph.lint()
    gm.recompile()
    return gm


_PASS_THROUGH = (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                 aten.slice.Tensor, aten.alias.default, aten._to_copy.default, aten.to.dtype,
                 aten.clone.default, aten.contiguous.default)
"""Ops between token ids and their lookup, or between an LM head and the graph output, that do
not change what the values are (layout, dtype, a slice of positions)."""


def _default_vocab(graph: fx.Graph, projs: dict, lookups: list, ruled) -> set[fx.Node]:
    """The word embedding and the LM head, vocab-parallel unless a rule says otherwise (as in
    Megatron-Core and torchtitan: their tables are the largest tensors, the LM head's logits the
    largest activation).

    The word embedding is a lookup whose ids come straight from a model input (position
    embeddings are indexed by aranges); the LM head is a linear whose output reaches the graph
    output through layout ops only and whose output features are that embedding's rows. A
    table whose uses would then disagree (one ruled otherwise, or a lookup that scales
    gradients by frequency, which a rank cannot count over ids it does not hold) stays
    replicated for every use.
    """
    def source(node):
        while isinstance(node, fx.Node) and node.op == "call_function" and \
                node.target in _PASS_THROUGH:
            node = node.args[0]
        return node

    words = [n for n in lookups if isinstance(source(n.args[1]), fx.Node)
             and source(n.args[1]).op == "placeholder"]
    rows = {int(_shape(n.args[0])[0]) for n in words}
    outputs = set(graph.find_nodes(op="output")[0].all_input_nodes)

    def reaches_output(node) -> bool:
        while node not in outputs:
            if len(node.users) != 1:
                return False
            node = next(iter(node.users))
            if node.op == "output":
                return True
            if node.target not in _PASS_THROUGH:
                return False
        return True

    heads = [lin for lin, proj in projs.items() if reaches_output(lin)
             and int(_shape(proj.weight)[proj.out_dim]) in rows]
    chosen = {n for n in set(words) | set(heads) if ruled(n) is None}
    tables = {n.args[0] if n in lookups else projs[n].weight for n in chosen}
    for table in tables:
        uses = list(table.users)
        if any(u not in chosen and ruled(u) != "vocab" for u in uses) or any(
                u in lookups and _lookup_arg(u, 3, "scale_grad_by_freq", False) for u in uses):
            chosen -= set(uses)
    return chosen


def _is_lookup(node: fx.Node) -> bool:
    """embedding(table, ids) with a parameter table."""
    return (node.op == "call_function" and node.target is aten.embedding.default
            and _is_param(node.args[0]) and isinstance(node.args[1], fx.Node))


def _lookup_arg(node: fx.Node, index: int, name: str, default):
    """embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False)."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _other_uses(table: fx.Node, node: fx.Node) -> str:
    return ", ".join(f"{u.name} in {module_path(u)!r}" for u in table.users if u is not node)


def _tied_vocab_problem(table: fx.Node, node: fx.Node, vocab_use) -> tuple[str, str]:
    """(rule, fix) for a vocab rule on a tensor whose other uses are not all ruled vocab."""
    others = [u for u in table.users if u is not node and not vocab_use(u, table)]
    rules = ";".join(sorted({f"{module_path(u)}:vocab" for u in others}))
    return (f"ruled vocab but its weight {table.target!r} is tied to {_other_uses(table, node)}; "
            f"{', '.join(u.name for u in others)} not ruled vocab, and a tied tensor has one "
            f"placement",
            f"rules={rules} as well (one row shard serves every use), or drop the vocab rule "
            f"on {module_path(node)!r} (tied tensors stay replicated)")


def _kv_replicas(region: _Region, errors, replicas: dict, tp: int,
                 single: bool = False) -> dict:
    """Column linears to compute again with their heads replicated: those whose head count
    tp does not divide but which divides tp (grouped-query kv heads, kv < tp), each head then
    held by tp/heads ranks. `single`: instead, those viewed as (.., 1, features), one kv head
    on every rank (multi-query attention; the view alone cannot tell a head from an unsqueeze,
    hence only a guess the caller drops unless it propagates cleanly). Only while some other
    column of the region splits cleanly (the query heads): when every head count is short of
    tp the plan, not GQA, is at fault."""
    found = {}
    if single:
        for col in region.columns:
            src = _shape(col)
            for user in col.users:
                dst = _shape(user) if user.target in _RESHAPES else ()
                if user in region.nodes and len(dst) > len(src) and \
                        dst[:len(src)] == src[:-1] + (1,):
                    found[col] = tp
    for node, error in errors:
        if single or error.heads is None or tp % error.heads:
            continue
        for col in _sources(node, region):
            found[col] = tp // error.heads
    # A fused q|k|v weight cannot replicate only its k/v blocks.
    found = {col: n for col, n in found.items()
             if col not in replicas and len(_fused_blocks(col)) == 1}
    if all(col in found or col in replicas for col in region.columns):
        return {}
    return found


def _sources(node: fx.Node, region: _Region) -> set[fx.Node]:
    """The region's column linears upstream of `node`."""
    columns, seen, todo, found = set(region.columns), set(), [node], set()
    while todo:
        for arg in todo.pop().all_input_nodes:
            if arg in columns:
                found.add(arg)
            elif arg in region.nodes and arg not in seen:
                seen.add(arg)
                todo.append(arg)
    return found


def _propagate(region: _Region, projs: dict, order: dict, tp: int, replicas: dict):
    """States of every value in the region and the rewritten args, plus (node, _Broken)s.
    `replicas`: column linears whose heads are replicated on that many ranks (GQA kv)."""
    states: dict[fx.Node, object] = {}
    rewrites: dict[fx.Node, _Call] = {}
    errors: list[tuple[fx.Node, _Broken]] = []
    columns = set(region.columns)
    poisoned: set[fx.Node] = set()  # downstream of a broken rule: no second error for it
    members = sorted(region.nodes | region.rows | columns, key=order.__getitem__)
    for node in members:
        if poisoned.intersection(node.all_input_nodes):
            poisoned.add(node)
            continue
        try:
            if node in columns:
                blocks = _fused_blocks(node)
                split = Split(_ndim(node) - 1, blocks, replicas.get(node, 1))
                bad = [b for b in blocks if b % split.parts(tp)]
                if bad:
                    raise _Broken(f"output features {list(blocks)} of the column-parallel "
                                  f"linear do not divide by tp={tp}")
                states[node] = split
            elif node in region.rows:
                x = projs[node].x
                split = states.get(x)
                if split is None or split.dim != _ndim(x) - 1 or \
                        len(split.blocks) > 1 or split.replicas > 1:
                    raise _Broken("the row-parallel linear's input is not split along its "
                                  "features", structural=True)
            elif node in region.nodes:
                if all(states.get(a) is None for a in node.all_input_nodes):
                    continue
                state, args = RULES[node.target](node, states, tp)
                states[node] = state
                if args is not None:
                    rewrites[node] = args if isinstance(args, _Call) else _Call(tuple(args),
                                                                                None)
        except _Broken as error:
            errors.append((node, error))
            poisoned.add(node)
    return states, rewrites, errors


def _set_val(node: fx.Node, state, tp: int) -> None:
    val = _val(node)
    if isinstance(state, Split) and isinstance(val, torch.Tensor):
        node.meta["val"] = torch.empty(_local(val.shape, state, tp), dtype=val.dtype,
                                       device="meta")
    elif isinstance(state, list) and isinstance(val, (list, tuple)):
        node.meta["val"] = [torch.empty(_local(v.shape, s, tp), dtype=v.dtype, device="meta")
                            for v, s in zip(val, state, strict=True)]


class _Rewriter:
    """Applies the propagated splits to the graph: this rank's program (the rank picks the
    rows of a vocab shard and the kv head of a replicated projection)."""

    def __init__(self, gm, projs, states, layouts, tp: int, rank: int) -> None:
        self.gm, self.graph, self.projs, self.states = gm, gm.graph, projs, states
        self.layouts, self.tp, self.rank = layouts, tp, rank
        self.copies: dict[fx.Node, fx.Node] = {}
        self.sharded: dict[str, object] = {}

    def run(self, regions, rewrites, vocab_heads, vocab_lookups) -> None:
        order = {node: i for i, node in enumerate(self.graph.nodes)}
        # In graph order, so each shared copy_to_region lands before its first user.
        for lin in sorted((c for r in regions for c in r.columns), key=order.__getitem__):
            split = self.states[lin]
            if split.replicas > 1:
                self.replicated_column(lin, split)
            else:
                self.column(lin, split.blocks)
        for region in regions:
            for node in region.nodes:  # every arg rewrite reads full shapes: before _set_val
                if node in rewrites:
                    self.apply(node, rewrites[node])
            for node in list(region.nodes) + region.columns:
                state = self.states.get(node)
                if isinstance(state, Split):
                    node.meta[PLACEMENT_KEY] = str(state)
                elif isinstance(state, list):
                    node.meta[PLACEMENT_KEY] = ",".join(map(str, state))
                _set_val(node, state, self.tp)
            for lin in region.rows:
                self.row(lin)
        for lin in vocab_heads:
            self.vocab_head(lin)
        for lookup in vocab_lookups:
            self.vocab_lookup(lookup)
        self.local_tensors()

    # --- helpers ---------------------------------------------------------------------------
    def call(self, target, args, like: fx.Node, val, placement: str) -> fx.Node:
        """A new node at the current insert point, with meta taken from `like`."""
        node = self.graph.call_function(target, args)
        node.meta.update({"val": val, PLACEMENT_KEY: placement,
                          "nn_module_stack": like.meta.get("nn_module_stack", {})})
        return node

    def shard_param(self, attr: fx.Node, spec) -> None:
        if attr.target in self.sharded:  # a tied table's second use: checked to agree
            if self.sharded[attr.target] != spec:
                raise PassError(f"tensor_parallel: tied uses of {attr.target!r} need one shard "
                                f"but ask for {self.sharded[attr.target]!r} and {spec!r}")
            return
        self.sharded[attr.target] = spec
        layout = self.layouts[attr.target]
        placements = Placements(((MESH_DIM, spec),))
        self.layouts[attr.target] = _replace(layout, placements=placements)
        attr.meta[PLACEMENT_KEY] = str(placements)
        val = _val(attr)
        if isinstance(val, torch.Tensor):
            local = list(val.shape)
            local[spec.dim] = local_size(spec, local[spec.dim], self.tp)
            attr.meta["val"] = torch.empty(local, dtype=val.dtype, device="meta")

    def apply(self, node: fx.Node, call: _Call) -> None:
        args = []
        for arg in call.args:
            if isinstance(arg, _Narrow):
                arg = self.narrow(node, arg)
                if node.target is aten.view.default:  # a narrowed expand is not viewable
                    node.target = aten.reshape.default
            args.append(arg)
        node.args = tuple(args)
        if call.kwargs is not None:
            node.kwargs = call.kwargs

    def narrow(self, user: fx.Node, marker: _Narrow) -> fx.Node:
        x = marker.node
        split = self.states[x]
        local = list(_local(_shape(x), split, self.tp))  # x still has its full meta here
        local[marker.dim] = marker.length
        start = self.rank % marker.replicas * marker.length
        with self.graph.inserting_before(user):
            return self.call(aten.narrow.default, (x, marker.dim, start, marker.length), user,
                             torch.empty(local, dtype=_val(x).dtype, device="meta"),
                             f"S({split.dim},{marker.dim})@{MESH_DIM}")

    # --- column, row and vocab rewrites ----------------------------------------------------
    def enter(self, lin: fx.Node) -> None:  # f: identity forward, all-reduce backward
        x = self.projs[lin].x
        if x not in self.copies:  # one copy per input, shared by the region's column linears
            with self.graph.inserting_before(lin):
                self.copies[x] = self.call(copy_to_region, (x, MESH_DIM), lin, _val(x), "R")
        lin.replace_input_with(x, self.copies[x])

    def column(self, lin: fx.Node, blocks, padded: int | None = None) -> None:
        proj = self.projs[lin]
        blocks = tuple(blocks) if len(blocks) > 1 else None
        self.shard_param(proj.weight, split_placement(proj.out_dim, blocks, padded))
        if proj.bias is not None:
            self.shard_param(proj.bias, split_placement(0, blocks, padded))
        self.enter(lin)

    def replicated_column(self, lin: fx.Node, split: Split) -> None:
        """Replicated kv heads: the weight (and bias) stay whole on every rank, read through
        copy_to_region and narrowed to this rank's heads. Each rank's weight gradient is
        nonzero only on its heads' rows, from its own query heads; the copy's backward
        all-reduce sums them into the full gradient on every rank, as a replicated weight
        needs. The input gradient needs nothing more: the k/v projections read the region's
        shared copy_to_region(x), whose backward sums every rank's part."""
        proj = self.projs[lin]
        size = _shape(lin)[-1] // split.parts(self.tp)
        start = self.rank // split.replicas * size
        for param, dim in ((proj.weight, proj.out_dim), (proj.bias, 0)):
            if param is None:
                continue
            val = _val(param)
            local = list(val.shape)
            local[dim] = size
            with self.graph.inserting_before(lin):
                copy = self.call(copy_to_region, (param, MESH_DIM), lin, val, "R")
                piece = self.call(aten.narrow.default, (copy, dim, start, size), lin,
                                  torch.empty(local, dtype=val.dtype, device="meta"),
                                  str(Split(dim, (val.shape[dim],), split.replicas)))
            lin.replace_input_with(param, piece)
        self.enter(lin)

    def row(self, lin: fx.Node) -> None:  # g: linear(x, w) -> all_reduce -> + bias
        graph, proj = self.graph, self.projs[lin]
        self.shard_param(proj.weight, Shard(1 - proj.out_dim))
        bias = proj.bias
        if lin.target is aten.addmm.default:  # b + x @ w -> x @ w
            lin.target = aten.mm.default
        lin.args = (lin.args[0], lin.args[1]) if lin.target is aten.linear.default else (
            proj.x, proj.weight)
        lin.kwargs = {}
        lin.meta[PLACEMENT_KEY] = f"P(sum)@{MESH_DIM}"
        users = list(lin.users)
        with graph.inserting_after(lin):
            out = reduced = self.call(all_reduce, (lin, MESH_DIM), lin, _val(lin), "R")
        if bias is not None:
            with graph.inserting_after(reduced):
                out = self.call(aten.add.Tensor, (reduced, bias), lin, _val(lin), "R")
        for user in users:
            user.replace_input_with(lin, out)

    def vocab_head(self, lin: fx.Node) -> None:
        """Column-parallel over the vocabulary, then all-gather the logits."""
        graph, tp = self.graph, self.tp
        full = _val(lin)
        vocab_size = full.shape[-1]
        # Megatron's make_vocab_size_divisible_by: zero rows pad the vocabulary to a multiple
        # of tp; the padded logits are sliced off after the gather.
        padded = -(-vocab_size // tp) * tp
        self.column(lin, (vocab_size,), padded if padded != vocab_size else None)
        lin.meta[PLACEMENT_KEY] = f"S({full.dim() - 1})@{MESH_DIM}"
        local = list(full.shape)
        local[-1] = padded // tp
        lin.meta["val"] = torch.empty(local, dtype=full.dtype, device="meta")
        users = list(lin.users)
        with graph.inserting_after(lin):
            out = self.call(all_gather, (lin, MESH_DIM, -1), lin,
                            torch.empty(local[:-1] + [padded], dtype=full.dtype,
                                        device="meta"), "R")
        if padded != vocab_size:
            with graph.inserting_after(out):
                out = self.call(aten.slice.Tensor, (out, -1, 0, vocab_size), lin, full, "R")
        for user in users:
            user.replace_input_with(lin, out)

    def vocab_lookup(self, lookup: fx.Node) -> None:
        """Megatron's VocabParallelEmbedding: this rank holds rows [start, end) of the
        (padded) table; other ids look up local row 0 and their outputs are zeroed, so the
        all-reduce adds exactly the one rank that holds each id. Their gradients are zero
        too (masked_fill's backward), so row 0 gathers nothing from them."""
        graph, tp = self.graph, self.tp
        table, ids = lookup.args[0], lookup.args[1]
        rows = self.layouts[table.target].full_shape[0]  # a tied head may have sharded it
        padded = -(-rows // tp) * tp
        self.shard_param(table, Shard(0, padded=padded if padded != rows else None))
        per_rank = padded // tp
        start, end = self.rank * per_rank, (self.rank + 1) * per_rank
        id_val, out_val = _val(ids), _val(lookup)
        flags = torch.empty(id_val.shape, dtype=torch.bool, device="meta")
        with graph.inserting_before(lookup):
            below = self.call(aten.lt.Scalar, (ids, start), lookup, flags, "R")
            above = self.call(aten.ge.Scalar, (ids, end), lookup, flags, "R")
            outside = self.call(aten.bitwise_or.Tensor, (below, above), lookup, flags, "R")
            shifted = self.call(aten.sub.Scalar, (ids, start), lookup, id_val, "R")
            local_ids = self.call(aten.masked_fill.Scalar, (shifted, outside, 0), lookup,
                                  id_val, "R")
        pad = _lookup_arg(lookup, 2, "padding_idx", -1)
        # padding_idx only stops that row's gradient; it lives on one rank
        local_pad = pad - start if pad is not None and start <= pad < end else -1
        lookup.args = (table, local_ids, local_pad, *lookup.args[3:])
        lookup.kwargs = {k: v for k, v in lookup.kwargs.items() if k != "padding_idx"}
        lookup.meta[PLACEMENT_KEY] = f"P(sum)@{MESH_DIM}"
        users = list(lookup.users)
        with graph.inserting_before(lookup.next):
            keep = self.call(aten.unsqueeze.default, (outside, -1), lookup,
                             torch.empty(tuple(id_val.shape) + (1,), dtype=torch.bool,
                                         device="meta"), "R")
            zeroed = self.call(aten.masked_fill.Scalar, (lookup, keep, 0.0), lookup, out_val,
                               f"P(sum)@{MESH_DIM}")
            out = self.call(all_reduce, (zeroed, MESH_DIM), lookup, out_val, "R")
        for user in users:
            user.replace_input_with(lookup, out)

    def local_tensors(self) -> None:
        """The graph module's own tensors take their local shapes (ParallelModel binds the
        real shards by name; reports read these)."""
        for attr in self.graph.find_nodes(op="get_attr"):
            layout = self.layouts.get(attr.target)
            if layout is None or layout.placements.replicated:
                continue
            owner_path, _, leaf = attr.target.rpartition(".")
            owner = self.gm.get_submodule(owner_path) if owner_path else self.gm
            value = getattr(owner, leaf)
            local = torch.empty(layout.local_shape({MESH_DIM: self.tp}), dtype=layout.dtype,
                                device="meta")
            if isinstance(value, torch.nn.Parameter):
                owner._parameters[leaf] = torch.nn.Parameter(local,
                                                             requires_grad=value.requires_grad)
            elif leaf in owner._buffers:
                owner._buffers[leaf] = local
