"""Batch statistics: reductions over the tokens of the whole batch, made whole over dp.

A model may reduce over its batch inside the forward: a router's load-balancing loss (Switch
Transformer; Hugging Face Mixtral's `output_router_logits`) multiplies the fraction of tokens
and the mean router probability per expert, each a sum over every token. Under dp each rank
runs the graph on its share of the batch, so such a reduction sees only its own tokens: another
value, and router gradients tens of percent off, silently.

The graph cannot say which of its dims count tokens, but two captures can: the pass compares
the graph with the same model captured at dp times the batch (`PassContext.capture_batch`). A
dim whose size changed counts the batch's tokens; a reduction whose input has such a dim and
whose output has none reduces over the batch. After each, it inserts `core.ops.batch_statistic`
over dp (a sum for sums and counts, a mean for means) whose backward reduces the gradient the
same way (each rank's loss reads the reduced value and is scaled by 1/dp), and the constants
downstream that changed with the batch take their whole-batch value (a token count the model
divides by, as Hugging Face's `total_rows`). The value then equals one device's on the dp
ranks' microbatches put together: with microbatches, the reference is the single-device model
run on each global microbatch (`partitioner.check.global_microbatches`).

Left alone: losses (cross_entropy, nll_loss, ...), which the runtime already averages over dp
with the rest of the loss. Refused: reductions a sum cannot make whole (max, min, var,
logsumexp over tokens). Other ops that turn token values into token-free ones are listed in the record (their results
depend on the rank's share). Forward calls (`forward_only`) hold the whole batch on every rank,
so their programs need no statistic made whole.
"""

from __future__ import annotations

import difflib
import logging
import operator
from dataclasses import dataclass

import torch
from torch import fx

from core import meta, ops
from core.fx_utils import norm_dim, tensor_of
from passes import PassContext, PassError, recompile

log = logging.getLogger(__name__)
aten = torch.ops.aten

MESH_DIM = "dp"


def _ops(*names: str) -> frozenset:
    found = set()
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet, None), overload, None)
        if op is not None:
            found.add(op)
    return frozenset(found)


SUMS = _ops("sum.default", "sum.dim_IntList", "nansum.default", "histc.default",
            "bincount.default", "scatter_add.default", "index_add.default",
            "count_nonzero.default", "count_nonzero.dim_IntList")
"""Reductions that add over the tokens: whole after a sum over dp."""
MEANS = _ops("mean.default", "mean.dim", "nanmean.default")
"""Reductions that average over the tokens: whole after a mean over dp (equal shares)."""
CONTRACTIONS = _ops("mm.default", "bmm.default", "matmul.default", "einsum.default",
                    "dot.default")
"""Products that may contract the token dim: a sum over it, whole after a sum over dp."""
NOT_WHOLE = _ops("amax.default", "amin.default", "max.default", "min.default", "var.correction",
                 "var.dim", "std.correction", "std.dim", "var_mean.correction",
                 "logsumexp.default", "prod.default", "prod.dim_int", "median.default",
                 "norm.ScalarOpt_dim", "linalg_vector_norm.default")
"""Reductions over the tokens that no all-reduce of this rank's result makes whole."""
LOSSES = _ops("cross_entropy_loss.default", "nll_loss.default", "nll_loss_forward.default",
              "nll_loss2d.default", "nll_loss_nd.default", "mse_loss.default",
              "l1_loss.default", "smooth_l1_loss.default", "huber_loss.default",
              "binary_cross_entropy.default", "binary_cross_entropy_with_logits.default",
              "kl_div.default")
"""Loss ops: the runtime averages each rank's loss over dp, as for a loss the user computes."""
_ALWAYS_CANDIDATES = _ops("histc.default", "bincount.default", "scatter_add.default",
                          "index_add.default")


@dataclass(frozen=True)
class Statistic:
    node: str
    """The reduction made whole."""
    op: str
    reduction: str
    """"sum" or "mean" over dp."""


@dataclass(frozen=True)
class WholeBatchConstant:
    node: str
    local: float
    whole: float


@dataclass(frozen=True)
class BatchStatisticsRecord:
    statistics: tuple[Statistic, ...] = ()
    constants: tuple[WholeBatchConstant, ...] = ()
    per_rank: tuple[str, ...] = ()
    """Nodes whose token-free result still depends on this rank's share (ops the pass does not
    know): `op at node`."""
    dp: int = 1
    whole_batch_only: bool = False
    """Compiled for forward calls (each holding the whole batch) from a graph that may reduce
    over the batch: it must not serve `step`, whose ranks hold shares."""

    def summary(self) -> str:
        if self.whole_batch_only:
            return "forward calls hold the whole batch: nothing reduced over dp"
        if not self.statistics:
            return "no reduction over the batch's tokens" + (
                f"; per rank: {', '.join(self.per_rank)}" if self.per_rank else "")
        made = ", ".join(f"{s.node} ({s.op}: {s.reduction})" for s in self.statistics)
        text = f"{len(self.statistics)} reductions over the batch made whole over dp={self.dp}: " \
               f"{made}"
        if self.constants:
            text += "; token counts " + ", ".join(f"{c.node} {c.local:g}->{c.whole:g}"
                                                   for c in self.constants)
        if self.per_rank:
            text += f"; left per rank: {', '.join(self.per_rank)}"
        return text

    def __str__(self) -> str:
        """What `explain()` shows: each statistic, and what it equals on one device."""
        lines = [f"batch statistics: {self.summary()}"]
        if self.statistics:
            lines.append("  each equals one device's on the dp ranks' microbatches put together "
                         "(with microbatches: one device run on each global microbatch, "
                         "partitioner.check.global_microbatches)")
        return "\n".join(lines)


