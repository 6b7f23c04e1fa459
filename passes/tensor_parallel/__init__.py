"""Tensor parallelism (Megatron-style column/row splits) as an fx pass, found from dataflow.

A *region* starts at column-parallel linears (each rank keeps a slice of the output features)
and ends at the row-parallel linears their outputs flow into (each rank holds the matching slice
of the input features). Regions are found by walking node users from every linear through ops
that can carry a split (views, elementwise ops, attention, ...) until other linears close them;
linears whose walk reaches anything else (a norm, the graph output, a residual add) stay
replicated. `Plan.rules` overrides the finder by module path.

Inside a region every value is split along exactly one tensor dimension (a `Shard`, or a
`StridedShard` for a fused projection's output); where the split dim goes through each op is
the shared propagation table's answer (`passes.propagation`), and this pass's rules add what
only it knows: which constants count heads or hidden units (view/reshape sizes, split sizes,
slice bounds) and become local counts, from the FakeTensor shapes in `node.meta["val"]`.
Where a count does not divide by tp the pass refuses, naming the node, its module path and the
rule broken, before any collective runs.

Rewrite (Megatron-Core's f/g pair): `copy_to_region(x, "tp")` before the column linears (identity
forward, all-reduce backward); `linear(x, w)` -> `all_reduce(., "tp")` -> `+ bias` for the row
linears. A `vocab` rule makes a linear column-parallel over its output features followed by
`all_gather(., "tp", -1)`, so every rank sees the full output. The word embedding and the LM
head are `vocab` by default, as in Megatron-Core and torchtitan (`policy.default_vocab`; a
`replicate` rule keeps them whole). A `vocab` rule on an embedding
(Megatron's VocabParallelEmbedding) shards the table's rows: ids outside this rank's rows look up
row 0, their outputs are zeroed, and `all_reduce(., "tp")` sums the one rank that had each id.
A vocabulary tp does not divide is padded with zero rows (`Shard.padded`). A table tied to
an LM head takes one row shard for both uses when both are ruled `vocab`.

Grouped-query attention whose kv heads tp does not divide but which divide tp (kv=2, tp=4):
the k/v projections keep their weights replicated, read through `copy_to_region(w, "tp")` and
narrowed to this rank's kv head, so each kv head is computed on tp/kv ranks (`Shard.replicas`)
and the all-reduce in the copy's backward sums the per-rank gradient pieces into the true
gradient. The kv-head repeat (repeat_interleave, or HF's unsqueeze/expand/reshape) is rewritten
to produce exactly the query heads this rank holds; SDPA with enable_gqa takes the one kv head
as is.

Where each job lives: `projections` (what can be split: projections, lookups, fused blocks),
`regions` (the column/row region finder and one region's split), `rules` (the per-op rule
table), `policy` (which projection becomes column/row/vocab/replicated, and per region: split,
replicate, or replicate the kv heads), `diagnostics` (every problem found, with its `rules=`
fix), `rewrite` (this rank's program), `record` (what the pass did, in
`gm.meta[core.meta.TP_RECORD]`: sharded parameters, regions, inserted collectives, vocab-parallel
logits; the passes after it read this instead of the graph).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from core.meta import LAYOUTS, TP_RECORD
from core.placement import ParamLayout
from core.plan import Plan
from passes import PassContext, PassError, recompile
from passes.tensor_parallel.diagnostics import Problems
from passes.tensor_parallel.policy import Policy, RegionSplits, choose_policy, split_regions
from passes.tensor_parallel.projections import find_projections
from passes.tensor_parallel.regions import find_regions
from passes.tensor_parallel.rewrite import Rewriter
from passes.tensor_parallel.rules import MESH_DIM

__all__ = ["MESH_DIM", "analyse", "tensor_parallel"]


def tensor_parallel(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Split column/row-parallel regions over the "tp" mesh dimension (see module docstring)."""
    tp, graph = ctx.plan.tp, gm.graph
    layouts = seeded_layouts(gm)
    found = analyse(graph, ctx.plan)
    found.problems.raise_if_any(ctx.plan, graph, lambda plan: analyse(graph, plan).problems)
    rewriter = Rewriter(gm, found.projs, found.split.states, layouts, tp, ctx.coords[MESH_DIM])
    record = rewriter.run(found.split.regions, found.split.rewrites, found.policy.vocab_heads,
                          found.policy.vocab_lookups)
    gm.meta[LAYOUTS] = layouts
    gm.meta[TP_RECORD] = record
    graph.lint()
    recompile(gm)
    return gm


@dataclass(frozen=True, eq=False)
class Analysis:
    """What the pass would do to a graph under a plan, and every problem in the way; the graph
    is not changed, so a report can analyse it again under the plans it suggests."""

    projs: dict
    policy: Policy
    split: RegionSplits
    problems: Problems


def analyse(graph: fx.Graph, plan: Plan) -> Analysis:
    projs, lookups = find_projections(graph)
    policy = choose_policy(graph, projs, lookups, plan)
    problems = Problems()
    problems.check_rules_match(plan, list(projs) + lookups)
    regions, why_not = find_regions(projs, policy.rule_of, policy.skip)
    problems.check_policy(policy, why_not)
    split = split_regions(graph, regions, policy, plan.tp, problems, why_not)
    problems.check_something_splits(plan.tp, policy, split.regions, why_not)
    return Analysis(projs, policy, split, problems)


def seeded_layouts(gm: fx.GraphModule) -> dict[str, ParamLayout]:
    """A copy of the layouts compile_rank seeds from the capture (every parameter and buffer
    replicated, with the tied names, which the graph alone cannot tell from unused ones)."""
    seeded = gm.meta.get(LAYOUTS)
    if seeded is None:
        raise PassError(f"tensor_parallel needs gm.meta[{LAYOUTS!r}]: the parameter layouts "
                        f"seeded from the capture (partitioner.compiler.compile_rank sets them; "
                        f"a caller running the pass on its own sets them from "
                        f"layouts_from_capture)")
    return dict(seeded)
