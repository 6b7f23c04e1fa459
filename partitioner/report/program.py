"""Text renderings of one rank's program: its node table (`explain`, `dump`), the values
crossing stage cuts and the pass log. They read `RankProgram` (passes/lowering/program.py);
nothing here recomputes the partitioning.
"""

from __future__ import annotations

import torch
from torch import fx

from core import meta
from core.fx_utils import module_path
from core.placement import ParamLayout
from passes.lowering.program import RankProgram
from core.ops import COLLECTIVE_KINDS


def collective_kind(node: fx.Node) -> str | None:
    """The collective a node performs (DESIGN.md's names), or None."""
    if node.op != "call_function":
        return None
    return node.meta.get(meta.COLLECTIVE) or COLLECTIVE_KINDS.get(node.target)


def node_placement(node: fx.Node, layouts: dict[str, ParamLayout]) -> str:
    if node.op == "get_attr" and node.target in layouts:
        return str(layouts[node.target].placements)
    return str(node.meta.get(meta.TP_PLACEMENT, "R"))  # a core.placement.Placements


def node_rows(program: RankProgram) -> list[dict]:
    """One row per node: the `dump --format json` node schema."""
    rows = []
    for stage, node in program.nodes():
        val = node.meta.get("val")
        shape = list(val.shape) if isinstance(val, torch.Tensor) else None
        rows.append({
            "name": node.name, "op": node.op, "target": _target_name(node),
            "shape": shape, "placement": node_placement(node, program.layouts),
            "collective": collective_kind(node) or _p2p_kind(program, stage, node),
            "stage": stage, "module": module_path(node),
        })
    return rows


def _p2p_kind(program: RankProgram, stage: int, node: fx.Node) -> str | None:
    """recv for a stage input made by another stage, send for a stage's outputs."""
    pipeline = program.pipeline
    if pipeline is None:
        return None
    value = pipeline.values.get(node.name)
    if node.op == "placeholder" and value is not None and value.producer >= 0:
        return "recv"
    if node.op == "output" and stage != pipeline.num_stages - 1 and node.args[0]:
        return "send"
    return None


def cut_summary(program: RankProgram) -> list[str]:
    """One line per value crossing a stage boundary: producer -> consumers, shape."""
    pipeline = program.pipeline
    if pipeline is None:
        return []
    lines = []
    for name, value in pipeline.values.items():
        if value.producer < 0:
            continue
        consumers = pipeline.consumers[name]
        no_gradient = value.dtype.is_floating_point and not value.differentiable
        lines.append(f"  {name}: stage {value.producer} -> stage(s) "
                     f"{', '.join(map(str, consumers))}  {'x'.join(map(str, value.shape))} "
                     f"{str(value.dtype).removeprefix('torch.')}"
                     + ("  (no gradient: made from constants and buffers)" if no_gradient else ""))
    return lines


def explain(program: RankProgram) -> str:
    """The header, one row per node (placement, stage, collective) and the stage cuts."""
    rows = node_rows(program)
    header = (f"rank {program.rank}  coords {program.coords}  plan {program.plan}\n"
              f"{len(program.stages)} stage(s), {len(rows)} nodes, "
              f"{sum(r['collective'] is not None for r in rows)} inserted collectives, "
              f"{len([l for l in program.layouts.values() if not l.is_buffer])} parameters "
              f"({program.local_numel():,} local elements)")
    widths = (28, 14, 40, 20, 12, 6, 16)
    title = ("node", "op", "target", "shape", "placement", "stage", "collective")
    lines = [header]
    context = program.stages[-1].gm.meta.get(meta.CP_RECORD)
    if context is not None:  # the layout, the padding and where the sequence was gathered
        lines.append(str(context))
    statistics = program.stages[-1].gm.meta.get(meta.STATISTICS_RECORD)
    if statistics is not None and (statistics.statistics or statistics.per_rank):
        lines.append(str(statistics))
    experts = [stage.gm.meta[meta.EP_RECORD] for stage in program.stages
               if meta.EP_RECORD in stage.gm.meta]
    if experts:  # each MoE layer, the experts here, the dispatch
        lines.append(str(experts[0]))
    lines += [_row(title, widths), _row(["-" * (w - 1) for w in widths], widths)]
    for r in rows:
        shape = "x".join(map(str, r["shape"])) if r["shape"] is not None else ""
        lines.append(_row((r["name"], r["op"], r["target"], shape, r["placement"],
                           str(r["stage"]), r["collective"] or ""), widths))
    cuts = cut_summary(program)
    if cuts:
        lines += ["values crossing stage cuts (sent producer -> consumer rank):", *cuts]
    return "\n".join(lines)


def pass_log(program: RankProgram) -> str:
    """The ordered pass pipeline for this rank: whether each pass ran and what it recorded."""
    lines = [f"rank {program.rank}  coords {program.coords}  plan {program.plan}",
             f"{'#':>2} {'pass':<18} {'status':<10} {'took':>10}  recorded"]
    lines += [f"{index:>2} {outcome}" for index, outcome in enumerate(program.passes, 1)]
    return "\n".join(lines)


def _row(cells, widths) -> str:
    return "".join(str(c)[: w - 1].ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def _target_name(node: fx.Node) -> str:
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target)) if not isinstance(
            node.target, torch._ops.OpOverload) else str(node.target)
    return str(node.target)
