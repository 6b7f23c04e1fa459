"""Pipeline parallelism against one device on real gloo ranks (loss and every gathered
gradient, float64), for every schedule (the zero-bubble ones with their backward split in
input- and weight-gradient steps), with dp, and with each recompute mode."""

import pytest
import torch

from equivalence import assert_passed
from partitioner.check import check_rank
from ranks import on_ranks


def _run(cases):
    reports = []
    for name, factory, plan, kw in cases:
        reports.append((name, check_rank(factory, plan, dtype=torch.float64, steps=1, **kw)))
    return reports


GPT, LLAMA = "partitioner.models:tiny", "partitioner.models:tiny_llama"
ZERO_BUBBLE_TWO_RANKS = [  # the backward split into input- and weight-gradient steps
    ("gpt-zb-h1-mb4", GPT, "pp=2,mb=4,schedule=zb-h1", {}),
    ("llama-zb-h1-mb8", LLAMA, "pp=2,mb=8,schedule=zb-h1", {"factory_kwargs": {"batch": 8}}),
    # the V: rank 0 holds stages 0 and 3 (the tied embedding and head, and the loss)
    ("gpt-zb-v-mb4", GPT, "pp=2,vpp=2,schedule=zb-v,mb=4", {"factory_kwargs": {"n_layer": 4}}),
    ("llama-zb-v-mb3", LLAMA, "pp=2,vpp=2,schedule=zb-v,mb=3",
     {"factory_kwargs": {"n_layer": 4, "batch": 6}}),
    # checkpointed regions: the whole backward in I (runtime.pipeline); selective: split
    ("gpt-zb-h1-recompute-full", GPT, "pp=2,mb=2,schedule=zb-h1,recompute=full", {}),
    ("llama-zb-v-recompute-selective", LLAMA, "pp=2,vpp=2,schedule=zb-v,mb=2,"
     "recompute=selective", {"factory_kwargs": {"n_layer": 4}}),
]

TWO_RANKS = [
    (f"{m.split(':')[1]}-{schedule}-mb{mb}", m, f"pp=2,mb={mb},schedule={schedule}",
     {"factory_kwargs": {"batch": batch}})
    for m in (GPT, LLAMA) for schedule in ("gpipe", "1f1b") for mb, batch in ((1, 4), (3, 6),
                                                                              (8, 8))
] + [
    (f"llama-interleaved-mb{mb}", LLAMA, f"pp=2,vpp=2,schedule=interleaved-1f1b,mb={mb}",
     {"factory_kwargs": {"n_layer": 4, "batch": 4}}) for mb in (2, 4)
] + [
    ("gpt-token-weighted", GPT, "pp=2,mb=2", {"token_weighted": True}),
    ("gpt-recompute-full", GPT, "pp=2,mb=2,recompute=full", {}),
    ("llama-recompute-selective", LLAMA, "pp=2,mb=2,recompute=selective", {}),
] + ZERO_BUBBLE_TWO_RANKS


def test_pp2_schedules_match_one_device():
    assert_passed(on_ranks(2, _run, TWO_RANKS), TWO_RANKS)


UNEVEN_TWO_RANKS = [  # stage_layers: the layout fixes the cut (Megatron's uneven first/last)
    ("gpt-3-layers-1|2", GPT, "pp=2,mb=2,stage_layers=1/2", {"factory_kwargs": {"n_layer": 3}}),
    ("llama-5-layers-2|3", LLAMA, "pp=2,mb=2,stage_layers=2/3",
     {"factory_kwargs": {"n_layer": 5}}),
    ("llama-interleaved-1/2/2/1", LLAMA,
     "pp=2,vpp=2,schedule=interleaved-1f1b,mb=2,stage_layers=1/2/2/1",
     {"factory_kwargs": {"n_layer": 6}}),
    # stages of the (tied) embedding alone and of the head and loss alone (Megatron's E|...|L)
    ("gpt-interleaved-0/2/2/0", GPT,
     "pp=2,vpp=2,schedule=interleaved-1f1b,mb=2,stage_layers=0/2/2/0",
     {"factory_kwargs": {"n_layer": 4}}),
    ("llama-zb-v-1/2/1/1", LLAMA, "pp=2,vpp=2,schedule=zb-v,mb=2,stage_layers=1/2/1/1",
     {"factory_kwargs": {"n_layer": 5}}),
]


