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
`all_gather(., "tp", -1)`, so every rank sees the full output.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass

import torch
from torch import fx

from partitioner.capture import module_path
from passes import PassContext, PassError
from runtime.collectives import all_gather, all_reduce, copy_to_region

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

    def __str__(self) -> str:
        return f"S({self.dim})@{MESH_DIM}"


class _Broken(Exception):
    """An op cannot carry the split. `structural`: the region is not one (replicate it);
    otherwise a count does not divide by tp (the model and plan disagree: refuse)."""

    def __init__(self, rule: str, structural: bool = False) -> None:
        super().__init__(rule)
        self.rule = rule
        self.structural = structural


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
    out[split.dim] //= tp
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
    splits = {(s.dim + out_ndim - _ndim(a), s.blocks) for a in tensors
              if (s := _split_of(states, a)) is not None}
    if len(splits) != 1:
        raise _Broken("operands split along different dimensions", structural=True)
    dim, blocks = next(iter(splits))
    for a in tensors:
        if _split_of(states, a) is None:
            pos = dim - (out_ndim - _ndim(a))
            if pos >= 0 and _shape(a)[pos] != 1:
                raise _Broken(f"replicated operand {a.name} {_shape(a)} spans the split "
                              f"dimension {dim}", structural=True)
    return Split(dim, blocks), None


def _reshape(node, states, tp):  # view/reshape: follow the split into the new shape
    split = states[node.args[0]]
    src, dst = _shape(node.args[0]), _shape(node)
    outer = math.prod(src[:split.dim])
    dims = [e for e in range(len(dst)) if math.prod(dst[:e]) == outer and dst[e] != 1]
    if not dims:
        raise _Broken(f"view/reshape {src} -> {dst} mixes the split dimension {split.dim} "
                      f"with the dimensions before it", structural=True)
    e = dims[0]
    if len(split.blocks) > 1 and dst[e] != src[split.dim]:
        raise _Broken("view/reshape splits a fused (multi-block) projection output",
                      structural=True)
    if dst[e] % tp:
        raise _Broken(f"view/reshape {src} -> {dst} puts the split on dim {e} of size "
                      f"{dst[e]}, which tp={tp} does not divide (attention heads and kv heads "
                      f"must be multiples of tp)")
    local = list(dst)
    local[e] //= tp
    blocks = split.blocks if len(split.blocks) > 1 else (dst[e],)
    return Split(e, blocks), (node.args[0], local, *node.args[2:])


def _transpose(node, states, tp):
    split = states[node.args[0]]
    nd = _ndim(node)
    a, b = _norm_dim(node.args[1], nd), _norm_dim(node.args[2], nd)
    dim = {a: b, b: a}.get(split.dim, split.dim)
    return Split(dim, split.blocks), None


def _permute(node, states, tp):
    split = states[node.args[0]]
    order = [_norm_dim(d, _ndim(node)) for d in node.args[1]]
    return Split(order.index(split.dim), split.blocks), None


def _unsqueeze(node, states, tp):
    split = states[node.args[0]]
    d = _norm_dim(node.args[1], _ndim(node))
    return Split(split.dim + (d <= split.dim), split.blocks), None


