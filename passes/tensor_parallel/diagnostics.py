"""Everything the tensor-parallel pass finds wrong with a model and plan, collected and reported
together, each with the `rules=` override (or plan change) that fixes it."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

import torch
from torch import fx

from core.divisibility import divisors
from core.fx_utils import module_path
from core.plan import Plan, PlanError, Rule
from passes import PassError
from passes.propagation import tensor_shape
from passes.tensor_parallel.projections import lookup_arg
from passes.tensor_parallel.regions import target_name

if TYPE_CHECKING:
    from passes.tensor_parallel.policy import Policy

aten = torch.ops.aten

_PLACING = ("colwise", "rowwise", "vocab", "replicate")
"""Rule kinds that place a projection or lookup (the others belong to other passes)."""

_MAX_TP = 64
"""The largest tp a report suggests (beyond it a model's own sizes, not tp, are the limit)."""


def _glob(path: str) -> str:
    """A module path with its layer indices as wildcards: blocks.3.attn -> blocks.*.attn."""
    return ".".join("*" if part.isdigit() else part for part in path.split("."))


@dataclass(frozen=True)
class Fix:
    """A change of the plan's rules, as a value: the report applies it and re-runs the pass's
    analysis before printing it, and tests apply what was printed, so a fix that does not work
    is never suggested. `add` goes first (the first matching rule wins); `drop` removes rules."""

    add: tuple[Rule, ...] = ()
    drop: tuple[Rule, ...] = ()

    def rules(self, plan: Plan) -> tuple[Rule, ...]:
        added = tuple(dict.fromkeys(self.add))
        patterns = {rule.pattern for rule in added}
        return added + tuple(rule for rule in plan.rules
                             if rule not in self.drop and rule.pattern not in patterns)

    def apply(self, plan: Plan) -> Plan:
        return replace(plan, rules=self.rules(plan))

    def text(self, plan: Plan) -> str:
        """The plan item to paste: `rules=` with every rule the fixed plan has."""
        return "rules=" + ";".join(map(str, self.rules(plan)))

    def __add__(self, other: "Fix") -> "Fix":
        return Fix(self.add + other.add, self.drop + other.drop)


def replicate(path: str) -> Fix:
    """Keep a module replicated, in every layer (its path with layer indices as wildcards)."""
    return Fix(add=(Rule(_glob(path), "replicate"),))


@dataclass(frozen=True, eq=False)
class Problem:
    """One broken rule: where (a node, or None for a plan rule), what, and how to fix it (the
    alternatives, each a rules change)."""

    rule: str
    node: fx.Node | None = None
    fixes: tuple[Fix, ...] = ()

    @property
    def where(self) -> str:
        if self.node is None:
            return ""
        return (f"node {self.node.name} ({target_name(self.node)}) in module "
                f"{module_path(self.node)!r}: ")

    @property
    def layer_key(self) -> tuple[str, str]:
        """Problems equal up to the layer index are one line of the report."""
        return (_glob(module_path(self.node)) if self.node is not None else "", self.rule)


class Problems:
    """Broken rules, in the order found; `raise_if_any` reports them all at once."""

    def __init__(self) -> None:
        self.found: list[Problem] = []

    def __bool__(self) -> bool:
        return bool(self.found)

    def at(self, node: fx.Node, rule: str, *fixes: Fix) -> None:
        """A problem at `node`; by default fixed by keeping its module replicated."""
        path = module_path(node)
        self.found.append(Problem(rule, node, fixes or ((replicate(path),) if path else ())))

    def check_rules_match(self, plan: Plan, placed: list[fx.Node]) -> None:
        """A placement rule that matches nothing is a typo or a partial path ("embed_tokens"
        for HF's "model.embed_tokens"): silently ignoring it would run another plan than
        asked."""
        paths = [module_path(n) for n in placed]
        for rule in plan.rules:
            if rule.kind in _PLACING and not any(rule.matches(path) for path in paths):
                known = dict.fromkeys(_glob(path) for path in paths)
                suffix = rule.pattern.split(".")[-1]
                fixes = [Fix(add=(Rule(f"*{suffix}", rule.kind),), drop=(rule,))]
                if len(plan.rules) > 1:  # (dropping the only rule leaves no `rules=` to print)
                    fixes.append(Fix(drop=(rule,)))
                self.found.append(Problem(
                    f"rule {str(rule)!r} matches no linear or embedding (globs match the whole "
                    f"module path; these are: {', '.join(known)})", None, tuple(fixes)))

    def check_policy(self, policy: "Policy", why_not: dict[fx.Node, str]) -> None:
        """Rules the model cannot follow: colwise on a projection that opens no region or whose
        weight is tied, vocab on one use of a tied tensor, vocab on an embedding that scales
        gradients by frequency."""
        for lin in policy.projs:
            kind, weight = policy.rule_of(lin), policy.projs[lin].weight
            if kind == "colwise" and lin in why_not:
                self.at(lin, f"ruled colwise but {why_not[lin]}")
            if kind == "colwise" and lin in policy.shared:
                self.at(lin, f"ruled colwise but its weight {weight.target!r} is tied to "
                             f"{_other_uses(weight, lin)}, which needs the same placement",
                        Fix(add=(Rule(module_path(lin), "replicate"),)))
            if kind == "vocab" and lin in policy.shared:
                self.at(lin, *_tied_vocab_problem(weight, lin, policy))
        for lookup in policy.vocab_lookups:
            table = lookup.args[0]
            if len(table.users) > 1 and table not in policy.tied_vocab:
                self.at(lookup, *_tied_vocab_problem(table, lookup, policy))
            if lookup_arg(lookup, 3, "scale_grad_by_freq", False):
                self.at(lookup, "ruled vocab but the embedding scales gradients by frequency, "
                                "which a rank cannot count over ids outside its rows",
                        Fix(add=(Rule(module_path(lookup), "replicate"),)))

    def check_something_splits(self, tp: int, policy: "Policy", kept: list,
                               why_not: dict[fx.Node, str]) -> None:
        """tp > 1 with nothing to split is a plan the model cannot take."""
        if kept or policy.vocab_heads or policy.vocab_lookups or self.found:
            return
        reasons = "; ".join(f"{lin.name} ({module_path(lin)}): {why_not.get(lin, 'skipped')}"
                            for lin in policy.projs) or "the graph has no linear with a weight"
        self.found.append(Problem(f"no column/row-parallel region found with tp={tp}: "
                                  f"{reasons}; a rules=<module glob>:colwise / :rowwise "
                                  f"override may split it"))

    def raise_if_any(self, plan: Plan, graph: fx.Graph,
                     analyse: Callable[[Plan], "Problems"]) -> None:
        """Report every problem, headed by the one a user thinks in (attention heads tp does
        not divide) and by the fixes `analyse` (the pass's analysis of this graph under another
        plan) accepted: other tp values, and the problems' rules fixes taken together."""
        if not self.found:
            return
        lines = _grouped(self.found)
        head = _heads_problem(graph, plan.tp, self.found) or lines[0]
        tps = _working_tps(graph, plan, analyse)
        rules = [f"{fix.text(plan)} ({why}; checked)"
                 for fix, why in _rules_fixes(self, plan, analyse)]
        # tp=1 alone is a fix only when no rule is: it gives up tensor parallelism.
        fixes = ([_tp_text(tps)] if len(tps) > 1 or not rules else []) + rules
        fix = ", or ".join(fixes)
        listing = lines if head is not lines[0] or len(lines) > 1 else []
        listed = (f" ({len(listing)} problem{'s' * (len(listing) > 1)}, listed below)"
                  if listing else "")
        raise PassError(f"tensor_parallel (tp={plan.tp}) cannot split this model: {head}"
                        + (f"; fix: {fix}" if fix else "") + listed
                        + "".join(f"\n  - {line}" for line in listing))


def _grouped(found: list[Problem]) -> list[str]:
    """One line per problem, those repeated in every layer folded into one."""
    groups: dict[tuple[str, str], list[Problem]] = {}
    for problem in found:
        groups.setdefault(problem.layer_key, []).append(problem)
    lines = []
    for (glob, _), same in groups.items():
        again = (f" (and the same at {len(same) - 1} more node{'s' * (len(same) > 2)} in "
                 f"{glob})" if len(same) > 1 else "")
        lines.append(f"{same[0].where}{same[0].rule}{again}")
    return lines


def attention_heads(graph: fx.Graph) -> list[tuple[int, int]]:
    """(attention heads, kv heads) of every scaled-dot-product attention, in graph order: the
    query's head dimension, and the key's before any repeat of its heads (GQA's
    repeat_interleave, or HF's unsqueeze/expand/reshape)."""
    return [heads for _, heads in _attentions(graph)]


def _attentions(graph: fx.Graph) -> list[tuple[str, tuple[int, int]]]:
    """(module path, (heads, kv heads)) of every attention; see `attention_heads`."""
    found = []
    for node in graph.nodes:
        if node.op == "call_function" and "scaled_dot_product" in str(node.target):
            query, key = node.args[0], node.args[1]
            heads = tensor_shape(query)
            kv_heads, todo = [], key
            while isinstance(todo, fx.Node):
                shape = tensor_shape(todo)
                if len(shape) == 4:
                    kv_heads.append(shape[1])
                if todo.target not in _HEAD_REPEATS:
                    break
                todo = todo.args[0]
            if len(heads) == 4 and kv_heads:
                found.append((module_path(node), (heads[1], min(kv_heads))))
    return found


_HEAD_REPEATS = {aten.repeat_interleave.self_int, aten.expand.default, aten.reshape.default,
                 aten.view.default, aten._unsafe_view.default, aten.unsqueeze.default,
                 aten.slice.Tensor, aten.clone.default, aten.contiguous.default}
"""Ops a kv-head repeat is made of (the walk back from a key to its own heads)."""


def _heads_split(heads: int, kv_heads: int, tp: int) -> bool:
    """Whether tp splits attention: heads split evenly, kv heads too or replicated over
    tp/kv ranks each."""
    return heads % tp == 0 and (kv_heads % tp == 0 or tp % kv_heads == 0)


def _heads_problem(graph: fx.Graph, tp: int, found: list[Problem]) -> str | None:
    """The attention heads tp does not split, when a problem lies in such an attention (rules
    may keep it replicated, leaving the problems elsewhere)."""
    at = [module_path(p.node) for p in found if p.node is not None]
    bad = list(dict.fromkeys(
        heads for path, heads in _attentions(graph) if not _heads_split(*heads, tp)
        and any(place == path or place.startswith(path + ".") for place in at)))
    if not bad:
        return None
    counts = ", ".join(f"{h} attention heads" + (f" ({kv} kv heads)" if kv != h else "")
                       for h, kv in bad)
    return (f"its {counts} do not divide by tp={tp} (tp must divide the attention heads, and "
            f"the kv heads must be a multiple or a divisor of tp)")


def _tp_candidates(graph: fx.Graph) -> list[int]:
    """The tp values worth checking: divisors of every attention's head count (no other tp
    splits attention), or of the linears' output features in a model without attention."""
    sizes = [h for h, _ in attention_heads(graph)] or [
        tensor_shape(n)[-1] for n in graph.nodes
        if n.op == "call_function" and n.target is aten.linear.default and tensor_shape(n)]
    return [t for t in divisors(math.gcd(*sizes)) if t <= _MAX_TP] if sizes else []


def _working_tps(graph: fx.Graph, plan: Plan, analyse: Callable[[Plan], "Problems"]) -> list[int]:
    """The tp values whose analysis of this graph (with the plan's rules) finds no problem."""
    works = [1]  # one rank holds everything; the pass does not run
    for tp in _tp_candidates(graph):
        if tp > 1 and tp != plan.tp and not _fails(analyse, replace(plan, tp=tp)):
            works.append(tp)
    return works


def _tp_text(tps: list[int]) -> str:
    values = [f"tp={t}" for t in tps]
    listed = ", ".join(values[:-1]) + " or " + values[-1] if len(values) > 1 else values[0]
    return f"{listed} (the tp values that split this model; checked)"


def _rules_fixes(problems: Problems, plan: Plan, analyse: Callable[[Plan], "Problems"],
                 rounds: int = 3) -> list[tuple[Fix, str]]:
    """Rules fixes that the analysis accepts: every problem's first fix taken together (again
    with the problems that fix uncovers, a few rounds: replicating q_proj leaves k_proj's
    heads to split), and each fix of a lone problem on its own."""
    accepted = []
    if len(problems.found) == 1:
        for fix in problems.found[0].fixes:
            if not _fails(analyse, fix.apply(plan)):
                accepted.append((fix, "fixes it"))
    if accepted:
        return accepted
    together, found = Fix(), problems
    for _ in range(rounds):
        if not all(problem.fixes for problem in found.found):
            return []
        together = together + sum((p.fixes[0] for p in found.found), Fix())
        found = _fails(analyse, together.apply(plan))
        if not found:
            return [(together, "keeps the modules that cannot split replicated")]
    return []


def _fails(analyse: Callable[[Plan], "Problems"], plan: Plan) -> "Problems | bool":
    """The analysis's problems under `plan` (falsy when it is accepted), or True when the plan
    itself is invalid."""
    try:
        return analyse(plan)
    except PlanError:
        return True


def _other_uses(table: fx.Node, node: fx.Node) -> str:
    return ", ".join(f"{u.name} in {module_path(u)!r}" for u in table.users if u is not node)


def _tied_vocab_problem(table: fx.Node, node: fx.Node, policy: "Policy") -> tuple[str, Fix, Fix]:
    """(rule, fixes) for a vocab rule on a tensor whose other uses are not all ruled vocab:
    rule them vocab as well (one row shard serves every use), or keep this use replicated
    (tied tensors then stay replicated)."""
    others = [u for u in table.users if u is not node and not policy.vocab_use(u, table)]
    as_well = tuple(Rule(path, "vocab") for path in sorted({module_path(u) for u in others}))
    return (f"ruled vocab but its weight {table.target!r} is tied to {_other_uses(table, node)}; "
            f"{', '.join(u.name for u in others)} not ruled vocab, and a tied tensor has one "
            f"placement",
            Fix(add=as_well), Fix(add=(Rule(module_path(node), "replicate"),)))
