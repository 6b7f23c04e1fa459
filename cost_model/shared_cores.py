"""A step of ranks that share CPU cores: the pipeline schedule run on the node's cores.

Where a node runs more ranks than it has cores (`Hardware.cores`), neither lower bound of the
step is its time: not the critical path (a rank on it runs slower while other ranks compete for
its core) and not the node's work over its cores (cores idle while every rank waits: a pipeline
filling or draining, a collective all the ranks wait on at once). This module runs the schedule:

- each pipeline rank's actions in the runtime's order (core.schedules.schedule, Megatron-Core's),
  each needing what core.schedules.dependencies says, plus a tail "S" (gradient sync,
  optimizer) that needs only the rank's previous actions;
  the tensor/data-parallel replicas of a pipeline rank run the same program in lockstep, so one
  simulated rank stands for all of them;
- an action starts when its inputs exist (the producing action done, plus the p2p latency when
  it ran on another rank), then does its work (compute and the bytes its collectives copy) and
  then waits out its collectives' latencies;
- work shares the cores fairly (processor sharing): while k ranks of a node have work and the
  node has c cores, each advances at min(1, c / k) of a core; waiting takes no core.

With a core per rank this is the critical path; with every rank busy throughout it is the work
over the cores; in between it is both at once. A fluid simulation: one event per phase change,
so a step of p ranks and m microbatches costs O((p m)^2) at most.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from core.layout import RankLayout
from core.plan import Plan
from core.schedules import (Action, action_graph, dependencies, num_stages_of, placement,
                            schedule)
from cost_model.hardware import Cluster

_EPS = 1e-15


@dataclass(frozen=True)
class Phases:
    """Seconds one action takes on a core of its own, split by what uses the core."""

    work: float
    """Compute and collective transfers: needs a core."""
    wait: float = 0.0
    """Collective latencies, after the work: needs no core."""


class RankPhases(NamedTuple):
    """A pipeline rank's Phases: per microbatch (all its virtual stages together) forward and
    backward, and its step tail."""

    forward: Phases
    backward: Phases
    tail: Phases

    def of(self, action: Action) -> Phases:
        """The action's Phases: a zero-bubble schedule's input- and weight-gradient steps ("I",
        "W") each half of the backward (a matmul's dX and dW cost the same)."""
        if action.kind in ("I", "W"):
            return Phases(self.backward.work / 2, self.backward.wait / 2)
        return {"F": self.forward, "B": self.backward, "S": self.tail}[action.kind]


def simulate(orders: list[list[Action]], cost, hop_latency: float,
             load: list[list[int]], cores: float) -> float:
    """Seconds until every pipeline rank has run its actions.

    `orders[r]`: rank r's actions (a stage on the rank whose order runs it; an "S" action, the
    tail, needs only the rank's previous actions). `cost(action)`: its Phases. `hop_latency`: the wait between an
    action and one on another rank that needs its output. `load[n][r]`: how many ranks of
    pipeline rank r node n runs (its lockstep replicas there); a rank advances at the pace of
    its most crowded node."""
    action_graph(orders)  # raises on a schedule that deadlocks, before simulating it
    pp = len(orders)
    stages = num_stages_of(orders)
    rank_of = {a.stage: r for r, actions in enumerate(orders) for a in actions if a.kind != "S"}
    done: dict[Action, float] = {}
    position = [0] * pp
    phase = [None] * pp  # None: not started; ("work"|"wait", seconds left)
    now = 0.0

    def ready_at(action: Action) -> float | None:
        """When the action's inputs exist, or None while an input is still being computed."""
        t = now
        for dep in dependencies(action, stages):
            if dep not in done:
                return None
            hop = hop_latency if rank_of[dep.stage] != rank_of[action.stage] else 0.0
            t = max(t, done[dep] + hop)
        return t

    while True:
        upcoming = []  # times at which a waiting action's inputs arrive
        for r in range(pp):
            while phase[r] is None and position[r] < len(orders[r]):
                action = orders[r][position[r]]
                t = ready_at(action)
                if t is None:
                    break
                if t > now + _EPS:
                    upcoming.append(t)
                    break
                ph = cost(action)
                phase[r] = ("work", ph.work) if ph.work > 0 else ("wait", ph.wait)
                if phase[r][1] <= 0:  # nothing to do: done at once
                    done[action] = now
                    phase[r] = None
                    position[r] += 1
        active = [r for r in range(pp) if phase[r] is not None]
        if not active:
            if not upcoming:
                break
            now = min(upcoming)
            continue
        working = {r for r in active if phase[r][0] == "work"}
        speed = {}
        for r in working:
            pace = 1.0
            for node in load:
                if node[r]:
                    crowd = sum(node[q] for q in working)
                    pace = min(pace, cores / crowd if crowd > cores else 1.0)
            speed[r] = pace
        step = min([phase[r][1] / speed[r] if r in working else phase[r][1] for r in active] +
                   [t - now for t in upcoming])
        now += step
        for r in active:
            kind, left = phase[r]
            left -= step * speed[r] if kind == "work" else step
            if left > _EPS * max(1.0, now):
                phase[r] = (kind, left)
                continue
            action = orders[r][position[r]]
            wait = cost(action).wait if kind == "work" else 0.0
            if wait > 0:
                phase[r] = ("wait", wait)
                continue
            done[action] = now
            phase[r] = None
            position[r] += 1
    return now


# --- a plan's ranks on a cluster's nodes ----------------------------------------------------
def ranks_per_core(cluster: Cluster) -> float:
    """Ranks each core of a node runs: above 1 only on hosts whose ranks share cores."""
    cores = cluster.hardware.cores
    if cores is None:
        return 1.0
    return min(cluster.num_gpus, cluster.gpus_per_node) / cores


def node_load(p: Plan, cluster: Cluster) -> list[list[int]]:
    """load[n][r]: how many ranks of pipeline rank r node n runs, from the rank layout."""
    stride = RankLayout.dense(p).stride("pp")  # rank g is on pipeline rank (g // stride) % pp
    per_node = min(cluster.num_gpus, cluster.gpus_per_node)
    load = [[0] * p.pp for _ in range(-(-cluster.num_gpus // per_node))]
    for g in range(cluster.num_gpus):
        load[g // per_node][(g // stride) % p.pp] += 1
    return load


def shared_core_step(stage_phases: list[RankPhases], p: Plan, cluster: Cluster,
                     hop_latency: float) -> float:
    """The step of ranks sharing a node's cores: the plan's schedule simulated on them, each
    pipeline rank's actions costing its RankPhases."""
    v = p.vpp
    orders = [acts + [Action("S", 0, r)]
              for r, acts in enumerate(schedule(p.schedule, p.pp, p.microbatches, v))]
    ranks = placement(p.schedule, p.pp, v)

    def cost(action: Action) -> Phases:
        ph = stage_phases[action.stage if action.kind == "S" else ranks[action.stage]].of(action)
        return ph if action.kind == "S" else Phases(ph.work / v, ph.wait / v)

    return simulate(orders, cost, hop_latency, node_load(p, cluster), cluster.hardware.cores)


def shared_core_seconds(stage_work: list[float], p: Plan, cluster: Cluster) -> float:
    """Seconds the busiest node's cores need for its ranks' work, when ranks outnumber cores
    (0.0 otherwise): a lower bound of the step (Brent's), which shared_core_step reaches when
    no core ever idles."""
    if ranks_per_core(cluster) <= 1.0:
        return 0.0
    return max(sum(n * w for n, w in zip(node, stage_work, strict=True))
               for node in node_load(p, cluster)) / cluster.hardware.cores
