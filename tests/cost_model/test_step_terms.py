"""Estimate.step_terms_s: the step split by term (what `plan --json`, the text output and the
report draw) adds up to the predicted step, agrees with the estimate's own terms, and moves
by closed-form amounts when one thing changes."""

import dataclasses

import pytest

from cost_model.hardware import Cluster, local_cpu, parse_cluster
from cost_model.search import search
from cost_model.shapes import TransformerShape
from cost_model.step_time import STEP_TERMS, estimate

LLAMA_70B = TransformerShape(layers=80, hidden=8192, heads=64, kv_heads=8, ffn=28672,
                             vocab=128256, seq=8192, norm="rmsnorm", swiglu=True, bias=False,
                             tie_embeddings=False, learned_positions=False)
MOE = TransformerShape(layers=8, hidden=1024, heads=16, ffn=2816, seq=1024, swiglu=True,
                       experts=8, topk=2)
GPT3 = TransformerShape.megatron_gpt(layers=24, hidden=2048, heads=16)


def _cpu_host(cores: int, ranks: int) -> Cluster:
    hw = dataclasses.replace(local_cpu(), cores=cores, gpus_per_node=ranks)
    return Cluster(hardware=hw, num_gpus=ranks, gpus_per_node=ranks)


def _estimates():
    """Searched plans of dense, MoE and unfused-attention models on GPUs, and plans on a CPU
    host whose 4 ranks share 2 cores or have 8, on both runtimes."""
    for shape, cluster, batch in ((LLAMA_70B, "64xH100", 64), (MOE, "16xH100", 32),
                                  (GPT3, "32xA100-80G", 64)):
        yield from search(shape, parse_cluster(cluster), batch, top_k=12).plans
    small = TransformerShape(layers=4, hidden=256, heads=8, seq=128, vocab=1024)
    for plan in ("tp=2,pp=2,mb=4", "dp=4", "tp=2,sp=on,pp=2,mb=2,recompute=full",
                 "cp=2,dp=2,cp_algo=a2a"):
        for runtime in ("megatron", "partitioner"):
            yield estimate(small, plan, _cpu_host(2, 4), 16, runtime=runtime)
            yield estimate(small, plan, _cpu_host(8, 4), 16, runtime=runtime)


@pytest.mark.parametrize("est", list(_estimates()), ids=lambda e: str(e.plan))
def test_terms_sum_to_the_step_and_match_the_estimates_own_terms(est):
    terms = est.step_terms_s
    assert tuple(terms) == STEP_TERMS and all(v >= 0 for v in terms.values()), terms
    assert sum(terms.values()) == pytest.approx(est.step_time_s, rel=1e-12)
    assert terms["dp"] == est.dp_exposed_s and terms["optimizer"] == est.optimizer_s
    assert terms["embedding"] == est.comm_s["embedding"]
    assert terms["bubble"] == est.bubble_s
    assert terms["pp"] == pytest.approx(est.comm_s["pp"] if est.plan.pp > 1 else 0.0, rel=1e-12)
    if est.plan.stage_layers is None:  # layers split evenly: the mean rank is the slowest one
        for kind in ("cp", "ep"):
            assert terms[kind] == pytest.approx(est.comm_s[kind], rel=1e-12, abs=1e-15)
        # tp adds the vocab-parallel embedding and head collectives to the blocks' ones
        assert terms["tp"] >= est.comm_s["tp"] * (1 - 1e-12)
    else:  # uneven stages (fewer layers on the first and last): the mean rank is below it
        for kind in ("cp", "ep"):
            assert terms[kind] <= est.comm_s[kind] * (1 + 1e-12)
    if est.shared_cores_s > est.critical_path_s:
        assert terms["shared_cores"] > 0 and terms["bubble"] == 0
    else:
        assert terms["shared_cores"] == 0
    # the per-stage memory parts are the stage totals, the fullest of them the plan's memory
    assert [m.total for m in est.stage_memory_parts] == list(est.stage_memory)
    assert est.memory.total == max(m.total for m in est.stage_memory_parts)


def test_full_recompute_adds_exactly_its_term_where_nothing_else_moves():
    """One rank, no collectives: recomputing every block's forward lengthens the step by the
    recompute term and by nothing else; compute stays."""
    hw = dataclasses.replace(local_cpu(), cores=None)
    one = Cluster(hardware=hw, num_gpus=1, gpus_per_node=1)
    shape = TransformerShape(layers=4, hidden=256, heads=8, seq=128, vocab=1024)
    none = estimate(shape, "mb=2", one, 4)
    full = estimate(shape, "mb=2,recompute=full", one, 4)
    assert none.step_terms_s["recompute"] == 0.0 and full.step_terms_s["recompute"] > 0.0
    assert full.step_time_s - none.step_time_s == pytest.approx(
        full.step_terms_s["recompute"], rel=1e-9)
    assert full.step_terms_s["compute"] == pytest.approx(none.step_terms_s["compute"],
                                                         rel=1e-12)
    # what it recomputes is the blocks' forward: less than the whole forward, ends included
    assert full.step_terms_s["recompute"] < 2 * none.stage_fwd_s[0]


def test_selective_recompute_of_unfused_attention_is_a_term_of_its_own():
    est = estimate(GPT3, "tp=8,pp=2,mb=8,sp=on,recompute=selective", parse_cluster("16xA100-80G"),
                   16)
    assert est.step_terms_s["recompute"] > 0
    assert sum(est.step_terms_s.values()) == pytest.approx(est.step_time_s, rel=1e-12)
