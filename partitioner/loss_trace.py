"""The vocab-parallel loss path of `ParallelModel.step`: the user's cross-entropy computed from
logits that stay sharded over the vocabulary.

Two graphs meet here.
- The model's graph (the last pipeline stage's). passes.tensor_parallel's `vocab` rule ends the
  LM head with `all_gather(x, "tp", -1)` (+ `slice` back to the unpadded vocabulary) and returns
  the gathered logits; its record (`TensorParallelRecord.logits`) names those output leaves,
  their shard `x`, the vocabulary size and padding. `find_sharded_logits` reads the record and
  `local_logits_graph` copies the graph so that they return this rank's shard `x` instead:
  the gather never runs.
- The user's `loss_fn(output, target)`, traced once at the aten level on fake tensors with the
  shapes of the program's output and the target (`make_fx`, no memory). `vocab_parallel_loss`
  follows every use of the logits: layout ops (views, transposes, token-dim slices, dtype casts)
  are replayed on the shard, `log_softmax` over the vocabulary dim is dropped, and its uses,
  `nll_loss` (and label smoothing's sum of log-probabilities over the vocabulary), become
  `runtime.vocab_parallel` calls. Everything else in the loss (token counts, divisions, terms
  that do not read the logits) is copied as traced. Any other read of the logits (an MSE, a
  z-loss, a weighted nll_loss, the logits returned) means no vocab-parallel path: the result
  then says why, and `step` gathers the logits as before.

A traced loss is the loss at the traced shapes and Python values: `loss_fn` must be a pure
function of (output, target) (no side effects, no Python state that changes between steps).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx
from torch.utils import _pytree as pytree

from core.fx_utils import tensor_of
from core.meta import TP_RECORD
from passes.propagation import NotCarried, carry, propagate
from passes.tensor_parallel.record import ShardedLogits
from runtime.vocab_parallel import REDUCTIONS, reduce_nll, vocab_parallel_log_softmax_stats

aten = torch.ops.aten


# --- the model's side: which output leaves are vocab-parallel logits --------------------------

def find_sharded_logits(gm: fx.GraphModule) -> tuple[ShardedLogits, ...]:
    """The output leaves of `gm` that the tensor-parallel pass recorded as vocab-parallel logits
    gathered only to be returned (none on a pipeline stage that does not return the model's
    output, or without the pass)."""
    record = gm.meta.get(TP_RECORD)
    if record is None:
        return ()
    leaves = list(gm.graph.find_nodes(op="output")[0].args[0])
    return tuple(item for item in record.logits if item.leaf < len(leaves)
                 and isinstance(leaves[item.leaf], fx.Node)
                 and leaves[item.leaf].name == item.gathered[-1])


def local_logits_graph(gm: fx.GraphModule, sharded: tuple[ShardedLogits, ...]) -> fx.GraphModule:
    """A copy of `gm` whose `sharded` output leaves are the local shards (nothing gathers them).

    The copy reads the same parameters and submodules as `gm` (by reference) and keeps its
    calling convention.
    """
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen  # the model's pytree calling convention, if any
    env: dict[fx.Node, fx.Node] = {}
    output = None
    for node in gm.graph.nodes:
        if node.op == "output":
            output = node
            continue
        env[node] = graph.node_copy(node, lambda arg: env[arg])
    by_name = {node.name: node for node in gm.graph.nodes}
    leaves = list(output.args[0])
    for item in sharded:
        # what the all_gather reads: the shard, or what produces it after lowering moved the
        # LM head into a checkpointed region (sp's gathered input kept as a shard)
        leaves[item.leaf] = by_name[item.gathered[0]].args[0]
    graph.output(fx.map_arg(tuple(leaves), lambda arg: env[arg])).meta = dict(output.meta)
    for item in sharded:  # the slice, then the all_gather: nothing reads them now
        for name in reversed(item.gathered):
            graph.erase_node(env[by_name[name]])
    graph.lint()
    variant = fx.GraphModule(gm, graph)
    variant.meta.update(gm.meta)
    return variant


# --- the loss's side: trace it, follow the logits --------------------------------------------

@dataclass(frozen=True)
class CrossEntropyTerm:
    """One reduction over the vocabulary in the traced loss, now computed vocab-parallel."""

    op: str
    """"nll_loss" or "log_prob_sum" (label smoothing's sum of log-probabilities)."""
    node: str
    """The traced node it replaces."""
    leaf: int
    """The output leaf whose logits it reads."""
    reduction: str | None = None
    ignore_index: int | None = None

    def __str__(self) -> str:
        if self.op == "nll_loss":
            return (f"{self.node}: nll_loss(log_softmax(logits), reduction={self.reduction}, "
                    f"ignore_index={self.ignore_index})")
        return f"{self.node}: sum over the vocabulary of log_softmax(logits)"


@dataclass(frozen=True)
class VocabParallelLoss:
    """The user's loss, traced and reading local logits shards. Call it as the loss_fn:
    `loss(output_with_local_shards, target)`; its collectives name their group."""

    sharded: tuple[ShardedLogits, ...]
    terms: tuple[CrossEntropyTerm, ...]
    gm: fx.GraphModule = field(compare=False, repr=False)
    in_spec: pytree.TreeSpec = field(compare=False, repr=False)
    """Structure of (output, target) at trace time."""
    tensor_leaves: tuple[int, ...] = ()
    """Positions of the tensor leaves in that flattening: the graph's placeholders, in order."""
    result_spec: pytree.TreeSpec | None = field(default=None, compare=False, repr=False)

    def __call__(self, output, target):
        leaves, spec = pytree.tree_flatten((output, target))
        if spec != self.in_spec:
            raise ValueError(f"vocab-parallel loss traced for inputs {self.in_spec}, called with "
                             f"{spec}")
        result = self.gm(*(leaves[i] for i in self.tensor_leaves))
        return pytree.tree_unflatten(list(result), self.result_spec)

    def __str__(self) -> str:
        return (f"vocab-parallel cross-entropy: {'; '.join(map(str, self.sharded))}; "
                f"{'; '.join(map(str, self.terms))}")


@dataclass(frozen=True)
class LossPath:
    """How `step` computes the loss of a program: `loss` set = vocab-parallel, else gathered."""

    loss: VocabParallelLoss | None
    reason: str
    """Why the logits are gathered (or what the vocab-parallel path computes)."""

    @property
    def vocab_parallel(self) -> bool:
        return self.loss is not None

    def __str__(self) -> str:
        return str(self.loss) if self.loss is not None else f"gathered logits: {self.reason}"


def trace_loss(loss_fn: Callable, out_spec: pytree.TreeSpec, out_leaves: list,
               target, device) -> tuple[fx.GraphModule, pytree.TreeSpec, tuple[int, ...],
                                        pytree.TreeSpec]:
    """`loss_fn(output, target)` as an aten graph, traced on fake tensors (no memory).

    `out_leaves`: the model output's flat leaves, a tensor (fake or meta: only its shape and
    dtype are read) or the constant itself; `target` is the real target (only its shapes are
    used). Tensors are traced as fake tensors on `device`. Returns the graph
    (one placeholder per tensor leaf of (output, target), flat result leaves out), the spec of
    (output, target), the positions of its tensor leaves, and the result's spec.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    mode = FakeTensorMode(allow_non_fake_inputs=True)  # closure tensors become constants
    with mode:
        fake_out = [torch.empty(leaf.shape, dtype=leaf.dtype, device=device)
                    if isinstance(leaf, torch.Tensor) else leaf for leaf in out_leaves]
    fake_target = pytree.tree_map(
        lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x, target)
    leaves, in_spec = pytree.tree_flatten((pytree.tree_unflatten(fake_out, out_spec),
                                           fake_target))
    positions = tuple(i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor))
    result_specs = []

    def flat_loss(*tensors):
        full = list(leaves)
        for index, tensor in zip(positions, tensors, strict=True):
            full[index] = tensor
        output, tgt = pytree.tree_unflatten(full, in_spec)
        result_leaves, spec = pytree.tree_flatten(loss_fn(output, tgt))
        result_specs.append(spec)
        return tuple(result_leaves)

    gm = make_fx(flat_loss, tracing_mode="fake")(*(leaves[i] for i in positions))
    return gm, in_spec, positions, result_specs[-1]


def output_leaves(gm: fx.GraphModule) -> list:
    """The flat leaves of `gm`'s output as `trace_loss` wants them: each node's `meta["val"]`
    (shape and dtype), constants as they are."""
    output = gm.graph.find_nodes(op="output")[0]
    return [tensor_of(leaf) if isinstance(leaf, fx.Node) else leaf for leaf in output.args[0]]


def choose_loss_path(loss_fn: Callable | None, out_spec: pytree.TreeSpec, out_leaves: list,
                     sharded: tuple[ShardedLogits, ...], target, device,
                     group_names: dict[str, str] | None = None) -> LossPath:
    """Trace `loss_fn` and decide: a `VocabParallelLoss`, or None and the reason.

    `out_spec`/`out_leaves`: the model output's structure and leaves (`output_leaves`), with the
    full logits' shapes; `sharded`: those leaves `step` will hand over as local shards;
    `group_names`: mesh dim -> this rank's c10d group name (absent, or None: a group of one),
    fixed in the rewritten loss's collectives as lowering fixes them in the model's."""
    if not sharded:
        return LossPath(None, "the program's output has no vocab-parallel logits")
    if loss_fn is None:
        return LossPath(None, "no loss_fn: the model's own output is the loss")
    try:
        gm, in_spec, positions, result_spec = trace_loss(loss_fn, out_spec, out_leaves, target,
                                                         device)
    except Exception as error:  # noqa: BLE001 - any failure only means "gather the logits"
        first = (str(error).strip().splitlines() or [""])[0]
        return LossPath(None, f"loss_fn could not be traced on fake tensors "
                              f"({type(error).__name__}: {first})")
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    inputs = {}
    for item in sharded:  # output leaves come first in (output, target)
        if item.leaf in positions:
            inputs[placeholders[positions.index(item.leaf)]] = item
    rewritten = vocab_parallel_loss(gm, inputs, group_names or {})
    if isinstance(rewritten, str):
        return LossPath(None, rewritten)
    loss_gm, terms = rewritten
    loss = VocabParallelLoss(sharded=sharded, terms=terms, gm=loss_gm, in_spec=in_spec,
                             tensor_leaves=positions, result_spec=result_spec)
    return LossPath(loss, str(loss))


# --- following the logits through the traced loss ----------------------------------------------

@dataclass(frozen=True)
class _Track:
    """A value of the traced loss derived from sharded logits by layout ops only."""

    vocab_dim: int
    log_probs: bool
    """After log_softmax over the vocabulary (the shard still holds raw logits)."""
    sharded: ShardedLogits


def _shape(node) -> tuple[int, ...]:
    return tuple(tensor_of(node).shape)


LAYOUT_OPS = (
    aten.view.default, aten._unsafe_view.default, aten.reshape.default,  # (B, S, V) -> (B*S, V)
    aten.transpose.int, aten.permute.default, aten.t.default,  # class dim 1 for nll_loss2d
    aten.slice.Tensor, aten.select.int,  # logits[:, :-1] (shifted labels)
    aten.unsqueeze.default, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.clone.default, aten.alias.default,  # .contiguous()
    aten._to_copy.default,  # .float() before log_softmax
)
"""Ops that only rearrange the logits: replayed on the shard while the vocabulary stays whole."""
VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _layout(node: fx.Node, src: fx.Node, track: _Track) -> int | None:
    """Where a layout op puts the vocabulary dim (the shared propagation table), or None when
    it does not keep the vocabulary whole (a slice of it, or a view that merges or splits
    it)."""
    if node.target is aten._to_copy.default and set(node.kwargs) - {"dtype", "memory_format"}:
        return None  # a move to another device, not a dtype cast
    try:
        dim = carry(node, {src: track.vocab_dim})
    except NotCarried:
        return None
    if dim is None or _shape(node)[dim] != _shape(src)[track.vocab_dim]:
        return None
    return dim


LOG_SOFTMAX = (aten._log_softmax.default, aten.log_softmax.int)

NLL_TUPLE = (aten.nll_loss_forward.default, aten.nll_loss2d_forward.default)
"""nll_loss ops returning (loss, total_weight)."""
NLL_PLAIN = (aten.nll_loss.default, aten.nll_loss_nd.default)
"""nll_loss ops returning the loss alone (traces that keep them undecomposed)."""


def _op_name(node: fx.Node) -> str:
    return str(node.target) if isinstance(node.target, torch._ops.OpOverload) else getattr(
        node.target, "__name__", str(node.target))


def _nll_args(node: fx.Node):
    """(target, weight, reduction index, ignore_index) of an nll_loss node."""
    names = ("self", "target", "weight", "reduction", "ignore_index")
    bound = {"weight": None, "reduction": 1, "ignore_index": -100}  # aten's defaults
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound["target"], bound["weight"], bound["reduction"], bound["ignore_index"]


def vocab_parallel_loss(gm: fx.GraphModule, logits: dict[fx.Node, ShardedLogits],
                        group_names: dict[str, str]):
    """Rewrite a traced loss to read logits shards: (GraphModule, terms), or the reason (str)
    why some use of the logits cannot be computed vocab-parallel."""
    follow = _Follow()
    seeds = {ph: _Track(item.dim, False, item) for ph, item in logits.items()}
    followed = propagate(gm.graph.nodes, seeds, follow)
    if followed.stopped:  # the first use in graph order that is not a cross-entropy
        return str(next(iter(followed.stopped.values())))
    if not any(term.op == "nll_loss" for term in follow.terms):
        return "the loss computes no cross-entropy of the logits"
    return _rebuild(gm, followed.dims, follow.actions, group_names), tuple(follow.terms)


class _Follow:
    """The propagation rule of the logits through a traced loss: each use of them (or of what
    they became) returns its `_Track` and notes the action that replays it on the shard, or
    raises NotCarried with the reason the loss cannot run vocab-parallel."""

    def __init__(self) -> None:
        self.actions: dict[fx.Node, tuple] = {}
        self.terms: list[CrossEntropyTerm] = []

    def __call__(self, node: fx.Node, tracks) -> _Track | None:
        reads = [arg for arg in node.all_input_nodes if arg in tracks]
        if node.op == "output":
            raise NotCarried("the loss returns the logits (or their log-probabilities)")
        where = f"{node.name} ({_op_name(node)})"
        if len(set(reads)) > 1 or node.op != "call_function" or node.args[0] is not reads[0]:
            raise NotCarried(f"{where} reads the logits in a way other than a cross-entropy")
        src, track = reads[0], tracks[reads[0]]
        if node.target in LAYOUT_OPS:
            return self.layout(node, src, track, where)
        if node.target in LOG_SOFTMAX:
            return self.log_softmax(node, src, track, where)
        if node.target in NLL_TUPLE + NLL_PLAIN:
            return self.nll(node, src, track, where)
        if node.target is aten.sum.dim_IntList and track.log_probs:
            return self.log_prob_sum(node, src, track, where)
        raise NotCarried(f"{where} reads the logits, and it is not a cross-entropy over the "
                         f"vocabulary")

    def layout(self, node, src, track: _Track, where: str) -> _Track:
        """Replayed on the shard (a view's new shape gets the shard's width)."""
        if node.target is aten._to_copy.default and track.log_probs:
            raise NotCarried(f"{where} casts the log-probabilities (only the logits may be "
                             f"cast)")
        vocab_dim = _layout(node, src, track)
        if vocab_dim is None:
            raise NotCarried(f"{where} does not keep the vocabulary dim whole")
        args = node.args
        if node.target in VIEWS:
            shape = list(_shape(node))
            shape[vocab_dim] = track.sharded.local_vocab
            args = (node.args[0], shape)
        self.actions[node] = ("layout", args, node.kwargs)
        return _Track(vocab_dim, track.log_probs, track.sharded)

    def log_softmax(self, node, src, track: _Track, where: str) -> _Track:
        """Dropped: the shard stays raw logits, the vocab-parallel statistics normalize."""
        dim = node.args[1] % len(_shape(src))
        if track.log_probs or dim != track.vocab_dim:
            raise NotCarried(f"{where} is not a log_softmax of the logits over the vocabulary "
                             f"dim")
        dtype = tensor_of(node).dtype
        self.actions[node] = ("log_softmax", dtype if dtype != tensor_of(src).dtype else None)
        return _Track(track.vocab_dim, True, track.sharded)

    def nll(self, node, src, track: _Track, where: str) -> None:
        """nll_loss of the log-probabilities: a vocab-parallel cross-entropy term."""
        target, weight, reduction, ignore_index = _nll_args(node)
        class_dim = 0 if len(_shape(src)) == 1 else 1
        if not track.log_probs:
            raise NotCarried(f"{where} takes the logits, not their log_softmax")
        if class_dim != track.vocab_dim:
            raise NotCarried(f"{where} reduces over dim {class_dim}, not the vocabulary")
        if weight is not None:
            raise NotCarried(f"{where} weights the classes (weight=...)")
        if node.target in NLL_TUPLE:
            for user in node.users:
                if user.target is not operator.getitem or (user.args[1] != 0 and user.users):
                    raise NotCarried(f"{user.name} reads nll_loss's total_weight")
                self.actions[user] = ("first", node) if user.args[1] == 0 else ("drop",)
        self.actions[node] = ("nll", src, target, REDUCTIONS[reduction], ignore_index)
        self.terms.append(CrossEntropyTerm("nll_loss", node.name, track.sharded.leaf,
                                           REDUCTIONS[reduction], ignore_index))
        return None

    def log_prob_sum(self, node, src, track: _Track, where: str) -> None:
        """Label smoothing's sum of the log-probabilities over the vocabulary."""
        dims = node.args[1] if len(node.args) > 1 else None
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        rank = len(_shape(src))
        if (dims is None or [d % rank for d in dims] != [track.vocab_dim]
                or node.kwargs.get("dtype") is not None):
            raise NotCarried(f"{where} sums the log-probabilities over other dims than the "
                             f"vocabulary")
        self.actions[node] = ("log_prob_sum", src, keepdim)
        self.terms.append(CrossEntropyTerm("log_prob_sum", node.name, track.sharded.leaf))
        return None


def _rebuild(gm: fx.GraphModule, tracks: dict, actions: dict,
             group_names: dict[str, str]) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    stats: dict[tuple, fx.Node] = {}  # (log-probs node, target node) -> stats call
    preferred_target = {}  # a log-prob sum shares the stats call of an nll on the same value
    for action in actions.values():
        if action[0] == "nll":
            preferred_target.setdefault(action[1], action[2])

    def stats_of(src: fx.Node, target: fx.Node | None) -> fx.Node:
        if target is None:
            known = preferred_target.get(src)
            target = known if known in env else None
            existing = [call for (value, _), call in stats.items() if value is src]
            if target is None and existing:
                return existing[0]
        key = (src, target)
        if key not in stats:
            item = tracks[src]
            stats[key] = graph.call_function(vocab_parallel_log_softmax_stats, (
                env[src], None if target is None else env[target],
                group_names.get(item.sharded.mesh_dim),
                item.vocab_dim, item.sharded.vocab_size))
        return stats[key]

    for node in gm.graph.nodes:
        action = actions.get(node)
        if action is None:
            env[node] = graph.node_copy(node, lambda arg: env[arg])
            continue
        kind = action[0]
        if kind == "layout":
            args, kwargs = fx.map_arg((action[1], action[2]), lambda arg: env[arg])
            env[node] = graph.call_function(node.target, args, kwargs)
        elif kind == "log_softmax":  # the shard stays raw logits; the stats normalize
            src = env[node.args[0]]
            env[node] = src if action[1] is None else graph.call_function(
                aten._to_copy.default, (src,), {"dtype": action[1]})
        elif kind == "nll":
            _, src, target, reduction, ignore_index = action
            nll = graph.call_function(operator.getitem, (stats_of(src, target), 0))
            env[node] = graph.call_function(reduce_nll, (
                nll, env[target], ignore_index, reduction, tracks[src].sharded.vocab_size))
        elif kind == "first":
            env[node] = env[action[1]]
        elif kind == "log_prob_sum":
            _, src, keepdim = action
            total = graph.call_function(operator.getitem, (stats_of(src, None), 1))
            env[node] = (graph.call_function(aten.unsqueeze.default,
                                             (total, tracks[src].vocab_dim))
                         if keepdim else total)
        # "drop": nll_loss's total_weight, which nothing reads
    graph.lint()
    return fx.GraphModule(gm, graph)
