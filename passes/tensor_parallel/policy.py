"""Policy: which projection or lookup becomes column-, row-, vocab-parallel or stays replicated.

The plan's `rules` decide first (by module path); the word embedding and the LM head are
vocab-parallel by default (`default_vocab`); a tensor read by several nodes (tied embedding and
LM head) takes one placement for all of them. `split_regions` decides per region: split it, keep
it replicated (an op the rule table cannot carry), or split it with grouped-query kv heads
replicated over ranks (`kv_replicas`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import fx

from core.fx_utils import module_path
from core.plan import Plan, RuleKind
from passes.expert_parallel.find import looped_expert_nodes
from passes.propagation import tensor_shape
from passes.tensor_parallel.diagnostics import Fix, Problems, replicate
from passes.tensor_parallel.projections import (RESHAPES, Projection, fused_blocks,
                                                lookup_arg)
from passes.tensor_parallel.regions import Region, split_region
from passes.tensor_parallel.rules import Call

log = logging.getLogger(__name__)

aten = torch.ops.aten


@dataclass(frozen=True, eq=False)
class Policy:
    """Every projection's and lookup's kind, from the plan's rules and the defaults."""

    projs: dict[fx.Node, Projection]
    lookups: list[fx.Node]
    ruled: dict[fx.Node, RuleKind | None]
    """The plan's rule for each projection and lookup (None: no rule matches it)."""
    by_default: set[fx.Node]
    """Vocab-parallel by default: the word embedding and the LM head (`default_vocab`)."""
    tied_vocab: frozenset[fx.Node] = frozenset()
    """Tables read by several nodes, every one ruled vocab: one row shard serves them all."""
    shared: frozenset[fx.Node] = frozenset()
    """Projections whose weight other nodes read too, and which is not one vocab shard."""

    def rule_of(self, node: fx.Node) -> RuleKind | None:
        kind = self.ruled.get(node)
        return "vocab" if kind is None and node in self.by_default else kind

    def vocab_use(self, user: fx.Node, table: fx.Node) -> bool:
        """Whether `user` reads `table` as a vocab-parallel projection or lookup."""
        if user in self.projs:
            return self.projs[user].weight is table and self.rule_of(user) == "vocab"
        return user in self.lookups and user.args[0] is table and self.rule_of(user) == "vocab"

    @property
    def skip(self) -> set[fx.Node]:
        """Projections that never start a region."""
        return {lin for lin in self.projs
                if self.rule_of(lin) in ("replicate", "vocab", "rowwise")} | self.shared

    @property
    def vocab_heads(self) -> list[fx.Node]:
        return [lin for lin in self.projs
                if self.rule_of(lin) == "vocab" and lin not in self.shared]

    @property
    def vocab_lookups(self) -> list[fx.Node]:
        return [n for n in self.lookups if self.rule_of(n) == "vocab"]


def choose_policy(graph: fx.Graph, projs: dict[fx.Node, Projection], lookups: list[fx.Node],
                  plan: Plan) -> Policy:
    ruled = {node: plan.rule_for(module_path(node)) for node in list(projs) + lookups}
    if plan.ep > 1:  # experts of a ModuleList stay whole on their ep rank (etp=1)
        experts = looped_expert_nodes(graph)
        ruled.update({node: "replicate" for node in projs
                      if node in experts and ruled[node] is None})
    policy = Policy(projs, lookups, ruled, default_vocab(graph, projs, lookups, ruled.get))
    # A tensor read by several nodes (tied embedding and LM head) has one placement: one row
    # shard when every use is ruled vocab (the table's rows are the head's output features),
    # otherwise replicated.
    tables = {p.weight for p in projs.values()} | {n.args[0] for n in lookups}
    tied_vocab = frozenset(t for t in tables if len(t.users) > 1
                           and all(policy.vocab_use(u, t) for u in t.users))
    shared = frozenset(lin for lin, p in projs.items()
                       if len(p.weight.users) > 1 and p.weight not in tied_vocab)
    return replace(policy, tied_vocab=tied_vocab, shared=shared)


_PASS_THROUGH = (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                 aten.slice.Tensor, aten.alias.default, aten._to_copy.default, aten.to.dtype,
                 aten.clone.default, aten.contiguous.default)
"""Ops between token ids and their lookup, or between an LM head and the graph output, that do
not change what the values are (layout, dtype, a slice of positions)."""


def default_vocab(graph: fx.Graph, projs: dict, lookups: list, ruled) -> set[fx.Node]:
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
    rows = {int(tensor_shape(n.args[0])[0]) for n in words}
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
             and int(tensor_shape(proj.weight)[proj.out_dim]) in rows]
    chosen = {n for n in set(words) | set(heads) if ruled(n) is None}
    tables = {n.args[0] if n in lookups else projs[n].weight for n in chosen}
    for table in tables:
        uses = list(table.users)
        if any(u not in chosen and ruled(u) != "vocab" for u in uses) or any(
                u in lookups and lookup_arg(u, 3, "scale_grad_by_freq", False) for u in uses):
            chosen -= set(uses)
    return chosen


# --- per region: split, replicate, or split with kv heads replicated --------------------------

@dataclass(frozen=True, eq=False)
class RegionSplits:
    """The regions kept for splitting, every value's split in them and the rewritten args."""

    regions: list[Region]
    states: dict[fx.Node, object]
    rewrites: dict[fx.Node, Call]


def split_regions(graph: fx.Graph, regions: list[Region], policy: Policy, tp: int,
                  problems: Problems, why_not: dict[fx.Node, str]) -> RegionSplits:
    """Run the rule table over every region. A region with an op the table cannot carry stays
    replicated (unless ruled colwise: then it is a problem); a head count tp does not divide but
    which divides tp is retried with those heads replicated; other broken rules are problems."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    split = RegionSplits([], {}, {})
    for region in (r for r in regions if not r.broken):
        replicas: dict[fx.Node, int] = {}
        found = split_region(region, policy.projs, order, tp, replicas)
        while found.errors:  # again with kv heads replicated, if that is what the errors ask
            more = kv_replicas(region, found.errors, replicas, tp)
            guess = not more
            if guess:  # or a one-head kv projection (MQA), which no shape error points to
                more = kv_replicas(region, found.errors, replicas, tp, single=True)
            if not more:
                break
            retry = split_region(region, policy.projs, order, tp, {**replicas, **more})
            if guess and retry.errors:
                break  # not MQA after all: report the first try's errors
            replicas.update(more)
            found = retry
        errors = found.errors
        structural = [e for e in errors if e[1].structural]
        if structural and not any(policy.rule_of(c) == "colwise" for c in region.columns):
            log.info("tensor_parallel: %s stays replicated: %s", region.columns[0].name,
                     structural[0][1].rule)
            for col in region.columns:
                why_not[col] = f"{structural[0][0].name}: {structural[0][1].rule}"
            continue
        # Fixed by keeping the region's column linears (and so the region) replicated.
        keep = sum((replicate(module_path(col)) for col in region.columns), Fix())
        for node, error in errors:
            problems.at(node, error.rule, keep)
        split.states.update(found.states)
        split.rewrites.update(found.rewrites)
        split.regions.append(region)
    return split


def kv_replicas(region: Region, errors, replicas: dict, tp: int,
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
            src = tensor_shape(col)
            for user in col.users:
                dst = tensor_shape(user) if user.target in RESHAPES else ()
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
             if col not in replicas and len(fused_blocks(col)) == 1}
    if all(col in found or col in replicas for col in region.columns):
        return {}
    return found


def _sources(node: fx.Node, region: Region) -> set[fx.Node]:
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
