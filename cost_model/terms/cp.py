"""Context-parallel time terms of a block's attention: the ring's k/v hops, hidden behind the
attention of the blocks already held, Ulysses' (a2a) four all-to-alls each way, or (allgather)
k and v all-gathered before attention and their gradients reduce-scattered after it, exposed
(Llama 3: "Although the all-gather communication latency is exposed in the critical path")."""

from __future__ import annotations

from cost_model.comm import collective_parts
from cost_model.layer_costs import BlockCosts
from cost_model.traits import CommTerm, Traits


def block(tr: Traits, bc: BlockCosts) -> CommTerm:
    p = tr.plan
    if p.cp == 1:
        return CommTerm()
    if p.cp_algo == "ring":
        hop = collective_parts("send", bc.cp_bytes(*tr.args), tr.groups.cp, tr.hw)
        ring = (p.cp - 1) * hop.seconds
        attention = bc.attention_fwd(*tr.args)
        # backward: k/v and their gradients around the ring, behind the attention backward
        return CommTerm(max(0.0, ring - attention), max(0.0, 2 * ring - 2.5 * attention),
                        (p.cp - 1) * hop.transfer, 2 * (p.cp - 1) * hop.transfer)
    if p.cp_algo == "allgather":
        kv = bc.cp_bytes(*tr.args) * p.cp  # every rank's k and v chunk, gathered
        gather = collective_parts("all_gather", kv, tr.groups.cp, tr.hw)
        scatter = collective_parts("reduce_scatter", kv, tr.groups.cp, tr.hw)
        return CommTerm(gather.seconds, scatter.seconds, gather.transfer, scatter.transfer)
    a2a = collective_parts("all_to_all", 2 * bc.tp_bytes(*tr.args) / p.tp, tr.groups.cp, tr.hw)
    return CommTerm(4 * a2a.seconds, 4 * a2a.seconds, 4 * a2a.transfer, 4 * a2a.transfer)
