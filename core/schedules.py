"""Pipeline schedules (GPipe, 1F1B, interleaved 1F1B, zero-bubble ZB-H1 and ZB-V) as pure data.

A schedule is a pure function: for each pp rank, the ordered list of actions
`Action(kind, microbatch, stage)`, and `placement`, the pp rank of every stage (stage s on rank
s % pp, Megatron's interleaving; ZB-V's V puts stages s and 2p-1-s on rank s). Kinds: "F"
forward; "B" the whole backward; or, in the zero-bubble schedules (Qi et al. 2023, "Zero Bubble
Pipeline Parallelism"), the backward split in two: "I" the input-gradient step (what the stage
before waits for) and "W" the weight-gradient step (needed by no other stage, so it can fill
the bubble). It can be printed as a timeline without running anything; the runtime's executor
runs it and the cost model simulates it, both from this one definition. Which action needs which
is written once, in `dependencies`; `action_graph` joins those data edges with each rank's order
into one DAG, so a schedule whose orders wait on each other in a circle (a deadlock) is a cycle
there, found before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-v")

UNIT_TIME = {"F": 1, "B": 2, "I": 1, "W": 1}
"""Unit-time cost of each kind (timeline, the zero-bubble paper's T_F = T_B = T_W)."""


@dataclass(frozen=True)
class Action:
    kind: str
    """"F" (forward), "B" (backward), or the backward in two steps: "I" (gradients of the
    stage's inputs) then "W" (gradients of its weights); the cost model adds "S", a rank's step
    tail (gradient sync, optimizer), which needs nothing of another rank."""
    microbatch: int
    stage: int

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f".{self.stage}" if self.stage else "")


def placement(name: str, pp: int, vpp: int = 1) -> tuple[int, ...]:
    """The pp rank of every stage: rank s % pp (Megatron's interleaving) or, for zb-v, the V:
    stage s < pp on rank s, stage s >= pp on rank 2pp-1-s (rank 0 holds the first and the
    last stage, so the loss is computed there)."""
    if name == "zb-v":
        if vpp != 2:
            raise ValueError(f"zb-v places two stages per rank in a V: vpp must be 2 (got {vpp})")
        return tuple(range(pp)) + tuple(reversed(range(pp)))
    return tuple(s % pp for s in range(pp * vpp))


def schedule(name: str, pp: int, microbatches: int, vpp: int = 1) -> list[list[Action]]:
    """Per pp rank, the actions in order (stage s lives on rank `placement(...)[s]`)."""
    if name == "zb-h1":
        if vpp != 1:
            raise ValueError(f"zb-h1 has one stage per rank: vpp must be 1 (got {vpp})")
        return [_zb_h1(r, pp, microbatches) for r in range(pp)]
    if name == "zb-v":
        return _zb_v(pp, microbatches, placement(name, pp, vpp))
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


def _zb_h1(rank: int, pp: int, m: int) -> list[Action]:
    """ZB-H1: 1F1B with each backward split into I and W, rank r's W steps delayed by r
    microbatches (W of microbatch k after I of k + r) and the delayed ones filling the
    cool-down between the last I steps. The input-gradient chain is 1F1B's, so the bubble
    shrinks from (p-1)(F+B) to (p-1)(F+I-W) per rank; rank r holds at most p - r microbatches
    waiting for their I and at most p waiting for their W (1F1B's peak, rank 0's)."""
    warmup = min(pp - rank - 1, m)
    actions = [Action("F", i, rank) for i in range(warmup)]
    weights = 0  # next microbatch whose W is due

    def backward(k: int, cooldown: bool) -> None:
        nonlocal weights
        actions.append(Action("I", k, rank))
        if cooldown or k - weights >= rank:  # W of k - r once r I steps are ahead of it
            actions.append(Action("W", weights, rank))
            weights += 1

    for k in range(m - warmup):  # steady state: one forward, one backward
        actions.append(Action("F", warmup + k, rank))
        backward(k, cooldown=False)
    for k in range(m - warmup, m):
        backward(k, cooldown=True)
    actions += [Action("W", k, rank) for k in range(weights, m)]
    return actions


