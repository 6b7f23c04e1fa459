"""Mixed precision by parameter casting (param_dtype bf16/fp16) against the single-device model
under the same policy (`partitioner.precision.CastReference`), and against fp32 training.

Tolerance: TOLERANCE_EPS machine epsilons of the compute dtype (bf16 2^-7, fp16 2^-10), as max
|a - b| / max |b| per kind of tensor (outputs, loss, all gradients together, all weights
together; partitioner.check's measure). A plan computes the same ops as the reference in the
same dtype but rounds at other places: tp rounds partial sums of a row-parallel matmul to
param_dtype before summing them over ranks, microbatches sum their losses in another order, cp
merges attention blocks, pp and dp change nothing but the loss sum. Each such place is one
rounding (half an ulp); through the two blocks of the test model they add up to 1-2 epsilons
(measured: bf16 at most 1.0e-2 = 1.3 eps on the gradients, fp16 at most 1.5e-3 = 1.6 eps). A
wrong shard, a missing reduction or a gradient left in param_dtype is off by O(1) or by the
dtype's whole rounding, far above 4 eps. Weights are compared after SGD steps; against fp32
training, with AdamW, only the loss curve is compared (weights are not: early AdamW steps move every weight by about +-lr whatever its
gradient's size, so a gradient that is rounding noise moves its weight as far as a real one).
"""

from __future__ import annotations

import copy

import pytest
import torch

from partitioner.models import tiny, tiny_llama, tiny_moe
from ranks import on_ranks

TOLERANCE_EPS = 4
PLANS = ("tp=2", "tp=2,sp=on", "pp=2,mb=2", "dp=2,zero=1", "cp=2")
REDUCE_IN_BF16 = ("dp=2,reduce_dtype=bf16", "dp=2,zero=1,reduce_dtype=bf16")


def _tolerance(dtype: str) -> float:
    return TOLERANCE_EPS * torch.finfo({"bf16": torch.bfloat16,
                                        "fp16": torch.float16}[dtype]).eps


def _lm_setup(factory=tiny):
    torch.manual_seed(0)
    model, (ids,) = factory()
    return model, ids, ids.roll(-1, 1)


def _against_reference(plan: str, dtype: str, factory=tiny, steps: int = 2) -> dict:
    """Errors of `plan` with param_dtype=dtype against CastReference, through `steps` SGD
    steps (an update proportional to the gradient keeps the weights comparable, unlike AdamW's
    first steps); fp16 runs with dynamic loss scaling, the reference scaled the same."""
    from partitioner import parallelize
    from partitioner.check import _Errors, lm_loss
    from partitioner.precision import CastReference

    model, ids, target = _lm_setup(factory)
    reference = CastReference(copy.deepcopy(model), dtype)
    scaling = ",loss_scale=dynamic" if dtype == "fp16" else ""
    pm = parallelize(model, f"{plan},param_dtype={dtype}{scaling}", example_inputs=(ids,),
                     loss_fn=lm_loss)
    errors = _Errors()
    errors.add("output", pm(ids), reference(ids))
    facts = {"main_dtypes": sorted({str(p.dtype) for p in pm.parameters()}),
             "output_dtype": str(pm(ids).dtype)}
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    opt = torch.optim.SGD(pm.parameters(), lr=0.1)
    for step in range(steps):
        ref_opt.zero_grad()
        opt.zero_grad()
        scale = pm.loss_scale or 1.0
        ref_loss = lm_loss(reference(ids), target)
        (ref_loss * scale).backward()
        for p in reference.parameters():
            p.grad.div_(scale)
        loss = pm.step(ids, target=target)
        assert not pm.last_step_skipped
        errors.add("loss", loss, ref_loss)
        if step == 0:
            grads = pm.full_grad_dict()
            for name, p in reference.model.named_parameters():
                errors.add("gradients", grads[name], p.grad)
            facts["grad_dtypes"] = sorted({str(p.grad.dtype) for p in pm.parameters()})
        ref_opt.step()
        opt.step()
    state = pm.full_state_dict()
    for name, value in reference.model.state_dict().items():
        errors.add("weights_after_sgd", state[name], value)
    errors.add("output_after_sgd", pm(ids), reference(ids))
    return {"errors": errors.relative(), **facts}


