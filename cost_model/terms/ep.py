"""Expert-parallel time terms of an MoE block: the token dispatch and combine all-to-alls, and
on this package's runtime under context parallelism the sequence gathers around them."""

from __future__ import annotations

from cost_model.comm import CollectiveCost, collective_parts
from cost_model.layer_costs import BlockCosts
from cost_model.traits import CommTerm, Traits


def block(tr: Traits, bc: BlockCosts, moe: bool) -> CommTerm:
    """Dispatch and combine, each way, on an MoE block (nothing on a dense one). Each rank
    dispatches its 1/cp share of the sequence (`BlockCosts.ep_bytes` counts this rank's
    tokens), under cp on either runtime."""
    if not moe or tr.plan.ep == 1:
        return CommTerm()
    a2a = collective_parts("all_to_all", bc.ep_bytes(*tr.args), tr.groups.ep, tr.hw)
    gather, scatter = cp_sequence_gathers(tr)
    return CommTerm(2 * a2a.seconds + gather.seconds, 2 * a2a.seconds + scatter.seconds,
                    2 * a2a.transfer + gather.transfer, 2 * a2a.transfer + scatter.transfer)


def cp_sequence_gathers(tr: Traits) -> tuple[CollectiveCost, CollectiveCost]:
    """(forward, backward) of the cp collectives an MoE block adds on this package's runtime:
    the context-parallel pass gathers the block's tokens whole (the router's top-k has no rule
    on sequence shards) and the dispatch gathers each cp rank's returned share whole again, two
    (B, S, h) all-gathers over cp forward and their reduce-scatters backward (the slices back
    to this rank's tokens cost nothing). Megatron-Core routes the local shard: none there."""
    p = tr.plan
    if tr.runtime != "partitioner" or p.cp == 1:
        return CollectiveCost(0.0, 0.0), CollectiveCost(0.0, 0.0)
    whole = tr.hw.elem_bytes * tr.tokens * p.cp * tr.shape.hidden
    gather = collective_parts("all_gather", whole, tr.groups.cp, tr.hw)
    scatter = collective_parts("reduce_scatter", whole, tr.groups.cp, tr.hw)
    return (CollectiveCost(2 * gather.latency, 2 * gather.transfer),
            CollectiveCost(2 * scatter.latency, 2 * scatter.transfer))
