"""Pipeline split: assign every node of the graph to one of `pp * vpp` stages.

Candidate cuts are segment boundaries: the part before the first repeated block (embeddings,
positions, masks), each block of the model's repeated ModuleList (found as the module-path prefix
with an integer child that most nodes live under: `blocks.3`, `model.layers.3`, `transformer.h.3`)
and the part after the last block (final norm, head). A cut never falls inside a block, so no
TP region or attention is ever split. Cuts are chosen by `passes.stage_cut.choose_cuts` from the
cost model's per-node costs; `Plan.rules` entries of kind `pp_split` pin a cut before a module;
`Plan.stage_layers` fixes every cut: stage s holds its count of blocks, the first stage the part
before them too and the last stage the part after them.

The pass only annotates: `node.meta["pp.stage"]` for every computing node, and a
`PipelineCut` record (the segments and the cut) in `gm.meta["pp.split"]`. The lowering pass
(`passes.lowering.stages`) builds the stage graphs at the end of the pipeline, once every other
pass has rewritten the one flat graph.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from torch import fx

from core import meta
from core.fx_utils import module_path
from core.plan import layout_text
from cost_model.graph_costs import node_cost
from passes import PassContext, PassError
from passes.stage_cut import Segment, StageCut, choose_cuts

_INDEXED = re.compile(r"^(?P<prefix>.+?)\.(?P<index>\d+)(?:\.|$)")

NOMINAL_FLOPS = 1e12
"""Any positive rate: the cut minimizes the slowest stage, which does not depend on it."""


@dataclass(frozen=True)
class PipelineCut:
    """What the pipeline split chose: the model's segments and where the stages start."""

    segments: tuple[Segment, ...]
    cut: StageCut

    @property
    def stage_starts(self) -> tuple[str, ...]:
        """The first segment of each stage."""
        return tuple(self.segments[start].name for start in self.cut.bounds[:-1])

    def summary(self) -> str:
        stages = [f"{self.segments[a].name}..{self.segments[b - 1].name}" if b - a > 1
                  else self.segments[a].name
                  for a, b in zip(self.cut.bounds[:-1], self.cut.bounds[1:], strict=True)]
        return (f"{len(self.segments)} segments -> {self.cut.stages} stages: "
                f"{' | '.join(stages)}")


def block_prefix(gm: fx.GraphModule) -> str | None:
    """The module-path prefix of the repeated blocks (the one most nodes live under); a model
    of one block has its only indexed prefix taken."""
    counts: Counter[str] = Counter()
    indices: dict[str, set[int]] = {}
    for node in gm.graph.nodes:
        match = _INDEXED.match(module_path(node))
        if match:
            counts[match["prefix"]] += 1
            indices.setdefault(match["prefix"], set()).add(int(match["index"]))
    candidates = [p for p, _ in counts.most_common() if len(indices[p]) >= 2]
    if not candidates and len(counts) == 1:  # one block: blocks.0 is still a segment
        candidates = list(counts)
    return candidates[0] if candidates else None