def _loss_curve(plan: str, dtype: str, steps: int = 5) -> tuple[list[float], list[float]]:
    """Losses of `steps` AdamW steps: fp32 on one device, and `plan` under param_dtype."""
    from partitioner import parallelize
    from partitioner.check import lm_loss

    model, ids, target = _lm_setup(tiny_llama)
    single = copy.deepcopy(model)
    pm = parallelize(model, f"{plan},param_dtype={dtype}", example_inputs=(ids,),
                     loss_fn=lm_loss)
    single_opt = torch.optim.AdamW(single.parameters(), lr=3e-3)
    opt = torch.optim.AdamW(pm.parameters(), lr=3e-3)
    fp32, mixed = [], []
    for _ in range(steps):
        single_opt.zero_grad()
        opt.zero_grad()
        loss = lm_loss(single(ids), target)
        loss.backward()
        fp32.append(loss.item())
        mixed.append(pm.step(ids, target=target).item())
        single_opt.step()
        opt.step()
    return fp32, mixed


def _refresh_and_overflow() -> dict:
    """Compute copies refreshed only when the optimizer changed the main weights; an fp16
    overflow skips the step, lowers the scale, and training goes on."""
    from partitioner import parallelize
    from partitioner.check import lm_loss

    facts = {}
    model, ids, target = _lm_setup()
    pm = parallelize(model, "tp=2,param_dtype=bf16", example_inputs=(ids,), loss_fn=lm_loss)
    copies = pm.state.compute
    first = pm(ids)
    before = copies.refreshes
    again = pm(ids)
    facts["unchanged_refreshes"] = copies.refreshes - before
    facts["unchanged_same_output"] = torch.equal(first, again)
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-2)
    pm.step(ids, target=target)
    opt.step()
    after = pm(ids)
    facts["stepped_refreshes"] = copies.refreshes - before
    facts["stepped_output_moved"] = not torch.equal(first, after)
    name = next(iter(copies.copies))
    facts["copy_matches_main"] = torch.equal(copies.copies[name],
                                             copies.mains[name].detach().to(torch.bfloat16))

    model, ids, target = _lm_setup()
    pm = parallelize(model, "dp=2,zero=1,param_dtype=fp16,loss_scale=dynamic",
                     example_inputs=(ids,), loss_fn=lm_loss)
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-2)
    facts["initial_scale"] = pm.loss_scale
    pm.executor.loss_scale.scale = 2.0 ** 30  # forced high: fp16 gradients overflow
    weights = [p.detach().clone() for p in pm.parameters()]
    opt.zero_grad()
    first_loss = pm.step(ids, target=target).item()
    facts["skipped"] = pm.last_step_skipped
    facts["grads_after_skip"] = [p.grad for p in pm.parameters()]
    facts["scale_after_skip"] = pm.loss_scale
    opt.step()
    facts["weights_unchanged"] = all(torch.equal(w, p) for w, p in zip(weights, pm.parameters(),
                                                                       strict=True))
    skips = 1
    for _ in range(30):  # the scale halves at every overflow until the gradients fit
        opt.zero_grad()
        loss = pm.step(ids, target=target).item()
        if not pm.last_step_skipped:
            break
        skips += 1
    facts["skips"] = skips
    facts["recovered_scale"] = pm.loss_scale
    facts["counted_skips"] = pm.executor.loss_scale.skipped
    opt.step()
    opt.zero_grad()
    facts["losses"] = (first_loss, loss, pm.step(ids, target=target).item())
    return facts


def _checkpoint_round_trip(path: str) -> dict:
    """pm.save keeps the fp32 main weights, which a fresh bf16 model loads exactly."""
    from partitioner import parallelize
    from partitioner.check import lm_loss

    model, ids, target = _lm_setup()
    pm = parallelize(model, "tp=2,param_dtype=bf16", example_inputs=(ids,), loss_fn=lm_loss)
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-2)
    pm.step(ids, target=target)
    opt.step()
    saved = pm.full_state_dict()
    pm.save(path, optimizer=opt)
    fresh_model, _, _ = _lm_setup()
    fresh = parallelize(fresh_model, "tp=2,param_dtype=bf16", example_inputs=(ids,),
                        loss_fn=lm_loss)
    fresh(ids)  # compute copies made from the fresh weights: the load must refresh them
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh.load(path, optimizer=fresh_opt)
    loaded = fresh.full_state_dict()
    rounded = {name: value.to(torch.bfloat16).float() for name, value in saved.items()}
    return {"exact": all(torch.equal(saved[name], loaded[name]) for name in saved),
            "fp32": all(value.dtype == torch.float32 for value in loaded.values()),
            "not_bf16_rounded": any(not torch.equal(saved[n], rounded[n]) for n in saved),
            "same_output": torch.equal(pm(ids), fresh(ids))}


