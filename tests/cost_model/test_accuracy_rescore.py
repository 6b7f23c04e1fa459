"""benchmarks/cost_model_accuracy.py --rescore: saved measurements against the current model,
without measuring (the measuring itself is the benchmark's job)."""

import importlib.util
import json
from pathlib import Path

import pytest

from cost_model.hardware import available_cores

pytest.importorskip("partitioner.models")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "cost_model_accuracy", ROOT / "benchmarks" / "cost_model_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _old_profile(path: Path) -> Path:
    """A profile as calibrate.py wrote it before it recorded cores: raw measurements of 2 ranks,
    all-gather timed (through the list API) at half all-reduce's bus bandwidth."""
    alpha, bw = 100e-6, 1e9
    sizes = (4096, 65536, 1 << 20, 8 << 20)
    coll = {f"all_reduce:{S}": 2 * alpha + S / bw for S in sizes}
    coll.update({f"all_gather:{S}": alpha + S / (0.5 * bw) for S in sizes})
    matmul = [{"m": n, "n": n, "k": n, "seconds": 2 * n ** 3 / 5e10, "flops": 5e10}
              for n in (32, 64, 128, 256)]
    path.write_text(json.dumps({
        "hardware": {"name": "cpu-calibrated", "peak_flops": 5e10, "memory_bytes": 8e9,
                     "hbm_bw": 2e10, "intra_bw": bw, "inter_bw": bw},
        "measurements": {"matmul": matmul, "memcpy_bytes_per_s": 2e10, "collectives_s": coll,
                         "ranks": 2}}))
    return path


def test_old_profile_is_fitted_again_with_the_cores_of_this_machine(bench, tmp_path):
    hw = bench.load_hardware(_old_profile(tmp_path / "profile.json"))
    assert hw.cores == available_cores() // bench.OLD_PROFILE_THREADS
    assert hw.elem_bytes == 4 and hw.reduce_scatter_is_all_reduce
    assert hw.intra_bw == pytest.approx(1e9) and hw.intra_latency == pytest.approx(100e-6)
    assert hw.all_gather_eff == 1.0  # the list API's timings say nothing of the runtime's call


def test_rescore_scores_saved_seconds_against_the_current_model(bench, tmp_path, capsys):
    profile = _old_profile(tmp_path / "profile.json")
    hw = bench.load_hardware(profile)
    plans = ["dp=4,mb=1", "dp=4,zero=1", "tp=2,dp=2", "tp=4", "pp=2,dp=2,mb=2",
             "tp=2,pp=2,mb=2"]
    predicted = {p: bench.predict(p, hw)["predicted_s"] for p in plans}
    by_prediction = sorted(plans, key=predicted.get)
    for order, want_rc, want_rho in ((by_prediction, 0, 1.0), (by_prediction[::-1], 1, -1.0)):
        # measured seconds that rank the plans in `order`
        saved = {"plans": [{"plan": p, "measured_s": 1.0 + i} for i, p in enumerate(order)],
                 "skipped": [{"plan": "cp=2,dp=2", "why": "NotImplementedError"}]}
        results = tmp_path / "results.json"
        results.write_text(json.dumps(saved))
        out = tmp_path / "rescored.json"
        assert bench.rescore(results, profile, out) == want_rc
        table = json.loads(out.read_text())
        assert table["spearman"] == pytest.approx(want_rho)
        for row in table["plans"]:
            assert row["predicted_s"] == pytest.approx(predicted[row["plan"]])
            assert row["error"] == pytest.approx(row["predicted_s"] / row["measured_s"] - 1)
    assert "skipped cp=2,dp=2" in capsys.readouterr().out
