"""The four runs of Korthikanti et al. 2022 (published-runs.md), predicted from the mechanisms."""

import pytest

from core.plan import Plan
from cost_model.hardware import parse_cluster
from cost_model.shapes import TransformerShape
from cost_model.step_time import estimate

# model, heads, hidden, layers, tp, pp, GPUs, batch, full s/iter, sp+selective s/iter, MFU, HFU
RUNS = [
    ("22B", 64, 6144, 48, 8, 1, 8, 4, 1.42, 1.10, 0.415, 0.437),
    ("175B", 96, 12288, 96, 8, 8, 64, 64, 18.13, 13.75, 0.514, 0.528),
    ("530B", 128, 20480, 105, 8, 35, 280, 280, 49.05, 37.83, 0.560, 0.570),
    ("1T", 160, 25600, 128, 8, 64, 512, 512, 94.42, 71.49, 0.563, 0.570),
]


@pytest.mark.parametrize("run", RUNS, ids=[r[0] for r in RUNS])
def test_korthikanti_runs_within_10_percent(run):
    name, a, h, L, tp, pp, gpus, batch, full, sel, mfu, hfu = run
    shape = TransformerShape.megatron_gpt(layers=L, hidden=h, heads=a)
    cluster = parse_cluster(f"{gpus}xA100-80G")
    m = batch if pp > 1 else 1  # micro-batch size 1 with pipelining, the whole batch without
    ours = estimate(shape, Plan(tp=tp, pp=pp, sp=True, recompute="selective",
                                     microbatches=m), cluster, batch)
    base = estimate(shape, Plan(tp=tp, pp=pp, sp=False, recompute="full", microbatches=m),
                    cluster, batch)
    assert ours.step_time_s == pytest.approx(sel, rel=0.10)
    assert base.step_time_s == pytest.approx(full, rel=0.10)
    assert ours.mfu == pytest.approx(mfu, rel=0.10)
    assert ours.hfu == pytest.approx(hfu, rel=0.10)
    assert ours.memory.total < 80e9 and base.memory.total < 80e9
    assert ours.fits and base.fits