def _meta_model() -> dict:
    """A model built on the meta device gets fp32 main weights, filled by a state dict."""
    from partitioner import parallelize
    from partitioner.check import relative_error
    from partitioner.precision import CastReference

    model, ids, _ = _lm_setup()
    with torch.device("meta"):
        empty, _ = tiny()
    pm = parallelize(empty, "tp=2,param_dtype=bf16", example_inputs=(ids,))
    pm.load_full_state_dict(model.state_dict())
    return {"dtypes": sorted({str(p.dtype) for p in pm.parameters()}),
            "output": relative_error(pm(ids), CastReference(model, "bf16")(ids))}


def _world_of_two(path: str) -> dict:
    from partitioner.capture import shared_captures

    # one model per factory under many plans: each (param_dtype, input shape) captured once
    with shared_captures(("test_mixed_precision", "tiny")):
        results = {(plan, dtype): _against_reference(plan, dtype)
                   for dtype in ("bf16", "fp16") for plan in PLANS}
        for plan in REDUCE_IN_BF16:
            results[(plan, "bf16")] = _against_reference(plan, "bf16")
    with shared_captures(("test_mixed_precision", "tiny_llama")):
        results["llama tp=2,sp=on bf16"] = _against_reference("tp=2,sp=on", "bf16", tiny_llama)
        results["curve"] = _loss_curve("tp=2,sp=on", "bf16")
    results["moe dp=2,ep=2 bf16"] = _against_reference("dp=2,ep=2", "bf16", tiny_moe)
    results["meta"] = _meta_model()
    from partitioner.check import check_rank
    results["check_rank"] = str(check_rank(tiny_llama, "tp=2,sp=on,param_dtype=bf16"))
    results["check_rank dropout"] = str(check_rank(
        tiny, "tp=2,sp=on,param_dtype=bf16,seed=3", factory_kwargs=dict(dropout=0.5)))
    results["refresh_overflow"] = _refresh_and_overflow()
    results["checkpoint"] = _checkpoint_round_trip(path)
    return results


