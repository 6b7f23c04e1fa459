"""Expert-parallel time terms of an MoE block: the token dispatch and combine all-to-alls."""

from __future__ import annotations

from cost_model.comm import collective_parts
from cost_model.layer_costs import BlockCosts
from cost_model.traits import CommTerm, Traits


def block(tr: Traits, bc: BlockCosts, moe: bool) -> CommTerm:
    """Dispatch and combine, each way, on an MoE block (nothing on a dense one)."""
    if not moe or tr.plan.ep == 1:
        return CommTerm()
    a2a = collective_parts("all_to_all", bc.ep_bytes(*tr.args), tr.groups.ep, tr.hw)
    return CommTerm(2 * a2a.seconds, 2 * a2a.seconds, 2 * a2a.transfer, 2 * a2a.transfer)