def batch_statistics(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    dp = ctx.plan.dp
    graphs = _graphs(gm)
    candidates = [node for module in graphs.values() for node in module.graph.nodes
                  if _may_reduce_the_batch(node)]
    if not candidates or ctx.forward_only:
        gm.meta[meta.STATISTICS_RECORD] = BatchStatisticsRecord(
            dp=dp, whole_batch_only=bool(candidates))
        return gm
    if ctx.capture_batch is None:
        raise PassError(f"dp={dp}: {', '.join(n.name for n in candidates)} may reduce over the "
                        f"batch's tokens, which only a capture of the model at dp times the "
                        f"batch can tell; compile with the model at hand (parallelize)")
    wholes = _graphs(ctx.capture_batch(dp))
    statistics, constants, refused, per_rank = [], [], [], []
    for path, module in graphs.items():
        whole = (_twins(module.graph, wholes[path].graph) if path in wholes else {})
        made, token_dims = _make_graph_whole(module, whole, dp, refused, per_rank)
        statistics += made
        if made:
            constants += _whole_batch_constants(module, made, token_dims, whole)
            module.graph.lint()
            recompile(module)
    if refused:
        raise PassError(
            f"dp={dp}: the model reduces over the batch's tokens with "
            f"{', '.join(f'{n.target} at {n.name}' for n in refused)}; each rank holds its "
            f"share of the batch, and no all-reduce of a share's result gives the whole "
            f"batch's (only sums and means can be made whole). Use dp=1 (tp, pp, ep split "
            f"no batch), or compute the statistic from sums or means")
    if per_rank:
        log.warning("dp=%d: results that depend on each rank's share of the batch, left per "
                    "rank: %s", dp, ", ".join(per_rank))
    gm.meta[meta.STATISTICS_RECORD] = BatchStatisticsRecord(
        tuple(statistics), tuple(constants), tuple(per_rank), dp)
    return gm


def _graphs(gm: fx.GraphModule) -> dict[str, fx.GraphModule]:
    """The graph and the graphs of its higher-order ops (a `torch.no_grad()` block exports as
    one: DeepSeek's bias update from token counts sits in such a graph), by module path."""
    return {path: module for path, module in gm.named_modules()
            if isinstance(module, fx.GraphModule)}


def _twins(ours: fx.Graph, whole: fx.Graph) -> dict[fx.Node, fx.Node]:
    """Each node of `ours` -> the node computing the same value in `whole` (the capture at dp
    times the batch). Export specializes sizes of 1, so at a batch of 1 a graph may lack a
    no-op `expand` or `contiguous` the larger one has (and node names shift after it): the
    two are aligned by their ops in order, and a pair is kept only when its inputs are pairs
    too (reading through the whole graph's unpaired single-input nodes)."""
    mine, theirs = list(ours.nodes), list(whole.nodes)
    matcher = difflib.SequenceMatcher(a=[_op_key(n) for n in mine],
                                      b=[_op_key(n) for n in theirs], autojunk=False)
    twins = {mine[block.a + i]: theirs[block.b + i]
             for block in matcher.get_matching_blocks() for i in range(block.size)}
    paired = set(twins.values())

    def through(value: fx.Node) -> fx.Node:
        while value not in paired and len(value.all_input_nodes) == 1:
            value = value.all_input_nodes[0]
        return value

    for node in mine:  # in order: an input unpaired before unpairs its users
        twin = twins.get(node)
        if twin is None:
            continue
        inputs, twin_inputs = node.all_input_nodes, [through(a) for a in twin.all_input_nodes]
        if len(inputs) != len(twin_inputs) or any(
                twins.get(a) is not b for a, b in zip(inputs, twin_inputs)):
            del twins[node]
            paired.discard(twin)
    return twins


def _op_key(node: fx.Node) -> tuple:
    return (node.op, str(node.target) if node.op != "placeholder" else node.name)


def _make_graph_whole(gm: fx.GraphModule, whole: dict[fx.Node, fx.Node], dp: int,
                      refused: list, per_rank: list) -> tuple[list[Statistic], dict]:
    """In one graph: each reduction over the batch's tokens made whole over dp (the nodes a
    sum cannot make whole go to `refused`, unknown ones to `per_rank`); the statistics, and
    each node's token dims."""
    token_dims = {node: _grown_dims(node, whole.get(node)) for node in gm.graph.nodes}
    statistics = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target in LOSSES or node.target in ops.GROUPED:
            continue
        inputs = [a for a in node.all_input_nodes if token_dims.get(a)]
        if not inputs or token_dims.get(node) or tensor_of(node) is None:
            continue  # reads no token dim, or its output still has one
        if node not in whole:
            raise PassError(f"dp={dp}: {node.name} ({node.target}) turns values over the "
                            f"batch's tokens into one without, but the graph captured at dp "
                            f"times the batch has no such node (the model's graph depends on "
                            f"the batch size), so whether it must be reduced over dp cannot "
                            f"be told; use dp=1 or make the graph independent of the batch")
        reduction = _reduction(node)
        if reduction is None:
            if node.target in NOT_WHOLE:
                refused.append(node)
            elif node.target is not operator.getitem:
                per_rank.append(f"{node.target} at {node.name}")
            continue
        if _indexes_own_tokens(node, token_dims):
            continue  # counts of this rank's rows used to lay them out: they stay per rank
        statistics.append(_make_whole(gm, node, reduction))
    return statistics, token_dims


def _may_reduce_the_batch(node: fx.Node) -> bool:
    """Cheap filter before a second capture: a sum or mean over dim 0 or over everything, a
    count, or a reduction that cannot be made whole (tokens lead their values: the batch, or
    rows of batch x sequence)."""
    if node.op != "call_function":
        return False
    if node.target in _ALWAYS_CANDIDATES:
        return True
    if node.target not in SUMS | MEANS | NOT_WHOLE:
        return False
    x = node.args[0] if node.args else None
    val = tensor_of(x) if isinstance(x, fx.Node) else None
    if val is None:
        return False
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None or dims == []:
        return True
    dims = [dims] if isinstance(dims, int) else dims
    return 0 in {norm_dim(d, val.dim()) for d in dims}


def _grown_dims(node: fx.Node, whole: fx.Node | None) -> frozenset[int]:
    """The dims of `node`'s tensor that are larger in the capture at dp times the batch."""
    if whole is None:
        return frozenset()
    ours, theirs = tensor_of(node), tensor_of(whole)
    if ours is None or theirs is None or ours.dim() != theirs.dim():
        return frozenset()
    return frozenset(d for d, (a, b) in enumerate(zip(ours.shape, theirs.shape)) if a != b)


def _indexes_own_tokens(node: fx.Node, token_dims: dict) -> bool:
    """Whether the reduction's result, once turned into integers, meets values over the batch's
    tokens again: counts used as offsets or indices of this rank's own rows (the group offsets
    of Hugging Face's grouped_mm, computed with histc over the chosen experts), which must stay
    this rank's. A floating statistic meeting tokens again (a normalization over the batch
    written with means) is the whole batch's, as on one device; torch's batch_norm op is one
    op whose outputs keep the batch, so it stays per rank (DDP without SyncBatchNorm)."""
    frontier, seen = [(node, False)], set()
    while frontier:
        value, integral = frontier.pop()
        for user in value.users:
            val = tensor_of(user)
            now = integral or (val is not None and not val.is_floating_point())
            if now and token_dims.get(user):
                return True
            if (user, now) not in seen:
                seen.add((user, now))
                frontier.append((user, now))
    return False


def _reduction(node: fx.Node) -> str | None:
    """"sum" or "mean" when `node` reduces its inputs' token dims away and a sum or mean over
    dp makes it whole; None when it does not."""
    if node.target in SUMS or node.target in CONTRACTIONS:
        return "sum"
    if node.target in MEANS:
        return "mean"
    return None


def _make_whole(gm: fx.GraphModule, node: fx.Node, reduction: str) -> Statistic:
    users = list(node.users)
    with gm.graph.inserting_after(node):
        whole = gm.graph.call_function(ops.batch_statistic, (node, MESH_DIM, reduction == "mean"))
    whole.meta["val"] = node.meta.get("val")
    for user in users:
        user.replace_input_with(node, whole)
    return Statistic(node.name, str(node.target).removeprefix("aten."), reduction)


def _whole_batch_constants(gm: fx.GraphModule, statistics: list[Statistic], token_dims: dict,
                           whole: dict[fx.Node, fx.Node]) -> list[WholeBatchConstant]:
    """Numbers in the ops downstream of the statistics (on values without token dims) that the
    whole batch's capture holds otherwise: token counts the model divides by."""
    by_name = {node.name: node for node in gm.graph.nodes}
    frontier = [by_name[s.node] for s in statistics]
    seen: set[fx.Node] = set()
    changed = []
    while frontier:
        node = frontier.pop()
        for user in list(node.users):  # setting a user's args re-registers it
            if user in seen:
                continue
            seen.add(user)
            frontier.append(user)
            twin = whole.get(user)
            if twin is None or token_dims.get(user) or user.target is not twin.target:
                continue
            args = list(user.args)
            for i, (ours, theirs) in enumerate(zip(user.args, twin.args)):
                if _is_number(ours) and _is_number(theirs) and ours != theirs:
                    args[i] = theirs
                    changed.append(WholeBatchConstant(user.name, float(ours), float(theirs)))
            user.args = tuple(args)
    return changed


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
