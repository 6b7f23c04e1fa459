"""Regions: where a tensor-parallel split starts and ends.

A region starts at column-parallel projections and ends at the row-parallel projections their
outputs flow into: `find_regions` walks node users from every projection through ops the rule
table can carry until other projections close them, and groups the walks that meet (q, k, v at
attention; gate and up at their product). `split_region` then runs the rule table over one
region, collecting every broken rule instead of stopping at the first.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from passes.tensor_parallel.projections import Projection, fused_blocks
from core.placement import StridedShard
from passes.propagation import NotCarried, propagate
from passes.tensor_parallel.rules import RULES, Broken, Call, ndim, parts, tp_split

@dataclass
class Region:
    columns: list[fx.Node]
    rows: set[fx.Node]
    nodes: set[fx.Node]
    broken: str | None = None  # why this is not a region (structural), None if it is one


def walk(start: fx.Node, linears: dict[fx.Node, Projection]) -> tuple[set, set, str | None]:
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
                return seen, ends, f"its output reaches {what} ({target_name(user)}), which no " \
                                   f"row-parallel linear closes"
    if not ends:
        return seen, ends, "no linear closes its output"
    return seen, ends, None


def target_name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_function" else node.op


def find_regions(linears: dict[fx.Node, Projection], rule_of, skip: set):
    """Group column candidates whose walks meet (q, k, v at attention; gate, up at mul)."""
    all_linears = linears
    walks, why_not = {}, {}
    for lin in linears:
        if lin in skip:
            continue
        walks[lin] = walk(lin, all_linears)
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
    groups: dict[fx.Node, Region] = {}
    for lin in walks:
        region = groups.setdefault(find(lin), Region([], set(), set()))
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


@dataclass(frozen=True, eq=False)
class RegionSplit:
    """One region through the rule table: every value's split, the rewritten args, and every
    broken rule (node, Broken) in graph order."""

    states: dict[fx.Node, object]
    rewrites: dict[fx.Node, Call]
    errors: list[tuple[fx.Node, Broken]]


def split_region(region: Region, projs: dict, order: dict, tp: int,
                 replicas: dict) -> RegionSplit:
    """Propagate the column projections' splits through the region with the rule table.
    `replicas`: column linears whose heads are replicated on that many ranks (GQA kv)."""
    seeds, errors, rewrites = {}, [], {}
    for col in region.columns:
        blocks = fused_blocks(col)
        split = tp_split(ndim(col) - 1, blocks, replicas.get(col, 1))
        if any(b % parts(split, tp) for b in blocks):
            errors.append((col, Broken(f"output features {list(blocks)} of the column-parallel "
                                       f"linear do not divide by tp={tp}")))
        else:
            seeds[col] = split

    def rule(node: fx.Node, states) -> object:
        if node in region.rows:
            _check_row(node, projs, states)
            return None  # a partial sum, reduced by the rewrite
        try:
            state, args = RULES[node.target](node, states, tp)
        except Broken:
            raise
        except NotCarried as why:  # the shared table's answer: not a region (replicate it)
            raise Broken(str(why), structural=True) from None
        if args is not None:
            rewrites[node] = args if isinstance(args, Call) else Call(tuple(args), None)
        return state

    members = sorted(region.nodes | region.rows, key=order.__getitem__)
    result = propagate(members, seeds, rule, blocked=[col for col, _ in errors])
    errors += list(result.stopped.items())
    for row in region.rows:  # a row no split reached is not a row of this region
        if row not in result.stopped and row not in result.blocked and \
                projs[row].x not in result.dims:
            errors.append((row, _row_error()))
    return RegionSplit(result.dims, rewrites, sorted(errors, key=lambda e: order[e[0]]))


def _check_row(row: fx.Node, projs: dict, states) -> None:
    x = projs[row].x
    split = states.get(x)
    if split is None or split.dim != ndim(x) - 1 or isinstance(split, StridedShard) or \
            split.replicas > 1:
        raise _row_error()


def _row_error() -> Broken:
    return Broken("the row-parallel linear's input is not split along its features",
                  structural=True)