def _squeeze(node, states, tp):
    split = states[node.args[0]]
    src = _shape(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else [i for i, s in enumerate(src) if s == 1]
    dims = [dims] if isinstance(dims, int) else dims
    dims = {_norm_dim(d, len(src)) for d in dims if src[_norm_dim(d, len(src))] == 1}
    return Split(split.dim - sum(d < split.dim for d in dims), split.blocks), None


def _pieces(node, sizes: list[int], split: Split, tp: int) -> list[int]:
    """Split sizes along the split dim must be the fused blocks; -> their local sizes."""
    if tuple(sizes) != split.blocks:
        raise _Broken(f"split sizes {list(sizes)} along the split dimension do not match the "
                      f"projection's blocks {list(split.blocks)}", structural=True)
    return [s // tp for s in sizes]


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
    states_out = [Split(dim, (s,)) for s in sizes]
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
    lstart, lend = bounds[first] // tp, bounds[last] // tp
    if node.target is aten.narrow.default:
        return Split(dim, blocks), (node.args[0], node.args[1], lstart, lend - lstart)
    return Split(dim, blocks), (node.args[0], node.args[1], lstart, lend, *node.args[4:])


def _expand(node, states, tp):
    split = states[node.args[0]]
    nd = _ndim(node)
    dim = split.dim + nd - _ndim(node.args[0])
    sizes = list(node.args[1])
    if sizes[dim] != -1:
        sizes[dim] //= tp
    return Split(dim, split.blocks), (node.args[0], sizes, *node.args[2:])


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
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node):
        if _split_of(states, mask) is not None:
            raise _Broken("split attention mask", structural=True)
        pos = heads - (nd - _ndim(mask))
        if pos >= 0 and _shape(mask)[pos] != 1:
            raise _Broken("attention mask spans the heads dimension", structural=True)
    return Split(heads, (_shape(node)[heads],)), None


def _repeat_interleave(node, states, tp):  # GQA: kv heads repeated to the query heads
    split = states[node.args[0]]
    args = list(node.args)
    if len(args) > 3 and args[3] is not None and args[2] is not None and \
            _norm_dim(args[2], _ndim(node)) == split.dim:
        args[3] //= tp
    return Split(split.dim, (_shape(node)[split.dim],)), tuple(args)


def _matmul(node, states, tp):  # batched matmul: split along a shared batch dimension only
    a, b = node.args[:2]
    sa, sb = _split_of(states, a), _split_of(states, b)
    nd = _ndim(node)
    dims = {s.dim + nd - _ndim(t) for s, t in ((sa, a), (sb, b)) if s is not None}
    if sa is None or sb is None or len(dims) != 1 or next(iter(dims)) >= nd - 2:
        raise _Broken("matmul contracts or mixes the split dimension", structural=True)
    return Split(next(iter(dims)), sa.blocks), None


_UNARY = [
    "gelu.default", "silu.default", "relu.default", "tanh.default", "sigmoid.default",
    "neg.default", "exp.default", "rsqrt.default", "sqrt.default", "dropout.default",
    "clone.default", "contiguous.default", "alias.default", "_to_copy.default", "to.dtype",
    "to.dtype_layout", "to.device", "pow.Tensor_Scalar", "mul.Scalar", "add.Scalar",
    "div.Scalar", "sub.Scalar", "type_as.default", "detach.default", "gelu_.default",
]
_BINARY = ["add.Tensor", "sub.Tensor", "mul.Tensor", "div.Tensor", "where.self",
           "masked_fill.Scalar", "masked_fill.Tensor", "maximum.default", "minimum.default"]


def _rule_table():
    """Op -> split rule: which ops can sit inside a tensor-parallel region."""
    table = {}
    for names, rule in ((_UNARY, _same), (_BINARY, _broadcast)):
        for name in names:
            packet, _, overload = name.partition(".")
            op = getattr(getattr(aten, packet), overload, None)
            if op is not None:
                table[op] = rule
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
    from partitioner.lower import ParamLayout

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
    from partitioner.lower import ShardSpec

    tp = ctx.plan.tp
    layouts = _base_layouts(gm)
    if tp == 1:
        gm.meta[LAYOUTS_KEY] = layouts
        return gm
    graph = gm.graph
    projs = {n: p for n in graph.nodes if (p := _projection(n)) is not None}
    linears = list(projs)
    rule_of = lambda lin: ctx.plan.rule_for(module_path(lin))  # noqa: E731
    problems: list[str] = []

    def problem(node: fx.Node, rule: str, fix: str | None = None) -> None:
        path = module_path(node)
        glob = ".".join("*" if part.isdigit() else part for part in path.split("."))
        fix = fix or (f"rules={glob}.*:replicate keeps these layers replicated, or pick a tp "
                      f"that divides the sizes" if path else "a `rules` override")
        problems.append(f"node {node.name} ({_target(node)}) in module {path!r}: {rule}; "
                        f"fix: {fix}")

    # Linears ruled replicate or vocab are never region starts; tied weights need one
    # placement (both users replicated).
    shared = {lin for lin in linears if len(projs[lin].weight.users) > 1}
    skip = {lin for lin in linears if rule_of(lin) in ("replicate", "vocab", "rowwise")} | shared
    regions, why_not = _find_regions(projs, rule_of, skip)
    for lin in linears:
        kind = rule_of(lin)
        if kind == "colwise" and lin in why_not:
            problem(lin, f"ruled colwise but {why_not[lin]}")
        if kind in ("colwise", "vocab") and lin in shared:
            problem(lin, f"ruled {kind} but its weight {projs[lin].weight.target!r} is tied to "
                         f"another use, which needs the same placement",
                    f"rules={module_path(lin)}:replicate")

    # Propagate the split through every region, collecting every broken rule.
    states: dict[fx.Node, object] = {}
    rewrites: dict[fx.Node, tuple] = {}
    active = [r for r in regions if not r.broken]
    order = {node: i for i, node in enumerate(graph.nodes)}
    kept = []
    for region in active:
        local_states, local_rewrites, errors = _propagate(region, projs, order, tp)
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
    if not kept and not vocab and not problems:
        reasons = "; ".join(f"{lin.name} ({module_path(lin)}): {why_not.get(lin, 'skipped')}"
                            for lin in linears) or "the graph has no linear with a weight"
        problems.append(f"no column/row-parallel region found with tp={tp}: {reasons}; fix: "
                        f"rules=<module glob>:colwise / :rowwise, or run with tp=1")
    if problems:
        # The first line stands alone (the CLI prints only it); then every broken rule.
        more = f" (and {len(problems) - 1} more, listed below)" if len(problems) > 1 else ""
        raise PassError(f"tensor_parallel (tp={tp}) cannot split this model: {problems[0]}"
                        f"{more}\n  - " + "\n  - ".join(problems))

    _rewrite(gm, kept, vocab, projs, states, rewrites, layouts, tp, ShardSpec)
    gm.meta[LAYOUTS_KEY] = layouts
    graph.lint()
    gm.recompile()
    return gm


def _propagate(region: _Region, projs: dict, order: dict, tp: int):
    """States of every value in the region and the rewritten args, plus (node, _Broken)s."""
    states: dict[fx.Node, object] = {}
    rewrites: dict[fx.Node, tuple] = {}
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
                bad = [b for b in blocks if b % tp]
                if bad:
                    raise _Broken(f"output features {list(blocks)} of the column-parallel "
                                  f"linear do not divide by tp={tp}")
                states[node] = Split(_ndim(node) - 1, blocks)
            elif node in region.rows:
                x = projs[node].x
                split = states.get(x)
                if split is None or split.dim != _ndim(x) - 1 or \
                        len(split.blocks) > 1:
                    raise _Broken("the row-parallel linear's input is not split along its "
                                  "features", structural=True)
            elif node in region.nodes:
                if all(states.get(a) is None for a in node.all_input_nodes):
                    continue
                state, args = RULES[node.target](node, states, tp)
                states[node] = state
                if args is not None:
                    rewrites[node] = tuple(args)
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


def _rewrite(gm, regions, vocab, projs, states, rewrites, layouts, tp, ShardSpec) -> None:
    graph = gm.graph

    def shard_param(attr: fx.Node, spec) -> None:
        layout = layouts[attr.target]
        layouts[attr.target] = _replace(layout, shards=(spec,))
        attr.meta[PLACEMENT_KEY] = str(spec)
        val = _val(attr)
        if isinstance(val, torch.Tensor):
            local = list(val.shape)
            local[spec.dim] = (spec.padded or local[spec.dim]) // tp
            attr.meta["val"] = torch.empty(local, dtype=val.dtype, device="meta")

    copies: dict[fx.Node, fx.Node] = {}

    def enter(lin: fx.Node) -> None:  # f: identity forward, all-reduce backward
        x = projs[lin].x
        if x not in copies:  # one copy per input, shared by the region's column linears
            with graph.inserting_before(lin):
                copy = graph.call_function(copy_to_region, (x, MESH_DIM))
            copy.meta.update({"val": _val(x), PLACEMENT_KEY: "R",
                              "nn_module_stack": lin.meta.get("nn_module_stack", {})})
            copies[x] = copy
        lin.replace_input_with(x, copies[x])

    def column(lin: fx.Node, blocks, padded: int | None = None) -> None:
        proj = projs[lin]
        blocks = tuple(blocks) if len(blocks) > 1 else None
        shard_param(proj.weight, ShardSpec(proj.out_dim, MESH_DIM, blocks=blocks, padded=padded))
        if proj.bias is not None:
            shard_param(proj.bias, ShardSpec(0, MESH_DIM, blocks=blocks, padded=padded))
        enter(lin)

    order = {node: i for i, node in enumerate(graph.nodes)}
    # In graph order, so each shared copy_to_region lands before its first user.
    for lin in sorted((c for r in regions for c in r.columns), key=order.__getitem__):
        column(lin, states[lin].blocks)
    for region in regions:
        for node in region.nodes:
            if node in rewrites:
                node.args = rewrites[node]
        for node in list(region.nodes) + region.columns:
            state = states.get(node)
            if isinstance(state, Split):
                node.meta[PLACEMENT_KEY] = str(state)
            elif isinstance(state, list):
                node.meta[PLACEMENT_KEY] = ",".join(map(str, state))
            _set_val(node, state, tp)
        for lin in region.rows:  # g: linear(x, w) -> all_reduce -> + bias
            proj = projs[lin]
            shard_param(proj.weight, ShardSpec(1 - proj.out_dim, MESH_DIM))
            bias = proj.bias
            if lin.target is aten.addmm.default:  # b + x @ w -> x @ w
                lin.target = aten.mm.default
            lin.args = (lin.args[0], lin.args[1]) if lin.target is aten.linear.default else (
                proj.x, proj.weight)
            lin.kwargs = {}
            lin.meta[PLACEMENT_KEY] = f"P(sum)@{MESH_DIM}"
            users = list(lin.users)
            with graph.inserting_after(lin):
                reduced = graph.call_function(all_reduce, (lin, MESH_DIM))
            reduced.meta.update({"val": _val(lin), PLACEMENT_KEY: "R",
                                 "nn_module_stack": lin.meta.get("nn_module_stack", {})})
            out = reduced
            if bias is not None:
                with graph.inserting_after(reduced):
                    out = graph.call_function(aten.add.Tensor, (reduced, bias))
                out.meta.update({"val": _val(lin), PLACEMENT_KEY: "R",
                                 "nn_module_stack": lin.meta.get("nn_module_stack", {})})
            for user in users:
                user.replace_input_with(lin, out)
    for lin in vocab:  # vocab-parallel: column over the output features, then all-gather
        full = _val(lin)
        vocab_size = full.shape[-1]
        # Megatron's make_vocab_size_divisible_by: zero rows pad the vocabulary to a multiple
        # of tp; the padded logits are sliced off after the gather.
        padded = -(-vocab_size // tp) * tp
        column(lin, (vocab_size,), padded if padded != vocab_size else None)
        lin.meta[PLACEMENT_KEY] = f"S({full.dim() - 1})@{MESH_DIM}"
        local = list(full.shape)
        local[-1] = padded // tp
        lin.meta["val"] = torch.empty(local, dtype=full.dtype, device="meta")
        users = list(lin.users)
        meta = {PLACEMENT_KEY: "R", "nn_module_stack": lin.meta.get("nn_module_stack", {})}
        with graph.inserting_after(lin):
            out = graph.call_function(all_gather, (lin, MESH_DIM, -1))
        out.meta.update(meta, val=torch.empty(local[:-1] + [padded], dtype=full.dtype,
                                              device="meta"))
        if padded != vocab_size:
            with graph.inserting_after(out):
                out = graph.call_function(aten.slice.Tensor, (out, -1, 0, vocab_size))
            out.meta.update(meta, val=full)
        for user in users:
            user.replace_input_with(lin, out)
    # The graph module's own tensors take their local shapes (ParallelModel binds the real
    # shards by name; reports read these).
    for attr in graph.find_nodes(op="get_attr"):
        layout = layouts.get(attr.target)
        if layout is None or not layout.shards:
            continue
        owner_path, _, leaf = attr.target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        value = getattr(owner, leaf)
        local = torch.empty(layout.local_shape({MESH_DIM: tp}), dtype=layout.dtype,
                            device="meta")
        if isinstance(value, torch.nn.Parameter):
            owner._parameters[leaf] = torch.nn.Parameter(local,
                                                         requires_grad=value.requires_grad)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = local
