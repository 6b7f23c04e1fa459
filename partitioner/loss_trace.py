"""The vocab-parallel loss path of `ParallelModel.step`: the user's cross-entropy computed from
logits that stay sharded over the vocabulary.

Two graphs meet here.
- The model's graph (the last pipeline stage's). passes.tensor_parallel's `vocab` rule ends the
  LM head with `all_gather(x, "tp", -1)` (+ `slice` back to the unpadded vocabulary) and returns
  the gathered logits. `find_sharded_logits` recognizes such output leaves and
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

import math
import operator
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import fx
from torch.utils import _pytree as pytree

from core.ops import all_gather
from runtime.vocab_parallel import REDUCTIONS, reduce_nll, vocab_parallel_log_softmax_stats

aten = torch.ops.aten


# --- the model's side: which output leaves are gathered logits ---------------------------------

@dataclass(frozen=True)
class ShardedLogits:
    """An output leaf that is logits gathered over the vocabulary, and the shard behind it."""

    leaf: int
    """Position among the graph output's flat leaves."""
    shard: str
    """Node holding this rank's columns (the LM head's local output)."""
    gathered: tuple[str, ...]
    """The nodes that rebuild the full logits from the shard (all_gather, then slice)."""
    mesh_dim: str
    dim: int
    """The vocabulary dim (non-negative)."""
    vocab_size: int
    padded_vocab: int
    local_vocab: int
    """Columns per rank: padded_vocab / group size."""

    def __str__(self) -> str:
        padding = (f", vocabulary {self.vocab_size} padded to {self.padded_vocab}"
                   if self.padded_vocab != self.vocab_size else "")
        return (f"output leaf {self.leaf} stays sharded over {self.mesh_dim} "
                f"({self.local_vocab} of {self.padded_vocab} columns a rank{padding})")


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _gathered_logits(leaf: fx.Node) -> ShardedLogits | None:
    """`all_gather(x, dim, d)` or `slice(all_gather(x, dim, d), d, 0, vocab)` read only by the
    graph output; None when `leaf` is something else."""
    out = _val(leaf)
    if out is None or out.dim() == 0:
        return None
    gather, chain = leaf, [leaf.name]
    if leaf.target is aten.slice.Tensor:
        gather = leaf.args[0]
        if not isinstance(gather, fx.Node) or len(gather.users) != 1:
            return None
        chain.insert(0, gather.name)
    if (gather.op != "call_function" or gather.target is not all_gather
            or set(gather.kwargs) - {"group_size"}):  # a lowered gather carries its group size
        return None
    shard, mesh_dim, tensor_dim = gather.args
    full, local = _val(gather), _val(shard)
    if full is None or local is None:
        return None
    dim = tensor_dim % full.dim()
    if gather is not leaf:  # the padding slice: [0, vocab) along the gathered dim, step 1
        _, slice_dim, start, end, *step = leaf.args
        if (slice_dim % full.dim() != dim or start not in (0, None) or step not in ([], [1])
                or end != out.shape[dim]):
            return None
    # leaf=-1: the caller knows the leaf's position
    return ShardedLogits(leaf=-1, shard=shard.name, gathered=tuple(chain), mesh_dim=mesh_dim,
                         dim=dim, vocab_size=out.shape[dim], padded_vocab=full.shape[dim],
                         local_vocab=local.shape[dim])


def find_sharded_logits(gm: fx.GraphModule) -> tuple[ShardedLogits, ...]:
    """The output leaves of `gm` that are vocab-parallel logits gathered only to be returned."""
    output = gm.graph.find_nodes(op="output")[0]
    leaves = list(output.args[0])
    found = []
    for index, leaf in enumerate(leaves):
        if not isinstance(leaf, fx.Node) or leaves.count(leaf) != 1 or len(leaf.users) != 1:
            continue  # read inside the model too: the full logits are needed anyway
        match = _gathered_logits(leaf)
        if match is not None:
            found.append(replace(match, leaf=index))
    return tuple(found)


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
        leaves[item.leaf] = by_name[item.shard]
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
    return [_val(leaf) if isinstance(leaf, fx.Node) else leaf for leaf in output.args[0]]


