"""The plan search, auto_plan, the plan CLI and the reports."""

import argparse
import json

import pytest

from core.plan import Plan
from cost_model.hardware import parse_cluster
from cost_model.search import auto_plan, search
from cost_model.shapes import TransformerShape

ONE_T = TransformerShape(layers=128, hidden=25600, heads=160, seq=2048)


def test_1t_search_on_3072_gpus_fits_and_ranks():
    res = search(ONE_T, parse_cluster("3072xA100-80G"), 3072, top_k=4)
    assert len(res.plans) == 4 and res.evaluated > 500
    times = [e.step_time_s for e in res.plans]
    assert times == sorted(times)
    best = res.chosen
    assert best.fits and best.plan.tp * best.plan.pp * best.plan.cp * best.plan.dp == 3072
    assert 0.3 < best.mfu < 0.8
    assert any("out of memory by" in r.reason for r in res.rejected)


def test_fix_restricts_the_search():
    res = search(ONE_T, parse_cluster("512xA100-80G"), 512, fixed="tp=8,pp=64", top_k=3)
    assert all(e.plan.tp == 8 and e.plan.pp == 64 for e in res.plans)


def test_fixed_async_tp_searches_sequence_parallel_plans_with_overlapped_collectives():
    gpt3 = TransformerShape.megatron_gpt(layers=96, hidden=12288, heads=96)
    cluster = parse_cluster("64xA100-80G")
    fixed = "tp=8,pp=8,schedule=1f1b,recompute=selective"
    plain = search(gpt3, cluster, 64, fixed=fixed + ",sp=on", top_k=1).chosen
    overlapped = search(gpt3, cluster, 64, fixed=fixed + ",async_tp=on", top_k=1).chosen
    assert overlapped.plan.sp and overlapped.plan.async_tp
    assert overlapped.step_terms_s["tp"] < plain.step_terms_s["tp"]
    assert overlapped.step_time_s < plain.step_time_s
    with pytest.raises(ValueError, match="async_tp='maybe': use on or off"):
        search(gpt3, cluster, 64, fixed="async_tp=maybe")


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="unknown GPU"):
        parse_cluster("64xTPU9")
    with pytest.raises(ValueError, match="cannot hold this model"):
        search(ONE_T, parse_cluster("8xA100-40G"), 8)
    with pytest.raises(ValueError, match="tp=7"):
        search(ONE_T, parse_cluster("64xH100"), 64, fixed="tp=7")
    with pytest.raises(ValueError, match="sp=on needs tp>1"):
        search(ONE_T, parse_cluster("64xH100"), 64, fixed="sp=on")
    with pytest.raises(ValueError, match="--fix"):
        search(ONE_T, parse_cluster("64xH100"), 64, fixed="foo=1")


def test_moe_search_uses_expert_parallelism():
    shape = TransformerShape(layers=8, hidden=1024, heads=16, experts=8, topk=2, swiglu=True,
                             seq=2048)
    res = search(shape, parse_cluster("16xH100"), 64, top_k=3)
    assert res.chosen.fits
    with pytest.raises(ValueError, match="experts"):
        search(shape, parse_cluster("16xH100"), 64, fixed="ep=3")


def test_auto_plan_is_a_valid_plan():
    shape = TransformerShape(layers=4, hidden=256, heads=8, vocab=1024, seq=128)
    fields = auto_plan(shape, 4, "cpu", global_batch=8, seq=128)
    plan = Plan(**fields).resolve(4)
    assert plan.world_size == 4
    assert not plan.pending()  # nothing parallelize would refuse (etp follows tp)


def _cli(argv):
    mod = pytest.importorskip("partitioner.report.plan_cli")
    parser = argparse.ArgumentParser()
    mod.add_arguments(parser)
    return mod.run(parser.parse_args(argv))


