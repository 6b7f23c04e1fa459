"""Renderings of rank programs for `partitioner dump`: a text table, JSON, Graphviz DOT.

They only read `RankProgram`s (passes/lowering/program.py); nothing here recomputes the
partitioning.
"""

from __future__ import annotations

import json

from core.plan import Plan
from core.schedules import schedule, timeline
from partitioner.report.program import explain, node_rows, pass_log
from passes.lowering.program import RankProgram

_STAGE_COLORS = ("#dbe9f6", "#fde2c8", "#d9f0d3", "#eadcf2", "#fbe3e8", "#f4f1c9")


def to_json(plan: Plan, world_size: int, programs: list[RankProgram]) -> str:
    ranks = []
    for program in programs:
        stages: dict[int, list[dict]] = {s.index: [] for s in program.stages}
        for row in node_rows(program):
            stages[row["stage"]].append({key: row[key] for key in (
                "name", "op", "target", "shape", "placement", "collective")})
        ranks.append({"rank": program.rank, "coords": program.coords,
                      "stages": [{"stage": s, "nodes": nodes} for s, nodes in stages.items()]})
    return json.dumps({"plan": plan.to_dict(), "world_size": world_size, "ranks": ranks},
                      indent=1)


def to_text(plan: Plan, world_size: int, programs: list[RankProgram]) -> str:
    text = "\n\n".join(explain(program) for program in programs) + "\n"
    if programs and programs[0].pipeline is not None:
        text += (f"\n{plan.schedule} timeline, {plan.microbatches} microbatches "
                 f"(F<mb>.<stage>, B = backward, I/W = its input/weight-gradient halves):\n"
                 + timeline(schedule(plan.schedule, plan.pp, plan.microbatches, plan.vpp))
                 + "\n")
    return text


def passes_text(plan: Plan, world_size: int, programs: list[RankProgram]) -> str:
    """`dump --passes`: the ordered pass pipeline of each rank and what each pass recorded."""
    return "\n\n".join(pass_log(program) for program in programs) + "\n"


def to_dot(plan: Plan, world_size: int, programs: list[RankProgram]) -> str:
    """One digraph; a cluster per rank and stage; collectives drawn as red octagons."""
    lines = ["digraph partitioned {", "  rankdir=TB;", '  node [shape=box, fontsize=9];',
             f'  label="plan {plan} on {world_size} ranks"; labelloc=t;']
    for program in programs:
        lines.append(f"  subgraph cluster_rank{program.rank} {{")
        lines.append(f'    label="rank {program.rank} {program.coords}";')
        for stage in program.stages:
            color = _STAGE_COLORS[stage.index % len(_STAGE_COLORS)]
            lines.append(f"    subgraph cluster_rank{program.rank}_stage{stage.index} {{")
            lines.append(f'      label="stage {stage.index}"; style=filled; color="{color}";')
            rows = {r["name"]: r for r in node_rows(program) if r["stage"] == stage.index}
            for node in stage.gm.graph.nodes:
                row = rows[node.name]
                ident = _ident(program.rank, stage.index, node.name)
                shape = "x".join(map(str, row["shape"])) if row["shape"] else ""
                label = f"{node.name}\\n{row['target']}\\n{shape} {row['placement']}"
                if row["collective"]:
                    lines.append(f'      {ident} [label="{_esc(label)}\\n{row["collective"]}", '
                                 f'shape=octagon, style=filled, fillcolor="#f7b2ad"];')
                else:
                    lines.append(f'      {ident} [label="{_esc(label)}"];')
            for node in stage.gm.graph.nodes:
                for user in node.users:
                    lines.append(f"      {_ident(program.rank, stage.index, node.name)} -> "
                                 f"{_ident(program.rank, stage.index, user.name)};")
            lines.append("    }")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _ident(rank: int, stage: int, name: str) -> str:
    return f'"r{rank}s{stage}_{name}"'


def _esc(text: str) -> str:
    return text.replace('"', '\\"')
