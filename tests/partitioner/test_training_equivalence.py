"""Several AdamW steps through the parallel model keep every weight equal to single-device
training (float64, tight), for every strategy that has landed: one spawn per world size, every
strategy of that size checked in it. A strategy that lands joins with one line in STRATEGIES
(the guard below fails until it does)."""

from __future__ import annotations

import pytest
import torch

from core.plan import Plan
from equivalence import assert_passed, equivalence_worker
from passes.registry import PIPELINE
from ranks import on_ranks

STEPS = 3

# (name, plan, world size[, model]): one line per strategy, on the same Llama-style model (GQA,
# RoPE, SwiGLU, untied embeddings, vocab-parallel head under tp); its MoE variant for ep.
STRATEGIES = [
    ("tp", "tp=2", 2),
    ("tp+sp", "tp=2,sp=on", 2),
    ("async tp", "tp=2,sp=on,async_tp=on", 2),
    ("pp 1F1B", "pp=2,mb=2,schedule=1f1b", 2),
    ("pp interleaved 1F1B", "pp=2,vpp=2,mb=2,schedule=interleaved-1f1b", 2),
    ("pp zero-bubble H1", "pp=2,mb=4,schedule=zb-h1", 2),
    ("pp zero-bubble V", "pp=2,vpp=2,mb=2,schedule=zb-v", 2),
    ("dp", "dp=2", 2),
    ("dp zero-1", "dp=2,zero=1", 2),
    ("mixed precision bf16", "tp=2,param_dtype=bf16", 2),
    ("cp ring", "cp=2,cp_algo=ring", 2),
    ("cp all-to-all", "cp=2,cp_algo=a2a", 2),
    ("ep", "ep=2", 2, "tiny_moe"),
    ("ep beside cp", "cp=2,ep=2", 2, "tiny_moe"),
    ("tp+sp+pp+recompute", "tp=2,sp=on,pp=2,mb=2,recompute=selective", 4),
    ("ep over tp, pp", "tp=2,ep=2,etp=1,pp=2,mb=2", 4, "tiny_moe"),
    ("ep with expert tp", "tp=2,ep=2", 4, "tiny_moe"),
]


def _cases(world: int) -> list:
    options = dict(steps=STEPS, weights_every_step=True)
    # casting keeps fp32 main weights: its model is given in float32 (and stepped with SGD,
    # compared with one device under the same casting)
    return [(name, model[0] if model else "tiny_llama", {}, plan,
             torch.float32 if "param_dtype" in plan else torch.float64, options)
            for name, plan, size, *model in STRATEGIES if size == world]


@pytest.mark.parametrize("world", sorted({size for _, _, size, *_ in STRATEGIES}))
def test_adamw_steps_keep_every_weight_equal_to_one_device(world):
    cases = _cases(world)
    results = on_ranks(world, equivalence_worker, cases)
    assert_passed(results, cases)
    for reports in results:  # every step's weights were compared, not only the last
        assert all({"weights_after_adamw", "weights_after_sgd"} & set(report.errors)
                   for _, report in reports)


def test_every_landed_strategy_is_in_the_list():
    """A pass that a plan switches on (not the always-on ones) and that has landed is run by
    some line above; dp and zero-1 (runtime, not passes) are listed by hand."""
    plans = [Plan.parse(plan) for _, plan, *_ in STRATEGIES]
    for entry in PIPELINE:
        if entry.run is not None and not entry.applies(Plan()):
            assert any(entry.applies(plan) for plan in plans), (
                f"{entry.name} ({entry.when}) has landed: add a line to STRATEGIES")
    assert any(plan.zero for plan in plans) and any((plan.dp or 1) > 1 for plan in plans)