def _zb_v(pp: int, m: int, ranks: tuple[int, ...]) -> list[list[Action]]:
    """ZB-V: two stages per rank in a V, ordered by a greedy unit-time simulation of all ranks
    (F = I = W = 1 per stage). A free rank runs, of the actions whose inputs exist: an I (the
    later stage first: it unblocks the stages before it), else an F (the later stage first;
    a new microbatch enters the rank's first stage only while fewer than 2p stage activations
    wait for their W or are due on its second stage, i.e. p microbatches of the rank's layers:
    1F1B's peak), else the oldest waiting W. Rank r's stages are r and 2p-1-r. At unit costs
    the span is 6m + p - 1 stage units at p = 2, the least any order can do (rank p-1 waits
    p-1 forwards for its first input), and within p - 2 more of it up to p = 8."""
    stages = 2 * pp
    first = {r: ranks.index(r) for r in range(pp)}  # the rank's stage on the way down
    orders: list[list[Action]] = [[] for _ in range(pp)]
    finish: dict[Action, int] = {}
    pending_w: list[list[Action]] = [[] for _ in range(pp)]
    held = [0] * pp  # stage activations waiting for their W
    next_f = {s: 0 for s in range(stages)}  # next microbatch to forward on each stage
    next_i = {s: 0 for s in range(stages)}
    total = 3 * stages * m
    busy_until = [0] * pp
    t = 0
    while len(finish) < total:
        for r in range(pp):
            if busy_until[r] > t:
                continue
            mine = sorted((s for s in range(stages) if ranks[s] == r), reverse=True)

            def ready(action: Action) -> bool:
                return all(finish.get(dep, t + 1) <= t for dep in dependencies(action, stages))

            chosen = next((Action("I", next_i[s], s) for s in mine if next_i[s] < next_f[s]
                           and ready(Action("I", next_i[s], s))), None)
            if chosen is None:
                for s in mine:
                    coming = next_f[first[r]] - next_f[stages - 1 - first[r]]  # admitted,
                    # still to forward on the rank's second stage: their activations are due
                    if next_f[s] >= m or (s == first[r] and held[r] + coming >= 2 * pp):
                        continue
                    if ready(Action("F", next_f[s], s)):
                        chosen = Action("F", next_f[s], s)
                        break
            if chosen is None and pending_w[r]:
                chosen = pending_w[r].pop(0)
            if chosen is None:
                continue
            if chosen.kind == "F":
                next_f[chosen.stage] += 1
                held[r] += 1
            elif chosen.kind == "I":
                next_i[chosen.stage] += 1
                pending_w[r].append(Action("W", chosen.microbatch, chosen.stage))
            else:
                held[r] -= 1
            orders[r].append(chosen)
            finish[chosen] = t + UNIT_TIME[chosen.kind]
            busy_until[r] = finish[chosen]
        t += 1
        if t > 2 * total:  # every action is ready at some point: this would be a bug here
            raise RuntimeError(f"zb-v simulation stalled at pp={pp}, microbatches={m}")
    return orders


def dependencies(action: Action, num_stages: int) -> list[Action]:
    """The actions whose outputs `action` reads: the forward of stage s needs the forward of
    s-1 (its input activations); the backward (or input-gradient step) of s needs the forward
    of s (its saved activations) and the same kind of step of s+1 (its output gradient); the
    weight-gradient step of s needs the input-gradient step of s (the gradients it left at
    the weights' inputs) and nothing of another stage."""
    if action.kind == "F":
        return [Action("F", action.microbatch, action.stage - 1)] if action.stage else []
    if action.kind in ("B", "I"):
        deps = [Action("F", action.microbatch, action.stage)]
        if action.stage < num_stages - 1:
            deps.append(Action(action.kind, action.microbatch, action.stage + 1))
        return deps
    if action.kind == "W":
        return [Action("I", action.microbatch, action.stage)]
    return []


def num_stages_of(orders: list[list[Action]]) -> int:
    """Stages of a schedule: one more than the highest stage of its forwards and backwards."""
    return 1 + max((a.stage for actions in orders for a in actions if a.kind in "FBIW"),
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


def finish_times(orders: list[list[Action]], cost) -> dict[Action, float]:
    """When each action ends if it takes `cost(action)`, each action starting when its rank is
    free and its inputs exist (no transfer time)."""
    graph = action_graph(orders)
    finish: dict[Action, float] = {}
    for action in nx.topological_sort(graph):  # the rank's previous action is a predecessor
        start = max((finish[dep] for dep in graph.predecessors(action)), default=0)
        finish[action] = start + cost(action)
    return finish


def unit_finish_times(orders: list[list[Action]]) -> dict[Action, int]:
    """`finish_times` with unit-time F, I and W and 2-unit B per stage (`UNIT_TIME`)."""
    return finish_times(orders, lambda action: UNIT_TIME[action.kind])


def unit_bubble(orders: list[list[Action]]) -> float:
    """The idle fraction of the schedule's span over all ranks, at `UNIT_TIME` costs."""
    finish = unit_finish_times(orders)
    span = max(finish.values())
    busy = sum(UNIT_TIME[a.kind] for actions in orders for a in actions)
    return 1 - busy / (span * len(orders))


def timeline(plan_schedule: list[list[Action]]) -> str:
    """Which rank does which microbatch when, assuming unit-time F, I and W and 2-unit B per
    stage. Each action starts when its rank is free and its inputs exist; `.` is idle (the
    bubble)."""
    finish = unit_finish_times(plan_schedule)
    cells: list[list[str]] = [[] for _ in plan_schedule]
    rank_time = [0] * len(plan_schedule)
    for rank, actions in enumerate(plan_schedule):
        for action in actions:
            length = UNIT_TIME[action.kind]
            start = finish[action] - length
            cells[rank] += ["."] * (start - rank_time[rank]) + [str(action)] * length
            rank_time[rank] = finish[action]
    width = max(len(c) for row in cells for c in row)
    span = max(rank_time)
    lines = [f"rank {r}: " + " ".join(c.ljust(width) for c in row + ["."] * (span - len(row)))
             for r, row in enumerate(cells)]
    busy = sum(rank_time) and sum(1 for row in cells for c in row if c != ".")
    lines.append(f"bubble fraction {1 - busy / (span * len(cells)):.3f} (unit-time F, I, W; "
                 f"2-unit B)")
    return "\n".join(lines)
