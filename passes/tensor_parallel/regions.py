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



def split_region(region: Region, projs: dict, order: dict, tp: int, replicas: dict):
    """States of every value in the region and the rewritten args, plus (node, Broken)s.
    `replicas`: column linears whose heads are replicated on that many ranks (GQA kv)."""
    states: dict[fx.Node, object] = {}
    rewrites: dict[fx.Node, Call] = {}
    errors: list[tuple[fx.Node, Broken]] = []
    columns = set(region.columns)
    poisoned: set[fx.Node] = set()  # downstream of a broken rule: no second error for it
    members = sorted(region.nodes | region.rows | columns, key=order.__getitem__)
    for node in members:
        if poisoned.intersection(node.all_input_nodes):
            poisoned.add(node)
            continue
        try:
            if node in columns:
                blocks = fused_blocks(node)
                split = tp_split(ndim(node) - 1, blocks, replicas.get(node, 1))
                bad = [b for b in blocks if b % parts(split, tp)]
                if bad:
                    raise Broken(f"output features {list(blocks)} of the column-parallel "
                                 f"linear do not divide by tp={tp}")
                states[node] = split
            elif node in region.rows:
                x = projs[node].x
                split = states.get(x)
                if split is None or split.dim != ndim(x) - 1 or \
                        isinstance(split, StridedShard) or split.replicas > 1:
                    raise Broken("the row-parallel linear's input is not split along its "
                                 "features", structural=True)
            elif node in region.nodes:
                if all(states.get(a) is None for a in node.all_input_nodes):
                    continue
                state, args = RULES[node.target](node, states, tp)
                states[node] = state
                if args is not None:
                    rewrites[node] = args if isinstance(args, Call) else Call(tuple(args),
                                                                                None)
        except Broken as error:
            errors.append((node, error))
            poisoned.add(node)
    return states, rewrites, errors