def segment_of_nodes(gm: fx.GraphModule) -> tuple[list[str], dict[fx.Node, int]]:
    """Segment names in graph order and the segment index of every computing node.

    Nodes before the first block form "pre", nodes after the last block "post"; a node outside
    any block between two blocks stays with the block before it.
    """
    prefix = block_prefix(gm)
    computing = [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    block_of = {}
    for node in computing:
        match = _INDEXED.match(module_path(node))
        if prefix is not None and match and match["prefix"] == prefix:
            block_of[node] = f"{prefix}.{match['index']}"
    last_block = max((i for i, n in enumerate(computing) if n in block_of), default=-1)
    names: list[str] = []
    assignment: dict[fx.Node, int] = {}
    for position, node in enumerate(computing):
        if node in block_of:
            name = block_of[node]
        elif not names:
            name = "pre"
        elif last_block >= 0 and position > last_block:
            name = "post"
        else:
            name = names[-1]
        if not names or names[-1] != name:
            if name in names:
                raise PassError(f"pipeline_split: segment {name!r} is not contiguous in the "
                                f"graph (node {node.name}); pin cuts with rules=...:pp_split")
            names.append(name)
        assignment[node] = len(names) - 1
    return names, assignment


def pipeline_split(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    plan = ctx.plan
    stages = plan.stages
    names, assignment = segment_of_nodes(gm)
    if len(names) < stages:
        raise PassError(
            f"pipeline_split: plan {plan} needs pp*vpp={plan.pp}*{plan.vpp}={stages} stages but "
            f"the model has only {len(names)} cuttable segments ({', '.join(names)}); "
            + (f"zb-v puts two stages on every rank: use pp <= {len(names) // 2} or a model "
               f"with at least {stages} segments" if plan.schedule == "zb-v" else
               f"use pp*vpp <= {len(names)}"))
    segments = _segment_costs(gm, names, assignment)
    if plan.stage_layers is not None:
        pinned = _layout(plan, names)
    elif ctx.stage_starts is None:
        pinned = _pinned(plan, names)
    else:
        pinned = _reused(ctx, names)
    try:
        cut = choose_cuts(segments, stages, pinned=pinned)
    except ValueError as error:
        raise PassError(f"pipeline_split: {error}") from None
    for node, segment in assignment.items():
        node.meta[meta.PP_STAGE] = cut.stage_of(segment)
    gm.meta[meta.PP_SPLIT_RECORD] = PipelineCut(tuple(segments), cut)
    return gm


def _segment_costs(gm: fx.GraphModule, names: list[str],
                   assignment: dict[fx.Node, int]) -> list[Segment]:
    compute = [0.0] * len(names)
    memory = [0.0] * len(names)
    seen_params: set[str] = set()
    for node, segment in assignment.items():
        cost = node_cost(node)
        compute[segment] += (cost.fwd_flops + cost.bwd_flops) / NOMINAL_FLOPS
        memory[segment] += cost.saved_bytes
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and arg.target not in seen_params:
                seen_params.add(arg.target)
                val = arg.meta.get("val")
                if val is not None:  # parameter, gradient and two AdamW moments
                    memory[segment] += 4 * val.numel() * val.element_size()
    # Bytes crossing a cut after segment i: values made at or before i and used after it.
    last_use: dict[fx.Node, int] = {}
    for node, segment in assignment.items():
        for arg in node.all_input_nodes:
            if arg in assignment:
                last_use[arg] = max(last_use.get(arg, -1), segment)
    crossing = [0.0] * len(names)
    for value, last in last_use.items():
        val = value.meta.get("val")
        size = val.numel() * val.element_size() if hasattr(val, "numel") else 0
        for boundary in range(assignment[value], last):
            crossing[boundary] += size
    return [Segment(name, compute[i], memory[i], crossing[i]) for i, name in enumerate(names)]


def _layout(plan, names: list[str]) -> list[int]:
    """The segment starting each stage after the first, from `plan.stage_layers`."""
    if any(rule.kind == "pp_split" for rule in plan.rules):
        raise PassError(f"pipeline_split: plan {plan} gives both stage_layers and pp_split "
                        f"rules; the layout already fixes every cut: drop one of them")
    blocks = [i for i, name in enumerate(names) if name not in ("pre", "post")]
    layout = plan.stage_layers
    if len(blocks) != sum(layout):
        raise PassError(
            f"pipeline_split: stage_layers={layout_text(layout)} places {sum(layout)} "
            f"layers but the model has {len(blocks)} ({names[blocks[0]] if blocks else 'none'}"
            f"..{names[blocks[-1]] if blocks else ''}); give {plan.stages} counts summing to "
            f"{len(blocks)}, or leave stage_layers unset for the cost model's cut")
    ends = {0: "pre", len(layout) - 1: "post"}
    for stage, name in ends.items():
        if layout[stage] == 0 and name not in names:
            raise PassError(
                f"pipeline_split: stage_layers gives stage {stage} no layer, but the model has "
                f"nothing {'before its first' if stage == 0 else 'after its last'} block to "
                f"put there; give stage {stage} at least one layer")
    starts, done = [], 0
    for count in layout[:-1]:
        done += count
        starts.append(blocks[done] if done < len(blocks) else len(names) - 1)
    return starts


def _reused(ctx: PassContext, names: list[str]) -> list[int]:
    """The earlier program's cut as pins (one per stage after the first: the cut is fixed)."""
    missing = [name for name in ctx.stage_starts if name not in names]
    if missing or len(ctx.stage_starts) != ctx.plan.stages:
        raise PassError(f"pipeline_split: this input shape gives segments {names}, which do not "
                        f"hold the stage starts {list(ctx.stage_starts)} of the model's first "
                        f"program")
    return [names.index(name) for name in ctx.stage_starts[1:]]


def _pinned(plan, names: list[str]) -> list[int]:
    pinned = []
    for rule in plan.rules:
        if rule.kind != "pp_split":
            continue
        hits = [i for i, name in enumerate(names) if rule.matches(name)]
        if not hits:
            raise PassError(f"pipeline_split: rule {rule} matches no cuttable segment; "
                            f"segments are {', '.join(names)}")
        pinned.extend(i for i in hits if i > 0)
    return sorted(set(pinned))
