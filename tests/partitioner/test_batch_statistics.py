"""A loss the model computes over every token of the batch (Hugging Face's router
load-balancing loss) cannot be split over ranks holding different tokens yet: refused before
anything runs, never silently per rank. Programs are compiled without a process group here."""

from __future__ import annotations

import pytest
import torch

from core.plan import Plan, PlanError
from partitioner.executor import Programs

pytest.importorskip("transformers")


def _mixtral(**config):
    from model_zoo import hf_mixtral

    model, (ids,) = hf_mixtral(batch=2, seq=8, experts_implementation="batched_mm",
                               num_hidden_layers=1, **config)
    return model, ids


@pytest.mark.parametrize("plan", ["dp=2", "cp=2", "ep=2"])
def test_router_aux_loss_over_split_tokens_is_refused_with_the_way_out(plan):
    model, ids = _mixtral(output_router_logits=True)
    programs = Programs(model, Plan.parse(plan).resolve(2), 0, torch.device("cpu"))
    with pytest.raises(PlanError, match=r"router load-balancing loss \(output_router_logits="
                                        r"True, router_aux_loss_coef=0.0\d+\).*set "
                                        r"output_router_logits=False"):
        programs.get((), {"input_ids": ids, "labels": ids})


@pytest.mark.parametrize("plan, config, kwargs", [
    ("ep=2,tp=2,etp=1,dp=1", {"output_router_logits": True}, {"labels": True}),  # same tokens
    ("dp=2", {"output_router_logits": False}, {"labels": True}),
    ("dp=2", {"output_router_logits": True}, {}),  # no labels: no loss from the model
    ("dp=2", {"output_router_logits": True, "router_aux_loss_coef": 0.0}, {"labels": True}),
])
def test_what_computes_no_split_statistic_compiles(plan, config, kwargs):
    model, ids = _mixtral(**config)
    world = 4 if "tp=2" in plan and "dp=2" in plan else 2
    programs = Programs(model, Plan.parse(plan).resolve(world), 0, torch.device("meta"))
    programs.get((), {"input_ids": ids, **({"labels": ids} if kwargs else {})})
