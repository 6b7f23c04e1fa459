"""Pipeline schedules (GPipe, 1F1B, interleaved 1F1B) as pure data.

A schedule is a pure function: for each pp rank, the ordered list of actions
`Action("F"|"B", microbatch, stage)` (stage s lives on rank s % pp, Megatron's interleaving).
It can be printed as a timeline without running anything; the runtime's executor runs it and
the cost model simulates it, both from this one definition. Which action needs which is written
once, in `dependencies`; `action_graph` joins those data edges with each rank's order into one
DAG, so a schedule whose orders wait on each other in a circle (a deadlock) is a cycle there,
found before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")


@dataclass(frozen=True)
class Action:
    kind: str
    """"F" (forward) or "B" (backward); the cost model adds "S", a rank's step tail (gradient
    sync, optimizer), which needs nothing of another rank."""
    microbatch: int
    stage: int

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f".{self.stage}" if self.stage else "")


def schedule(name: str, pp: int, microbatches: int, vpp: int = 1) -> list[list[Action]]:
    """Per pp rank, the actions in order (stage s lives on rank s % pp)."""
    if name == "gpipe":
        return [[Action("F", m, r + c * pp) for c in range(vpp) for m in range(microbatches)]
                + [Action("B", m, r + c * pp) for c in reversed(range(vpp))
                   for m in reversed(range(microbatches))] for r in range(pp)]
    if name == "1f1b" and vpp == 1:
        return [_one_f_one_b(r, pp, microbatches) for r in range(pp)]
    if name in ("1f1b", "interleaved-1f1b"):
        return [_interleaved(r, pp, microbatches, vpp) for r in range(pp)]
    raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")


def _one_f_one_b(rank: int, pp: int, m: int) -> list[Action]:
    warmup = min(pp - rank - 1, m)
    actions = [Action("F", i, rank) for i in range(warmup)]
    forward, backward = warmup, 0
    while forward < m:  # steady state: one forward, one backward
        actions.append(Action("F", forward, rank))
        forward += 1
        actions.append(Action("B", backward, rank))
        backward += 1
    actions += [Action("B", i, rank) for i in range(backward, m)]
    return actions


def _interleaved(rank: int, pp: int, m: int, vpp: int) -> list[Action]:
    """Megatron-Core's interleaved 1F1B: microbatches in groups of pp per model chunk."""
    total = m * vpp

    def forward_of(k: int) -> Action:
        chunk = (k // pp) % vpp
        return Action("F", (k // (pp * vpp)) * pp + k % pp, rank + chunk * pp)

    def backward_of(k: int) -> Action:
        chunk = vpp - 1 - (k // pp) % vpp
        return Action("B", (k // (pp * vpp)) * pp + k % pp, rank + chunk * pp)

    warmup = min((pp - rank - 1) * 2 + (vpp - 1) * pp, total)
    actions = [forward_of(k) for k in range(warmup)]
    forward, backward = warmup, 0
    while forward < total:
        actions.append(forward_of(forward))
        forward += 1
        actions.append(backward_of(backward))
        backward += 1
    actions += [backward_of(k) for k in range(backward, total)]
    return actions


def dependencies(action: Action, num_stages: int) -> list[Action]:
    """The actions whose outputs `action` reads: the forward of stage s needs the forward of
    s-1 (its input activations); the backward of s needs the forward of s (its saved
    activations) and the backward of s+1 (its output gradient)."""
    if action.kind == "F":
        return [Action("F", action.microbatch, action.stage - 1)] if action.stage else []
    if action.kind == "B":
        deps = [Action("F", action.microbatch, action.stage)]
        if action.stage < num_stages - 1:
            deps.append(Action("B", action.microbatch, action.stage + 1))
        return deps
    return []


def num_stages_of(orders: list[list[Action]]) -> int:
    """Stages of a schedule: one more than the highest stage of its forwards and backwards."""
    return 1 + max((a.stage for actions in orders for a in actions if a.kind in "FB"),
                   default=0)


def action_graph(orders: list[list[Action]]) -> nx.DiGraph:
    """Every action of the schedule, with an edge from each action to the ones that need its
    output (`dependencies`) and to the next action of its rank. Raises ValueError when the
    schedule deadlocks: an action needs one that no rank runs, or the orders wait in a cycle."""
    stages = num_stages_of(orders)
    graph = nx.DiGraph()
    for actions in orders:
        nx.add_path(graph, actions)  # a rank runs its actions one after the other
    for actions in orders:
        for action in actions:
            for dep in dependencies(action, stages):
                if dep not in graph:
                    raise ValueError(f"schedule deadlocks: {action} waits on {dep}, which no "
                                     f"rank runs")
                graph.add_edge(dep, action)
    if not nx.is_directed_acyclic_graph(graph):
        cycle = [a for a, _ in nx.find_cycle(graph)]
        cycle = " -> ".join(str(a) for a in cycle + cycle[:1])
        raise ValueError(f"schedule deadlocks: the ranks' orders wait on each other ({cycle})")
    return graph


def timeline(plan_schedule: list[list[Action]]) -> str:
    """Which rank does which microbatch when, assuming unit-time F and B (2 units) per stage.

    Each action starts when its rank is free and its inputs exist; `.` is idle (the bubble).
    """
    graph = action_graph(plan_schedule)
    finish: dict[Action, int] = {}
    for action in nx.topological_sort(graph):  # the rank's previous action is a predecessor
        start = max((finish[dep] for dep in graph.predecessors(action)), default=0)
        finish[action] = start + (1 if action.kind == "F" else 2)
    cells: list[list[str]] = [[] for _ in plan_schedule]
    rank_time = [0] * len(plan_schedule)
    for rank, actions in enumerate(plan_schedule):
        for action in actions:
            length = 1 if action.kind == "F" else 2
            start = finish[action] - length
            cells[rank] += ["."] * (start - rank_time[rank]) + [str(action)] * length
            rank_time[rank] = finish[action]
    width = max(len(c) for row in cells for c in row)
    span = max(rank_time)
    lines = [f"rank {r}: " + " ".join(c.ljust(width) for c in row + ["."] * (span - len(row)))
             for r, row in enumerate(cells)]
    busy = sum(rank_time) and sum(1 for row in cells for c in row if c != ".")
    lines.append(f"bubble fraction {1 - busy / (span * len(cells)):.3f} (unit-time F, 2-unit B)")
    return "\n".join(lines)
