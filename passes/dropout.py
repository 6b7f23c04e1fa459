"""Dropout that draws the single-device model's masks, on any plan (core/dropout.py).

Runs after the sharding passes (tp, sp, cp, ep), which leave each value's local shape and how
it is split (`tp.placement`, `cp.dim`), and before the pipeline split and recompute, so the new
nodes fall into the stage and region of the dropout they replace. Each `aten.dropout(x, p,
train=True)` becomes

    mask = partitioner.dropout_mask(x, p, seed, node, rows_per_sample, spec)   # 0 or 1/(1-p)
    out  = x * mask

where `node` hashes the dropout's name in the captured graph and `spec` gives, per dim, the
full-size indices this rank holds: a tp shard (features, heads, or sp's sequence chunk), cp's
tokens (two chunks of the load-balanced layout), both (sp inside cp). Dim 0 is the batch: the
mask counts rows of the global batch from the microbatch's first sample, which the executor
supplies with the step counter (`core.dropout.DropoutKey`), so one graph serves every
microbatch and every dp rank. A dropout captured in eval mode (train=False) or with p=0 is the
identity and goes.

Refused, each with the fix: attention's own dropout (`dropout_p > 0` in
scaled_dot_product_attention) under tp, whose masks are drawn by torch's RNG on head shards
(cp refuses it in its own pass); a dropout on a value whose dim 0 is not the batch's rows; a
dropout on a vocabulary-padded shard or on expert-dispatched rows; channel-wise and alpha
dropout (still torch's RNG) on more than one rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch._guards import detect_fake_mode

from core import meta, ops
from core.dropout import IndexSpec, node_key
from core.fx_utils import module_path, tensor_of
from core.placement import Placements, Shard, StridedShard
from passes import PassContext, PassError, recompile
from passes.context_parallel.shard import Rows

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default


@dataclass(frozen=True)
class Dropped:
    """One dropout now drawn by the counter generator."""

    node: str
    """The captured dropout's name (hashed into the masks' key)."""
    module: str
    p: float
    spec: str
    """This rank's elements of the full-size value (core.dropout.IndexSpec)."""

    def __str__(self) -> str:
        return f"{self.node} ({self.module or '<root>'}): p={self.p}, elements {self.spec}"


@dataclass(frozen=True)
class DropoutRecord:
    seed: int
    dropped: tuple[Dropped, ...]
    removed: int
    """Dropouts captured in eval mode or with p=0 (the identity), taken out."""

    def summary(self) -> str:
        removed = f", {self.removed} inactive removed" if self.removed else ""
        return (f"{len(self.dropped)} dropouts on the counter generator (seed {self.seed})"
                f"{removed}")

    def __str__(self) -> str:
        return "\n".join([f"dropout ({self.summary()})", *(f"  {d}" for d in self.dropped)])


