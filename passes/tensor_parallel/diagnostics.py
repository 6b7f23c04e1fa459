"""Everything the tensor-parallel pass finds wrong with a model and plan, collected and reported
together, each with the `rules=` override (or plan change) that fixes it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import fx

from core.fx_utils import module_path
from core.plan import Plan
from passes import PassError
from passes.tensor_parallel.projections import lookup_arg
from passes.tensor_parallel.regions import target_name

if TYPE_CHECKING:
    from passes.tensor_parallel.policy import Policy

_PLACING = ("colwise", "rowwise", "vocab", "replicate")
"""Rule kinds that place a projection or lookup (the others belong to other passes)."""


def _glob(path: str) -> str:
    """A module path with its layer indices as wildcards: blocks.3.attn -> blocks.*.attn."""
    return ".".join("*" if part.isdigit() else part for part in path.split("."))


class Problems:
    """Broken rules, in the order found; `raise_if_any` reports them all at once."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __bool__(self) -> bool:
        return bool(self.lines)

    def at(self, node: fx.Node, rule: str, fix: str | None = None) -> None:
        path = module_path(node)
        fix = fix or (f"rules={_glob(path)}.*:replicate keeps these layers replicated, or pick "
                      f"a tp that divides the sizes" if path else "a `rules` override")
        self.lines.append(f"node {node.name} ({target_name(node)}) in module {path!r}: {rule}; "
                          f"fix: {fix}")

    def check_rules_match(self, plan: Plan, placed: list[fx.Node]) -> None:
        """A placement rule that matches nothing is a typo or a partial path ("embed_tokens"
        for HF's "model.embed_tokens"): silently ignoring it would run another plan than
        asked."""
        paths = [module_path(n) for n in placed]
        for rule in plan.rules:
            if rule.kind in _PLACING and not any(rule.matches(path) for path in paths):
                known = dict.fromkeys(_glob(path) for path in paths)
                self.lines.append(
                    f"rule {str(rule)!r} matches no linear or embedding (globs match the whole "
                    f"module path; these are: {', '.join(known)}); fix: e.g. "
                    f"rules=*{rule.pattern.split('.')[-1]}:{rule.kind}")

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
                        f"rules={module_path(lin)}:replicate")
            if kind == "vocab" and lin in policy.shared:
                self.at(lin, *_tied_vocab_problem(weight, lin, policy))
        for lookup in policy.vocab_lookups:
            table = lookup.args[0]
            if len(table.users) > 1 and table not in policy.tied_vocab:
                self.at(lookup, *_tied_vocab_problem(table, lookup, policy))
            if lookup_arg(lookup, 3, "scale_grad_by_freq", False):
                self.at(lookup, "ruled vocab but the embedding scales gradients by frequency, "
                                "which a rank cannot count over ids outside its rows",
                        f"rules={module_path(lookup)}:replicate")

    def check_something_splits(self, tp: int, policy: "Policy", kept: list,
                               why_not: dict[fx.Node, str]) -> None:
        """tp > 1 with nothing to split is a plan the model cannot take."""
        if kept or policy.vocab_heads or policy.vocab_lookups or self.lines:
            return
        reasons = "; ".join(f"{lin.name} ({module_path(lin)}): {why_not.get(lin, 'skipped')}"
                            for lin in policy.projs) or "the graph has no linear with a weight"
        self.lines.append(f"no column/row-parallel region found with tp={tp}: {reasons}; fix: "
                          f"rules=<module glob>:colwise / :rowwise, or run with tp=1")

    def raise_if_any(self, tp: int) -> None:
        if not self.lines:
            return
        # The first line stands alone (the CLI prints only it); then every broken rule.
        more = f" (and {len(self.lines) - 1} more, listed below)" if len(self.lines) > 1 else ""
        raise PassError(f"tensor_parallel (tp={tp}) cannot split this model: {self.lines[0]}"
                        f"{more}\n  - " + "\n  - ".join(self.lines))


def _other_uses(table: fx.Node, node: fx.Node) -> str:
    return ", ".join(f"{u.name} in {module_path(u)!r}" for u in table.users if u is not node)


def _tied_vocab_problem(table: fx.Node, node: fx.Node, policy: "Policy") -> tuple[str, str]:
    """(rule, fix) for a vocab rule on a tensor whose other uses are not all ruled vocab."""
    others = [u for u in table.users if u is not node and not policy.vocab_use(u, table)]
    rules = ";".join(sorted({f"{module_path(u)}:vocab" for u in others}))
    return (f"ruled vocab but its weight {table.target!r} is tied to {_other_uses(table, node)}; "
            f"{', '.join(u.name for u in others)} not ruled vocab, and a tied tensor has one "
            f"placement",
            f"rules={rules} as well (one row shard serves every use), or drop the vocab rule "
            f"on {module_path(node)!r} (tied tensors stay replicated)")