def choose_loss_path(loss_fn: Callable | None, out_spec: pytree.TreeSpec, out_leaves: list,
                     sharded: tuple[ShardedLogits, ...], target, device) -> LossPath:
    """Trace `loss_fn` and decide: a `VocabParallelLoss`, or None and the reason.

    `out_spec`/`out_leaves`: the model output's structure and leaves (`output_leaves`), with the
    full logits' shapes; `sharded`: those leaves `step` will hand over as local shards."""
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
    rewritten = vocab_parallel_loss(gm, inputs)
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
    return tuple(_val(node).shape)


def _view(node, vocab_dim: int, width: int):
    """view/reshape that keeps the vocabulary dim whole (only token dims merge or split)."""
    src, out = _shape(node.args[0]), _shape(node)
    before = math.prod(src[:vocab_dim])
    for j, size in enumerate(out):
        if math.prod(out[:j]) == before and size == src[vocab_dim]:
            shape = list(out)
            shape[j] = width
            return j, (node.args[0], shape), node.kwargs
    return None


def _transpose(node, vocab_dim: int, width: int):
    rank = len(_shape(node))
    a, b = node.args[1] % rank, node.args[2] % rank
    return {a: b, b: a}.get(vocab_dim, vocab_dim), node.args, node.kwargs


def _permute(node, vocab_dim: int, width: int):
    rank = len(_shape(node))
    return [d % rank for d in node.args[1]].index(vocab_dim), node.args, node.kwargs


def _t(node, vocab_dim: int, width: int):
    return (1 - vocab_dim if len(_shape(node)) == 2 else vocab_dim), node.args, node.kwargs


def _slice(node, vocab_dim: int, width: int):
    """Slices of token dims (a shifted label window); of the vocabulary only the whole of it."""
    src = _shape(node.args[0])
    defaults = (0, None, None, 1)  # slice.Tensor(self, dim=0, start=None, end=None, step=1)
    dim, start, end, step = tuple(node.args[1:]) + defaults[len(node.args) - 1:]
    if dim % len(src) == vocab_dim and (start not in (0, None) or step != 1
                                        or (end is not None and end < src[vocab_dim])):
        return None
    return vocab_dim, node.args, node.kwargs


def _select(node, vocab_dim: int, width: int):
    dim = node.args[1] % len(_shape(node.args[0]))
    if dim == vocab_dim:
        return None
    return vocab_dim - (dim < vocab_dim), node.args, node.kwargs


def _unsqueeze(node, vocab_dim: int, width: int):
    dim = node.args[1] % len(_shape(node))
    return vocab_dim + (dim <= vocab_dim), node.args, node.kwargs


def _squeeze(node, vocab_dim: int, width: int):
    src, out = _shape(node.args[0]), _shape(node)
    if node.target is aten.squeeze.default:
        dims = range(len(src))
    else:
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
    removed = {d % len(src) for d in dims if src[d % len(src)] == 1} if src else set()
    if vocab_dim in removed or len(out) != len(src) - len(removed):
        return None
    return vocab_dim - sum(d < vocab_dim for d in removed), node.args, node.kwargs


def _same(node, vocab_dim: int, width: int):
    return vocab_dim, node.args, node.kwargs


def _cast(node, vocab_dim: int, width: int):
    """A dtype cast (logits.float()), not a move to another device."""
    if set(node.kwargs) - {"dtype", "memory_format"}:
        return None
    return vocab_dim, node.args, node.kwargs


# Ops that only rearrange the logits: (node, vocab dim, shard width) -> (vocab dim after,
# args, kwargs to replay on the shard) or None when the op does not keep the vocabulary whole.
LAYOUT_RULES = {
    aten.view.default: _view,              # (B, S, V) -> (B*S, V): shape gets the shard width
    aten._unsafe_view.default: _view,
    aten.reshape.default: _view,
    aten.transpose.int: _transpose,        # class dim to 1 for nll_loss2d
    aten.permute.default: _permute,
    aten.t.default: _t,
    aten.slice.Tensor: _slice,             # logits[:, :-1] (shifted labels)
    aten.select.int: _select,
    aten.unsqueeze.default: _unsqueeze,
    aten.squeeze.default: _squeeze,
    aten.squeeze.dim: _squeeze,
    aten.squeeze.dims: _squeeze,
    aten.clone.default: _same,             # .contiguous()
    aten.alias.default: _same,
    aten._to_copy.default: _cast,          # .float() before log_softmax
}

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