@pytest.fixture(scope="module")
def world_of_two(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mp") / "ckpt")
    return on_ranks(2, _world_of_two, path, timeout=900)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("plan", PLANS)
def test_each_strategy_matches_the_single_device_model_under_the_same_casting(
        world_of_two, plan, dtype):
    for results in world_of_two:
        result = results[(plan, dtype)]
        bad = {k: v for k, v in result["errors"].items() if v > _tolerance(dtype)}
        assert not bad, f"{plan} {dtype}: {result['errors']} (tolerance {_tolerance(dtype)})"
        assert result["main_dtypes"] == ["torch.float32"]  # the optimizer sees fp32
        assert result["grad_dtypes"] == ["torch.float32"]
        assert result["output_dtype"] == "torch.float32"  # the loss computes in fp32


@pytest.mark.parametrize("plan", REDUCE_IN_BF16)
def test_gradients_reduced_in_bf16(world_of_two, plan):
    """reduce_dtype=bf16: the dp sum (bucketed all-reduce, or ZeRO-1's reduce-scatter) travels
    in bf16, one more rounding of each gradient; accumulation stays fp32."""
    for results in world_of_two:
        result = results[(plan, "bf16")]
        assert max(result["errors"].values()) <= _tolerance("bf16"), result["errors"]
        assert result["grad_dtypes"] == ["torch.float32"]


def test_rmsnorm_rope_swiglu_model_under_sequence_parallel(world_of_two):
    for results in world_of_two:
        errors = results["llama tp=2,sp=on bf16"]["errors"]
        assert max(errors.values()) <= _tolerance("bf16"), errors


def test_experts_under_expert_parallelism(world_of_two):
    for results in world_of_two:
        errors = results["moe dp=2,ep=2 bf16"]["errors"]
        assert max(errors.values()) <= _tolerance("bf16"), errors


def test_a_meta_model_gets_fp32_main_weights(world_of_two):
    for results in world_of_two:
        assert results["meta"]["dtypes"] == ["torch.float32"]
        assert results["meta"]["output"] <= _tolerance("bf16")


def test_check_rank_compares_a_casting_plan_with_one_device_under_the_same_casting(
        world_of_two):
    for results in world_of_two:
        report = results["check_rank"]
        assert "(bf16 casting, tolerance 3e-02): PASS" in report, report
        assert "weights_after_sgd" in report


def test_check_rank_draws_the_plans_dropout_masks_under_casting(world_of_two):
    """A model that drops (p=0.5) under bf16 casting: the reference runs its program through
    the same dropout pass, so tp=2 with sp matches it mask for mask (a mask drawn otherwise
    would put half the activations off by 2x)."""
    for results in world_of_two:
        report = results["check_rank dropout"]
        assert "(bf16 casting, tolerance 3e-02): PASS" in report, report


def test_bf16_training_follows_fp32_training_by_the_loss_curve(world_of_two):
    """Five AdamW steps: each bf16 loss within 1% of fp32's (bf16 rounding of the logits is
    about 0.4%), and both curves fall by far more than that gap."""
    for results in world_of_two:
        fp32, bf16 = results["curve"]
        gaps = [abs(a - b) / b for a, b in zip(bf16, fp32, strict=True)]
        assert max(gaps) < 1e-2, (fp32, bf16)
        assert fp32[-1] < 0.9 * fp32[0] and bf16[-1] < 0.9 * bf16[0], (fp32, bf16)


def test_compute_copies_refresh_after_the_optimizer_steps(world_of_two):
    for results in world_of_two:
        facts = results["refresh_overflow"]
        assert facts["unchanged_refreshes"] == 0 and facts["unchanged_same_output"]
        assert facts["stepped_refreshes"] == 1 and facts["stepped_output_moved"]
        assert facts["copy_matches_main"]


def test_fp16_overflow_skips_the_step_lowers_the_scale_and_training_goes_on(world_of_two):
    for results in world_of_two:
        facts = results["refresh_overflow"]
        assert facts["initial_scale"] == 2.0 ** 16
        assert facts["skipped"] and facts["grads_after_skip"] == [None] * len(
            facts["grads_after_skip"])
        assert facts["scale_after_skip"] == 2.0 ** 29
        assert facts["weights_unchanged"]
        assert facts["counted_skips"] == facts["skips"] >= 1
        assert facts["recovered_scale"] == 2.0 ** (30 - facts["skips"])
        first, recovered, after = facts["losses"]
        assert after < first  # the step after recovery trained


def test_checkpoint_keeps_fp32_main_weights(world_of_two):
    for results in world_of_two:
        facts = results["checkpoint"]
        assert facts == {"exact": True, "fp32": True, "not_bf16_rounded": True,
                         "same_output": True}


def test_the_pass_keeps_norms_softmax_and_outputs_in_fp32():
    """Graph level, no ranks: the program of tiny (LayerNorm) and tiny_llama (hand-written
    RMSNorm, softmax router in tiny_moe) under param_dtype=bf16."""
    from core import meta
    from core.plan import Plan
    from partitioner.compiler import compile_rank
    from partitioner.precision import capture_cast

    plan = Plan(param_dtype="bf16").resolve(1)
    for factory, kept in ((tiny, {"layer_norm": 5}), (tiny_llama, {"rms_norm": 5}),
                          (tiny_moe, {"rms_norm": 5, "softmax": 2})):
        model, (ids,) = factory()
        gm = compile_rank(capture_cast(model, plan, (ids,), {}), plan, 0).stages[0].gm
        record = gm.meta[meta.MIXED_PRECISION_RECORD]
        assert dict(record.kept) == kept and record.outputs == 1, record.summary()
        for node in gm.graph.nodes:
            if node.target in (torch.ops.aten.layer_norm.default, torch.ops.aten.softmax.int):
                assert node.meta["val"].dtype == torch.float32
                assert all(arg.meta["val"].dtype == torch.float32
                           for arg in node.all_input_nodes)
        linears = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
        assert linears and all(n.meta["val"].dtype == torch.bfloat16 for n in linears)
        output = gm.graph.output_node().args[0]
        assert [o.meta["val"].dtype for o in output] == [torch.float32]


def test_a_model_not_in_fp32_is_refused_with_the_fix():
    from core.plan import Plan, PlanError
    from partitioner.precision import check_model

    model, _ = tiny()
    with pytest.raises(PlanError, match=r"param_dtype=bf16 keeps fp32 main weights .* the "
                                        r"model's parameters are bfloat16: pass the model in "
                                        r"float32 \(model.float\(\)\)"):
        check_model(model.to(torch.bfloat16), Plan(param_dtype="bf16"))
    check_model(model.float(), Plan(param_dtype="bf16"))
    check_model(model.to(torch.bfloat16), Plan())  # no casting: any dtype
