"""Expert capacity (`capacity_factor`) under expert parallelism against its single-device
reference: the rule of core/capacity.py applied to each dp shard's microbatch (which tokens
compete depends on which share a rank, so the reference is the in-repo MoE with the same
`capacity_factor` run on each shard, not the dropless model on the whole batch). One spawn."""

from __future__ import annotations

import copy

import pytest
import torch

from core.capacity import within_capacity
from core.plan import Plan, PlanError
from partitioner.batches import split_batch
from partitioner.check import TOLERANCES, lm_loss, relative_error
from ranks import on_ranks

CASES = [("ep=2", 1.0, 1), ("ep=2,mb=2", 0.5, 2), ("tp=2,ep=2,etp=1", 0.75, 1)]
"""(plan, capacity_factor, microbatches): folded on dp (each rank's shard its own capacity),
with microbatches, and ep over tp (the shard's tokens compete before tp splits them)."""


def test_the_rule_keeps_each_experts_first_pairs_in_token_then_choice_order():
    indices = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    kept = within_capacity(indices, num_experts=4, capacity=2)
    assert kept.tolist() == [[True, True], [True, True], [False, True], [False, False]]


def test_capacity_needs_expert_parallelism():
    with pytest.raises(PlanError, match=r"capacity_factor=1.0 drops tokens in the expert "
                                        r"dispatch.*set ep>1"):
        Plan.parse("dp=2,capacity_factor=1.0")


def _with_capacity(cases):
    """Per case: relative errors of the loss and every gradient against the reference, the
    rows the experts received against what dropless dispatch sends, and explain()'s line."""
    import torch.distributed as dist

    from partitioner.api import parallelize
    from partitioner.models import tiny_moe

    out = {}
    for plan, factor, micro in cases:
        model, (ids,) = tiny_moe(batch=4)
        model = model.to(torch.float64)
        target = torch.randint(0, 512, ids.shape, generator=torch.Generator().manual_seed(3))
        reference = tiny_moe(batch=4, capacity_factor=factor)[0].to(torch.float64)
        reference.load_state_dict(copy.deepcopy(model.state_dict()))
        dp = Plan.parse(plan).resolve(dist.get_world_size()).dp
        shards = split_batch((ids, target), dp * micro, len(ids))
        ref_loss = sum(lm_loss(reference(i), t) for i, t in shards) / len(shards)
        ref_loss.backward()
        pm = parallelize(model, f"{plan},capacity_factor={factor}", example_inputs=(ids,),
                         loss_fn=lm_loss)
        loss = pm.step(ids, target=target)
        grads = pm.full_grad_dict()
        errors = {"loss": relative_error(loss, ref_loss),
                  "gradients": max(relative_error(grads[name], p.grad)
                                   for name, p in reference.named_parameters())}
        received = sum(sum(rows) for rows in pm.last_expert_rows)
        received = torch.tensor(float(received))
        dist.all_reduce(received)
        layers = model.config.n_layer
        out[plan] = (errors, int(received), len(ids) * ids.shape[1] * 2 * layers,
                     next(line for line in pm.explain().splitlines() if "keeps its first" in line))
    return out


def test_capacity_drops_the_same_pairs_as_its_single_device_reference():
    results = on_ranks(2, _with_capacity, CASES)
    for by_plan in results:
        for plan, factor, _ in CASES:
            errors, received, dropless, line = by_plan[plan]
            assert max(errors.values()) < TOLERANCES[torch.float64], (plan, errors)
            assert 0 < received < dropless, (plan, received, dropless)  # some pairs dropped
            assert "pairs in token order" in line