def vocab_parallel_loss(gm: fx.GraphModule, logits: dict[fx.Node, ShardedLogits]):
    """Rewrite a traced loss to read logits shards: (GraphModule, terms), or the reason (str)
    why some use of the logits cannot be computed vocab-parallel."""
    tracks = {ph: _Track(item.dim, False, item) for ph, item in logits.items()}
    actions: dict[fx.Node, tuple] = {}
    terms: list[CrossEntropyTerm] = []
    for node in gm.graph.nodes:
        reads = [arg for arg in node.all_input_nodes if arg in tracks]
        if not reads:
            continue
        if node.op == "output":
            return "the loss returns the logits (or their log-probabilities)"
        where = f"{node.name} ({_op_name(node)})"
        if len(set(reads)) > 1 or node.op != "call_function" or node.args[0] is not reads[0]:
            return f"{where} reads the logits in a way other than a cross-entropy"
        src = reads[0]
        track = tracks[src]
        width = track.sharded.local_vocab
        if node.target in LAYOUT_RULES:
            if node.target is aten._to_copy.default and track.log_probs:
                return f"{where} casts the log-probabilities (only the logits may be cast)"
            rule = LAYOUT_RULES[node.target](node, track.vocab_dim, width)
            if rule is None:
                return f"{where} does not keep the vocabulary dim whole"
            vocab_dim, args, kwargs = rule
            tracks[node] = _Track(vocab_dim, track.log_probs, track.sharded)
            actions[node] = ("layout", args, kwargs)
        elif node.target in LOG_SOFTMAX:
            dim = node.args[1] % len(_shape(src))
            if track.log_probs or dim != track.vocab_dim:
                return f"{where} is not a log_softmax of the logits over the vocabulary dim"
            tracks[node] = _Track(track.vocab_dim, True, track.sharded)
            dtype = _val(node).dtype
            actions[node] = ("log_softmax", dtype if dtype != _val(src).dtype else None)
        elif node.target in NLL_TUPLE + NLL_PLAIN:
            target, weight, reduction, ignore_index = _nll_args(node)
            class_dim = 0 if len(_shape(src)) == 1 else 1
            if not track.log_probs:
                return f"{where} takes the logits, not their log_softmax"
            if class_dim != track.vocab_dim:
                return f"{where} reduces over dim {class_dim}, not the vocabulary"
            if weight is not None:
                return f"{where} weights the classes (weight=...)"
            if node.target in NLL_TUPLE:
                for user in node.users:
                    if user.target is not operator.getitem or (
                            user.args[1] != 0 and user.users):
                        return f"{user.name} reads nll_loss's total_weight"
                    actions[user] = ("first", node) if user.args[1] == 0 else ("drop",)
            actions[node] = ("nll", src, target, REDUCTIONS[reduction], ignore_index)
            terms.append(CrossEntropyTerm("nll_loss", node.name, track.sharded.leaf,
                                          REDUCTIONS[reduction], ignore_index))
        elif node.target is aten.sum.dim_IntList and track.log_probs:
            dims = node.args[1] if len(node.args) > 1 else None
            keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
            rank = len(_shape(src))
            if (dims is None or [d % rank for d in dims] != [track.vocab_dim]
                    or node.kwargs.get("dtype") is not None):
                return f"{where} sums the log-probabilities over other dims than the vocabulary"
            actions[node] = ("log_prob_sum", src, keepdim)
            terms.append(CrossEntropyTerm("log_prob_sum", node.name, track.sharded.leaf))
        else:
            return f"{where} reads the logits, and it is not a cross-entropy over the vocabulary"
    if not any(term.op == "nll_loss" for term in terms):
        return "the loss computes no cross-entropy of the logits"
    return _rebuild(gm, tracks, actions), tuple(terms)


def _rebuild(gm: fx.GraphModule, tracks: dict, actions: dict) -> fx.GraphModule:
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
                env[src], None if target is None else env[target], item.sharded.mesh_dim,
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