def dropout(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    graph = gm.graph
    problems = [_attention_problem(n, ctx) for n in graph.nodes if n.target is _SDPA]
    dropped, removed = [], 0
    batch = _batch(graph)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _OTHER_DROPOUTS:
            problems.append(_other_dropout_problem(node, ctx))
            continue
        if node.op != "call_function" or node.target not in (aten.dropout.default,
                                                              aten.native_dropout.default):
            continue
        x, p, train = (list(node.args) + [None])[:3]
        if train is False or not p:  # native_dropout's train=None is training
            removed += _remove(graph, node, x)
            continue
        spec, rows, problem = _spec(node, x, batch, ctx, gm)
        if problem:
            problems.append(problem)
            continue
        _replace(graph, node, x, float(p), rows, spec, ctx.plan.seed)
        dropped.append(Dropped(node.name, module_path(node), float(p), str(spec)))
    problems = [p for p in problems if p]
    if problems:
        raise PassError("dropout: " + "\n".join(problems))
    gm.meta[meta.DROPOUT_RECORD] = DropoutRecord(ctx.plan.seed, tuple(dropped), removed)
    if dropped or removed:
        graph.lint()
        recompile(gm)
    return gm


def _attention_problem(node: fx.Node, ctx: PassContext) -> str | None:
    p = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
    if p and ctx.plan.tp > 1:
        return (f"attention {node.name} ({module_path(node) or '<root>'}) has dropout_p={p}, "
                f"drawn by torch's RNG on each rank's heads under tp={ctx.plan.tp}, which "
                f"cannot equal one device's mask; set the attention dropout to 0 (dropout on "
                f"the attention output is exact), or use tp=1")
    return None


_OTHER_DROPOUTS = (aten.feature_dropout.default, aten.alpha_dropout.default,
                   aten.feature_alpha_dropout.default)
"""Channel-wise and alpha dropout (nn.Dropout1d/2d/3d, AlphaDropout): still torch's RNG."""


def _other_dropout_problem(node: fx.Node, ctx: PassContext) -> str | None:
    x, p, train = node.args[:3]
    plan = ctx.plan
    ranks = plan.tp * plan.cp * plan.pp * (plan.dp or 1)
    if not train or not p or ranks == 1:
        return None
    return (f"{node.name} ({module_path(node) or '<root>'}) is "
            f"aten.{node.target.__name__.split('.')[0]} "
            f"(p={p}), drawn by torch's RNG on each of the plan's {ranks} ranks, which cannot "
            f"equal one device's mask; use nn.Dropout (element-wise dropout is exact) or p=0")


def _batch(graph: fx.Graph) -> int | None:
    """Dim 0 of the model's first tensor input (the contract: inputs are (batch, ...))."""
    for node in graph.find_nodes(op="placeholder"):
        val = tensor_of(node)
        if val is not None and val.dim() >= 1:
            return int(val.shape[0])
    return None


def _remove(graph: fx.Graph, node: fx.Node, x: fx.Node) -> int:
    if node.target is aten.native_dropout.default:
        for user in list(node.users):  # (out, mask): out is x, the mask all True
            if user.args[1] == 0:
                user.replace_all_uses_with(x)
            else:
                with graph.inserting_before(user):
                    ones = graph.call_function(aten.ones_like.default, (x,),
                                               {"dtype": torch.bool})
                ones.meta = dict(user.meta)
                user.replace_all_uses_with(ones)
            graph.erase_node(user)
    else:
        node.replace_all_uses_with(x)
    graph.erase_node(node)
    return 1


def _replace(graph: fx.Graph, node: fx.Node, x: fx.Node, p: float, rows: int, spec: IndexSpec,
             seed: int) -> None:
    kept = {key: node.meta[key] for key in (meta.NN_MODULE_STACK, meta.TP_PLACEMENT)
            if key in node.meta}
    val = tensor_of(x)
    with graph.inserting_before(node):
        mask = graph.call_function(ops.dropout_mask,
                                   (x, p, seed, node_key(node.name), rows, spec.flat()))
        out = graph.call_function(aten.mul.Tensor, (x, mask))
    # in x's fake mode when it has one: a meta tensor beside fake ones would fail a later
    # pass that propagates values again (mixed_precision's fp32 casts)
    fake_mode = detect_fake_mode([val])
    for new in (mask, out):
        new.meta.update(kept)
        if fake_mode is None:
            new.meta["val"] = torch.empty_like(val, device="meta")
        else:
            with fake_mode:
                new.meta["val"] = torch.empty_like(val)
        new.meta[meta.DROPOUT] = node.name
    if node.target is aten.native_dropout.default:
        for user in list(node.users):
            if user.args[1] == 0:
                user.replace_all_uses_with(out)
            else:  # the keep mask as native_dropout gives it
                with graph.inserting_before(user):
                    keep = graph.call_function(aten.ne.Scalar, (mask, 0))
                keep.meta = dict(user.meta)
                user.replace_all_uses_with(keep)
            graph.erase_node(user)
    else:
        node.replace_all_uses_with(out)
    graph.erase_node(node)


# --- which full-size elements this rank holds ------------------------------------------------

def _spec(node: fx.Node, x: fx.Node, batch: int | None, ctx: PassContext,
          gm: fx.GraphModule) -> tuple[IndexSpec | None, int, str | None]:
    """(this rank's index spec, rows per sample, None) or (None, 0, why it cannot be drawn)."""
    where = f"{node.name} ({module_path(node) or '<root>'})"
    val = tensor_of(x)
    if val is None or val.dim() == 0:
        return None, 0, f"{where} drops a value that is not a tensor with a batch dim"
    if _reads_dispatched_rows(node, ctx):
        return None, 0, (f"{where} drops expert-dispatched rows under ep={ctx.plan.ep}, whose "
                         f"order depends on the routing; move the dropout outside the experts "
                         f"or use ep=1")
    shape = [int(s) for s in val.shape]
    full = list(shape)
    index: list[list[int] | None] = [None] * len(shape)  # local -> outer index, per dim
    tp_split = _tp_split(node, ctx, shape, full, index, where)
    if isinstance(tp_split, str):
        return None, 0, tp_split
    cp_problem = _cp_split(node, ctx, gm, full, index, where)
    if cp_problem:
        return None, 0, cp_problem
    if batch is None or full[0] % batch:
        return None, 0, (f"{where} drops a value of full shape {tuple(full)} whose dim 0 is not "
                         f"a multiple of the batch {batch}: the masks count rows of the global "
                         f"batch along dim 0, so the dropped value must be batch-first")
    indices = [list(range(size)) if idx is None else idx for size, idx in zip(full, index)]
    return IndexSpec.of(tuple(full), indices), full[0] // batch, None


def _tp_split(node, ctx, shape, full, index, where) -> str | None:
    """Undo the tp split (sp's sequence chunk included): full sizes and local -> full index."""
    placement = node.meta.get(meta.TP_PLACEMENT, Placements()).on("tp")
    tp, coord = ctx.plan.tp, ctx.coords.get("tp", 0)
    if isinstance(placement, Shard):
        if placement.padded is not None:
            return (f"{where} drops a vocabulary-padded shard (padded to {placement.padded}); "
                    f"drop the logits whole (a rules= 'replicate' for the head) or not at all")
        d, parts = placement.dim, tp // placement.replicas
        local = shape[d]
        full[d] = local * parts
        chunk = coord // placement.replicas
        sp = _sp_record(node)
        if sp is not None and sp.batch > 1 and d == 0 and full[d] == sp.batch * _row(node, sp):
            row = full[d] // sp.batch  # sp's flat split: each batch row's sequence chunked
            per = row // parts
            index[d] = [b * row + chunk * per + t for b in range(sp.batch) for t in range(per)]
        else:
            index[d] = list(range(chunk * local, (chunk + 1) * local))
    elif isinstance(placement, StridedShard):
        d = placement.dim
        full[d] = shape[d] * tp
        out, offset = [], 0
        for block in placement.blocks:
            per = block // tp
            out += range(offset + coord * per, offset + (coord + 1) * per)
            offset += block
        index[d] = out
    return None


def _sp_record(node: fx.Node):
    record = node.graph.owning_module.meta.get(meta.SP_RECORD)
    return record if record is not None and not record.stepped_aside else None


def _row(node: fx.Node, sp) -> int:
    """Tokens of one batch row at sp's level: cp's share of the sequence, or all of it."""
    record = node.graph.owning_module.meta.get(meta.CP_RECORD)
    if record is not None and record.layout is not None and meta.CP_DIM in node.meta:
        return record.layout.local
    return sp.seq


def _cp_split(node, ctx, gm, full, index, where) -> str | None:
    """Undo cp's sequence split (outside tp's): full sizes and local -> full index."""
    dim = node.meta.get(meta.CP_DIM)
    record = gm.meta.get(meta.CP_RECORD)
    if dim is None or record is None or record.layout is None:
        return None
    layout, seq = record.layout, record.length
    positions = layout.positions(record.rank).tolist()
    if isinstance(dim, Rows):
        d, batch = dim.dim, dim.batch
        if full[d] != batch * layout.local:
            return f"{where}: {full[d]} rows are not {batch} rows of {layout.local} tokens"
        outer = [b * seq + t for b in range(batch) for t in positions]
        full[d] = batch * seq
    elif isinstance(dim, int):
        d = dim
        if full[d] != layout.local:
            return (f"{where}: dim {d} holds {full[d]} of this cp rank's values, not its "
                    f"{layout.local} tokens; drop a (batch, seq, ...) value")
        outer = positions  # padded tokens (>= seq) are dropped outputs: any mask will do
        full[d] = seq
    else:
        return f"{where}: cp sharded it along {dim!r}"
    inner = index[d]
    index[d] = outer if inner is None else [outer[i] for i in inner]
    return None


def _reads_dispatched_rows(node: fx.Node, ctx: PassContext) -> bool:
    """Whether `node` lies between an expert dispatch and its return."""
    if ctx.plan.ep <= 1:
        return False
    seen, frontier = set(), [node]
    while frontier:
        current = frontier.pop()
        for arg in current.all_input_nodes:
            if arg in seen:
                continue
            seen.add(arg)
            if arg.target is ops.moe_return:
                continue  # rows already returned to their tokens
            if arg.target is ops.moe_dispatch:
                return True
            frontier.append(arg)
    return False


