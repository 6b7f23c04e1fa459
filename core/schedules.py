"""Pipeline schedules (GPipe, 1F1B, interleaved 1F1B) as pure data.

A schedule is a pure function: for each pp rank, the ordered list of actions
`Action("F"|"B", microbatch, stage)` (stage s lives on rank s % pp, Megatron's interleaving).
It can be printed as a timeline without running anything; the runtime's executor runs it and
the cost model simulates it, both from this one definition.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")


@dataclass(frozen=True)
class Action:
    kind: str  # "F" or "B"
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


def timeline(plan_schedule: list[list[Action]]) -> str:
    """Which rank does which microbatch when, assuming unit-time F and B (2 units) per stage.

    Each action starts when its rank is free and its inputs exist; `.` is idle (the bubble).
    """
    finish: dict[tuple, int] = {}
    rank_time = [0] * len(plan_schedule)
    cells: list[list[str]] = [[] for _ in plan_schedule]
    positions = [0] * len(plan_schedule)
    num_stages = 1 + max(a.stage for actions in plan_schedule for a in actions)
    progress = True
    while progress:
        progress = False
        for rank, actions in enumerate(plan_schedule):
            if positions[rank] >= len(actions):
                continue
            action = actions[positions[rank]]
            if action.kind == "F":
                deps = [("F", action.microbatch, action.stage - 1)] if action.stage else []
            else:
                deps = [("F", action.microbatch, action.stage)]
                if action.stage < num_stages - 1:
                    deps.append(("B", action.microbatch, action.stage + 1))
            if not all(d in finish for d in deps):
                continue
            start = max([rank_time[rank]] + [finish[d] for d in deps])
            length = 1 if action.kind == "F" else 2
            cells[rank] += ["."] * (start - rank_time[rank]) + [str(action)] * length
            rank_time[rank] = start + length
            finish[(action.kind, action.microbatch, action.stage)] = rank_time[rank]
            positions[rank] += 1
            progress = True
    if any(p < len(a) for p, a in zip(positions, plan_schedule, strict=True)):
        raise ValueError("schedule deadlocks: an action waits on one that never runs")
    width = max(len(c) for row in cells for c in row)
    span = max(rank_time)
    lines = [f"rank {r}: " + " ".join(c.ljust(width) for c in row + ["."] * (span - len(row)))
             for r, row in enumerate(cells)]
    busy = sum(rank_time) and sum(1 for row in cells for c in row if c != ".")
    lines.append(f"bubble fraction {1 - busy / (span * len(cells)):.3f} (unit-time F, 2-unit B)")
    return "\n".join(lines)
