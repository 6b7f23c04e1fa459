"""Expert parallelism: each MoE layer's experts split over the ep group, tokens dispatched to
them by all-to-all.

Runs after the dense strategies, on their graph (1 < etp != tp is refused by the plan until it
lands). The ep group folds onto the dense ranks (Megatron-Core's parallel folding,
`core.layout.RankLayout.expert`: etp x ep x edp over tp x cp x dp), so the ranks of an ep group
must hold distinct tokens: dp ranks do; the ranks of a tp group hold the same ones (the TP and
SP passes leave the MoE block replicated over tp), and so do the ranks of a cp group (the CP
pass reads the MoE block's tokens gathered whole: the router's top-k has no rule on sequence
shards). So under tp either each expert is split over the tp ranks (etp = tp, Megatron's
default: they dispatch the same tokens, each computes its slice of every expert, the partial
results are all-reduced) or each tp rank dispatches its 1/tp of the tokens (etp = 1: a
`scatter`, whose backward gathers the gradients, and the returned rows gathered whole again).
Under cp each cp rank dispatches its 1/cp of the gathered tokens (a slice, whose backward pads
with zeros: the whole value's gradient is partial over cp, the CP pass's convention) and the
returned rows are gathered whole again (`gather_for_region`, whose backward reduce-scatters).
"dp=4,ep=4" on 4 ranks holds a quarter of the experts per rank and sends each token to the
ranks holding its experts; "cp=2,ep=2" on 2 ranks, half the experts and half the tokens.

`find.find_layers` finds the layers from the router's dataflow; `dispatch.LayerRewriter`
turns each into dispatch -> grouped GEMMs -> return. The stacked expert weights are split along
their expert dim over ep (`Shard(0)@ep`, and inside over etp), so their gradients are this
rank's experts', summed by the runtime over the expert-data-parallel group (edp), while dense
gradients stay summed over dp x cp. Experts held as an nn.ModuleList of MLPs (a Python loop
over them) have one set of parameters per expert: each is held whole by the ep rank of its
expert (`Held(rank)@ep`: the other ranks have no piece of it, as pipeline stages hold their
layers), this rank's experts' weights stacked in the graph for the grouped GEMMs; the
tensor-parallel pass leaves their Linears replicated (etp=1).
"""

from __future__ import annotations

import dataclasses

from torch import fx

from core import meta
from core.divisibility import divisors
from passes import PassContext, PassError, recompile
from passes.expert_parallel.dispatch import LayerRewriter
from passes.expert_parallel.find import find_layers
from passes.expert_parallel.record import ExpertParallelRecord, MoELayer

__all__ = ["ExpertParallelRecord", "MoELayer", "expert_parallel"]


def expert_parallel(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    ep = ctx.plan.ep
    layers = find_layers(gm)
    if not layers:
        raise PassError(
            f"ep={ep} splits the experts of MoE layers, and this model has none that the "
            f"expert-parallel pass recognises (a router's top-k over expert scores whose "
            f"indices weight every expert's output, the experts held as stacked (E, in, out) "
            f"parameters). Set ep=1")
    problems = []
    for layer in layers:
        if layer.num_experts % ep:
            valid = ", ".join(str(d) for d in divisors(layer.num_experts))
            problems.append(f"MoE layer {layer.path} has {layer.num_experts} experts, which do "
                            f"not split evenly over ep={ep}: ep must divide the experts "
                            f"(valid ep: {valid})")
    if problems:
        raise PassError("; ".join(problems))
    records = [LayerRewriter(gm, layer, ep, ctx.coords["ep"], ctx.plan.tp,
                             ctx.plan.expert_tp, ctx.plan.capacity_factor, ctx.plan.cp,
                             ctx.coords["cp"]).run()
               for layer in layers]
    layouts = dict(gm.meta[meta.LAYOUTS])
    for record in records:
        for name, placements in record.placements:
            layouts[name] = dataclasses.replace(layouts[name], placements=placements)
    gm.meta[meta.LAYOUTS] = layouts
    gm.meta[meta.EP_RECORD] = ExpertParallelRecord(ep, ctx.coords["ep"], tuple(records))
    gm.graph.lint()
    recompile(gm)
    return gm