def test_uneven_stage_layouts_match_one_device():
    assert_passed(on_ranks(2, _run, UNEVEN_TWO_RANKS), UNEVEN_TWO_RANKS)


def _four_rank_cases():
    return [
        ("gpt-pp4-1f1b", GPT, "pp=4,mb=4", {"factory_kwargs": {"n_layer": 4}}),
        ("llama-pp4-gpipe-mb8", LLAMA, "pp=4,mb=8,schedule=gpipe",
         {"factory_kwargs": {"n_layer": 2, "batch": 8}}),
        ("llama-pp4-interleaved", LLAMA, "pp=4,vpp=2,schedule=interleaved-1f1b,mb=4",
         {"factory_kwargs": {"n_layer": 6}}),
        ("gpt-dp2-pp2", GPT, "pp=2,dp=2,mb=2", {}),
        ("llama-dp2-pp2-zero", LLAMA, "pp=2,dp=2,mb=2,zero=1", {}),
        ("gpt-dp2-pp2-meta", GPT, "pp=2,dp=2,mb=2", {"meta": True}),
        ("hf-llama-dp2-pp2", "model_zoo:hf_llama", "pp=2,dp=2,mb=2", {}),
        ("hf-gpt2-pp4", "model_zoo:hf_gpt2", "pp=4,mb=2", {}),
        ("gpt-tp2-pp2", GPT, "tp=2,pp=2,mb=2", {}),
        ("llama-tp2-pp2-zero-recompute-full", LLAMA, "tp=2,pp=2,mb=2,zero=1,recompute=full", {}),
        ("hf-llama-tp2-pp2", "model_zoo:hf_llama", "tp=2,pp=2,mb=2", {}),
    ] + ZERO_BUBBLE_FOUR_RANKS


ZERO_BUBBLE_FOUR_RANKS = [
    ("gpt-pp4-zb-h1-mb4", GPT, "pp=4,mb=4,schedule=zb-h1", {"factory_kwargs": {"n_layer": 4}}),
    ("llama-pp4-zb-h1-mb8", LLAMA, "pp=4,mb=8,schedule=zb-h1",
     {"factory_kwargs": {"n_layer": 4, "batch": 8}}),
    ("gpt-tp2-pp2-zb-h1", GPT, "tp=2,pp=2,mb=4,schedule=zb-h1", {}),
    ("llama-dp2-pp2-zero-zb-v", LLAMA, "pp=2,dp=2,vpp=2,mb=2,zero=1,schedule=zb-v",
     {"factory_kwargs": {"n_layer": 4}}),
]


def _run_four():
    return _run(_four_rank_cases())


def test_pp4_and_dp2_pp2_match_one_device():
    pytest.importorskip("transformers")
    assert_passed(on_ranks(4, _run_four), _four_rank_cases())


def _recompute_is_exact_and_saves_memory():
    """Same plan, three recompute modes: identical numbers, fewer saved activation bytes."""
    from partitioner import parallelize
    from partitioner.check import lm_loss
    from partitioner.models import tiny_llama

    results = {}
    for mode in ("none", "selective", "full"):
        torch.manual_seed(0)
        model, (ids,) = tiny_llama(batch=4, seq=32, n_layer=2)
        target = torch.roll(ids, -1, 1)
        pm = parallelize(model.double(), f"pp=2,mb=2,recompute={mode}", (ids,),
                         loss_fn=lm_loss)
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = pm.step(ids, target=target)
        grads = pm.full_grad_dict()
        results[mode] = (loss.item(), {k: v.clone() for k, v in grads.items()}, saved[0])
    return {mode: (loss, saved) for mode, (loss, _, saved) in results.items()}, all(
        torch.equal(results["none"][1][k], results[m][1][k])
        for m in ("selective", "full") for k in results["none"][1])


def test_recompute_is_bit_exact_and_saves_activation_memory():
    for by_mode, grads_equal in on_ranks(2, _recompute_is_exact_and_saves_memory):
        assert grads_equal
        assert by_mode["none"][0] == by_mode["selective"][0] == by_mode["full"][0]
        assert by_mode["selective"][1] < by_mode["none"][1]
        assert by_mode["full"][1] < by_mode["selective"][1]
