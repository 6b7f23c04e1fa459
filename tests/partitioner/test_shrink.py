"""`check` shrinks a large preset: the same structure and the same divisibility facts under the
plan, at a size CPU ranks run (pure: no ranks)."""

import math

import pytest

from core.plan import Plan
from partitioner.models import PRESETS, parse_inline
from partitioner.shrink import MAX_CHECK_PARAMETERS, needs_shrinking, shrink, smallest_alike

PLANS = ["tp=2,pp=2", "tp=8,cp=2", "tp=3", "tp=4,cp=2,cp_algo=a2a", "tp=16", "pp=4,vpp=2,mb=4,schedule=interleaved-1f1b",
         "tp=2,ep=4", "tp=6"]
STRUCTURE = ("norm", "position", "swiglu", "bias", "tie_embeddings", "fused_qkv",
             "fused_gate_up")


def _degrees(plan: Plan, moe: bool) -> set[int]:
    """Every degree and product of degrees that splits a count of the model (ep on a dense
    model is refused by the plan, so it splits nothing)."""
    experts = {plan.ep, plan.expert_tp, plan.ep * plan.expert_tp} if moe else set()
    return {plan.tp, plan.cp, plan.tp * plan.cp} | experts


@pytest.mark.parametrize("plan_text", PLANS)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_shrunk_preset_keeps_structure_and_divisibility(preset, plan_text):
    big, plan = PRESETS[preset], Plan.parse(plan_text)
    small = shrink(big, plan).config
    assert needs_shrinking(big) and small.num_parameters() < MAX_CHECK_PARAMETERS / 10
    assert all(getattr(small, f) == getattr(big, f) for f in STRUCTURE)
    assert (small.kv_heads < small.n_head) == (big.kv_heads < big.n_head)  # GQA stays GQA
    assert bool(small.n_experts) == bool(big.n_experts)
    assert bool(small.dense_layers) == bool(big.dense_layers)
    assert small.n_layer >= plan.pp * plan.vpp and small.n_layer <= big.n_layer
    for d in _degrees(plan, bool(big.n_experts)):
        for count in ("n_head", "kv_heads", "vocab_size", "ffn"):
            assert (getattr(big, count) % d == 0) == (getattr(small, count) % d == 0), (count, d)
        # kv heads that divide tp are replicated over tp/kv ranks: a fact of its own
        assert (d % big.kv_heads == 0) == (d % small.kv_heads == 0)
        if big.n_experts:
            assert (big.n_experts % d == 0) == (small.n_experts % d == 0)
            assert (big.expert_ffn % d == 0) == (small.expert_ffn % d == 0)
    seq_degree = 2 * plan.cp * plan.tp
    assert math.gcd(big.seq_len, seq_degree) == math.gcd(small.seq_len, seq_degree)


def test_the_shrink_says_what_changed():
    shrunk = shrink(PRESETS["llama3-70b"], Plan.parse("tp=2,pp=2"))
    text = str(shrunk)
    assert text.startswith("layers 80 -> 2, heads 64 -> ")
    assert "kv heads 8 -> " in text and "vocab 128256 -> " in text and "seq 8192 -> " in text
    assert shrink(PRESETS["llama3-70b"], Plan.parse("stage_layers=3/4,pp=2")).config.n_layer == 7


def test_a_small_model_is_left_alone():
    assert not needs_shrinking(parse_inline("gpt:layers=4,hidden=64,heads=4,vocab=128,seq=32"))


def test_smallest_alike_against_closed_form_numbers():
    assert smallest_alike(128256, 2, at_least=64) == 64  # even stays even
    assert smallest_alike(128256, 3, at_least=64) == 66  # 128256 = 3 * 42752
    assert smallest_alike(32000, 3, at_least=64) == 64  # not a multiple of 3 stays so
    assert smallest_alike(8, 2, divides_too=True) == 4  # 2 divides it, it does not divide 2
    assert smallest_alike(2, 4, divides_too=True) == 2  # kv heads dividing tp=4 are kept