def test_plan_cli_json_schema(capsys):
    pytest.importorskip("partitioner.models")
    assert _cli(["gpt:layers=8,hidden=1024,heads=16", "--cluster", "16xH100", "--json",
                 "--top", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["chosen"] == 0 and len(out["plans"]) == 2 and out["search_time_s"] > 0
    for key in ("plan", "step_time_s", "tflops_per_gpu", "mfu", "memory_gib_per_gpu",
                "bubble_fraction", "comm_fraction"):
        assert key in out["plans"][0]
    assert out["plans"][0]["step_time_s"] <= out["plans"][1]["step_time_s"]


def test_plan_cli_prints_the_step_split_and_mfu(capsys):
    """`plan --json` carries the chosen plan's step by term, its stages' memory by part, and the
    text output prints the same split (each term's seconds and share) and the MFU."""
    pytest.importorskip("partitioner.models")
    from cost_model.step_time import STEP_TERMS
    from partitioner.report.planning import TERM_NAMES

    argv = ["gpt:layers=8,hidden=1024,heads=16", "--cluster", "16xH100", "--fix", "pp=2",
            "--top", "2"]
    assert _cli(argv + ["--json"]) == 0
    best = json.loads(capsys.readouterr().out)["plans"][0]
    terms = best["step_terms_s"]
    assert tuple(terms) == STEP_TERMS
    assert sum(terms.values()) == pytest.approx(best["step_time_s"], rel=1e-12)
    assert len(best["stages"]) == 2 and best["stages"][1]["stage"] == 1
    for stage in best["stages"]:
        parts = stage["memory_gib"]
        assert sum(v for k, v in parts.items() if k != "total") == pytest.approx(parts["total"])
    assert best["memory_breakdown_gib"]["total"] == pytest.approx(best["memory_gib_per_gpu"])
    assert _cli(argv) == 0
    text = capsys.readouterr().out
    assert (f"chosen plan: {best['step_time_s']:.3f} s/step, MFU {best['mfu']:.1%}" in text)
    mem = best["memory_breakdown_gib"]  # the allocator's margin and the reserve, named
    assert (f"allocator margin {mem['allocator']:.2f} (" in text
            and f"reserved outside the allocator {mem['reserved']:.2f}" in text)
    printed = {}
    for line in text.split("step time by term:\n")[1].split("\n\n")[0].splitlines():
        name, seconds, unit, share = line.strip().rsplit(None, 3)
        printed[name] = (seconds, unit, share)
    assert printed == {TERM_NAMES[k]: (f"{v:.4f}", "s", f"{v / best['step_time_s']:.1%}")
                       for k, v in terms.items() if v > 0}


def test_plan_cli_reports_and_hf_config(tmp_path, capsys):
    pytest.importorskip("partitioner.models")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 8,
                               "hidden_size": 1024, "num_attention_heads": 16,
                               "num_key_value_heads": 4, "intermediate_size": 2816,
                               "vocab_size": 32000, "max_position_embeddings": 2048}))
    html_path, md_path = tmp_path / "r.html", tmp_path / "r.md"
    assert _cli([str(cfg), "--cluster", "16xH100", "--report", str(html_path)]) == 0
    assert _cli(["mixtral-8x7b", "--cluster", "64xH100", "--report", str(md_path),
                 "--top", "2"]) == 0
    page = html_path.read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page and "http://" not in \
        page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "Rejected families" in page and "Pipeline timeline" in page
    md = md_path.read_text()
    assert "| # |" in md and "Rejected families" in md
    with pytest.raises(ValueError, match="unknown GPU"):
        _cli(["gpt3-175b", "--cluster", "8xB300"])
    with pytest.raises(ValueError, match=".html or .md"):
        _cli(["gpt3-175b", "--cluster", "64xH100", "--report", str(tmp_path / "x.pdf")])


def test_pipeline_timeline_simulation_matches_closed_form():
    from partitioner.report.planning import simulate_pipeline

    p, m = 4, 8
    ev = simulate_pipeline([1.0] * p, [2.0] * p, m, "1f1b")
    assert max(t1 for *_, t1 in ev) == pytest.approx((m + p - 1) * 3.0)
    ev = simulate_pipeline([1.0] * p, [2.0] * p, m, "gpipe")
    assert len(ev) == 2 * p * m


LLAMA_405B = TransformerShape(layers=126, hidden=16384, heads=128, vocab=128256, seq=8192,
                              kv_heads=8, ffn=53248, swiglu=True, norm="rmsnorm", bias=False,
                              tie_embeddings=False, learned_positions=False)


def test_search_interleaves_126_layers_with_fewer_layers_on_the_first_and_last_stage():
    """126 layers divide by no pp*vpp at pp=16: the search tries Megatron's uneven layouts
    (first and last virtual stage fewer, the middle equal) instead of skipping interleaving,
    and one of them beats every plan without interleaving."""
    res = search(LLAMA_405B, parse_cluster("2048xH100"), 2048, fixed="tp=8,pp=16", top_k=50)
    best = res.chosen.plan
    assert best.schedule == "interleaved-1f1b" and best.vpp > 1
    layout = best.stage_layers
    assert len(layout) == 16 * best.vpp and sum(layout) == 126
    assert layout[0] == layout[-1] < layout[1] and len(set(layout[1:-1])) == 1
    assert Plan.parse(str(best)) == best  # a plan string the runtime takes as is
    flat = [e for e in res.plans if e.plan.vpp == 1]
    assert flat and res.chosen.step_time_s < min(e.step_time_s for e in flat)
    # a layout given with --fix is costed as given
    fixed = search(LLAMA_405B, parse_cluster("2048xH100"), 2048, top_k=1,
                   fixed="tp=8,pp=16,vpp=2,schedule=interleaved-1f1b,stage_layers=3/4*30/3")
    assert fixed.chosen.plan.stage_layers == (3,) + (4,) * 30 + (3,)
    with pytest.raises(ValueError, match="stage_layers=3/4\\*30/2 places 125 layers"):
        search(LLAMA_405B, parse_cluster("2048xH100"), 2048, top_k=1,
               fixed="tp=8,pp=16,vpp=2,schedule=interleaved-1f1b,stage_layers=3/4*30/2")


def test_search_takes_selective_recompute_where_it_fits_and_none_does_not():
    """Korthikanti et al.'s GPT-3 175B on 64 A100s (tp=8, pp=8, batch 64): without recomputation
    a rank needs more than the 80 GiB, with selective recomputation (the attention core
    recomputed) it fits and beats full recomputation, as the paper ran it."""
    gpt3 = TransformerShape.megatron_gpt(layers=96, hidden=12288, heads=96, seq=2048,
                                         vocab=51200)
    cluster = parse_cluster("64xA100-80G")
    res = search(gpt3, cluster, 64, fixed="tp=8,pp=8", top_k=50)
    assert res.chosen.plan.recompute == "selective" and res.chosen.fits
    assert res.chosen.memory_gib > 60  # near the limit, not far below it
    assert {e.plan.recompute for e in res.plans} >= {"selective", "full"}
    assert all(e.plan.recompute != "none" for e in res.plans)
    with pytest.raises(ValueError, match="needs .* GiB more"):
        search(gpt3, cluster, 64, fixed="tp=8,pp=8,recompute=none,sp=on,mb=64,schedule=1f1b")
