"""Statistics a model computes over every token of its batch (Hugging Face Mixtral's router
load-balancing loss): made whole over dp by passes/batch_statistics, so loss and every gradient
equal one device's on the dp ranks' microbatches put together (`check.global_microbatches`);
under cp the router reads whole sequences (the cp pass gathers them). Graph-level checks compile without process groups; the
equivalence runs on real gloo ranks, one pool call per world size."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from core import meta
from core.plan import Plan
from partitioner.batches import split_batch
from partitioner.capture import shared_captures
from partitioner.check import TOLERANCES, global_microbatches, relative_error
from partitioner.executor import Programs
from partitioner.report.program import explain
from passes import PassError
from ranks import on_ranks

pytest.importorskip("transformers")

AUX = 0.5
"""A router loss weight large enough that a per-rank aux loss would show in every check."""


def _mixtral(batch=2, layers=1, dtype=torch.float64, implementation="batched_mm", **config):
    from model_zoo import hf_mixtral

    model, (ids,) = hf_mixtral(batch=batch, seq=8, experts_implementation=implementation,
                               num_hidden_layers=layers, **config)
    return model.to(dtype), ids


def _program(model, plan, world, call, forward_only=False):
    programs = Programs(model, Plan.parse(plan).resolve(world), 0, torch.device("meta"))
    return programs.get((), call, forward_only=forward_only)


def _statistics(model, plan, world, call, forward_only=False):
    program = _program(model, plan, world, call, forward_only)
    return program.stages[0].gm.meta.get(meta.STATISTICS_RECORD)


@pytest.mark.parametrize("layers, rows", [(1, 16), (2, 32)])
def test_the_router_loss_is_found_and_its_token_count_made_whole(layers, rows):
    model, ids = _mixtral(layers=layers, output_router_logits=True)
    program = _program(model, "dp=2", 2, {"input_ids": ids, "labels": ids})
    record = program.stages[0].gm.meta[meta.STATISTICS_RECORD]
    # per layer: the top-k counts (histc) and the summed router probabilities
    assert [s.op for s in record.statistics] == ["histc.default", "sum.dim_IntList"] * layers
    assert {s.reduction for s in record.statistics} == {"sum"}
    # Hugging Face divides both by total_rows, a number the capture baked in per rank
    assert {(c.local, c.whole) for c in record.constants} == {(rows, 2 * rows)}
    shown = explain(program)
    assert f"batch statistics: {2 * layers} reductions over the batch made whole over dp=2" \
        in shown and "partitioner.check.global_microbatches" in shown


def test_counts_that_lay_out_the_ranks_own_rows_stay_per_rank():
    # grouped_mm's group offsets are a histc over this rank's choices: only the router loss's
    # histc and sum are made whole
    from model_zoo import hf_mixtral

    model, (ids,) = hf_mixtral(batch=2, seq=8, num_hidden_layers=1, output_router_logits=True)
    record = _statistics(model, "dp=2", 2, {"input_ids": ids, "labels": ids})
    assert [s.node for s in record.statistics] == ["histc_1", "sum_3"]


def test_forward_calls_hold_the_whole_batch_and_reduce_nothing():
    model, ids = _mixtral(output_router_logits=True)
    record = _statistics(model, "dp=2", 2, {"input_ids": ids, "labels": ids}, forward_only=True)
    assert record.statistics == () and record.whole_batch_only  # never serves step


def test_a_model_without_batch_reductions_gets_no_second_capture(monkeypatch):
    model, ids = _mixtral(output_router_logits=False)
    calls = []
    import partitioner.executor as executor

    monkeypatch.setattr(executor, "tile_batch", lambda *a: calls.append(a) or a[0])
    record = _statistics(model, "dp=2", 2, {"input_ids": ids, "labels": ids})
    assert record.statistics == () and calls == []


class _MaxOverBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        h = self.proj(x)
        return (h - h.amax(dim=0)).square().mean()


def test_a_reduction_no_all_reduce_makes_whole_is_refused():
    programs = Programs(_MaxOverBatch(), Plan.parse("dp=2").resolve(2), 0,
                        torch.device("meta"))
    with pytest.raises(PassError, match=r"amax.default at amax.*only sums and means can be "
                                        r"made whole.*Use dp=1"):
        programs.get((torch.randn(4, 4),), {})


def test_under_cp_the_router_reads_whole_sequences():
    # the router's top-k has no rule on sequence shards, and its sums reduce over them: the
    # cp pass gathers the sequence for both, so the loss is exact without batch_statistics
    model, ids = _mixtral(output_router_logits=True)
    program = _program(model, "cp=2", 2, {"input_ids": ids, "labels": ids})
    gathered = {g.node for g in program.stages[0].gm.meta[meta.CP_RECORD].gathered}
    assert {"topk_1", "sum_3"} <= gathered
    assert meta.STATISTICS_RECORD not in program.stages[0].gm.meta  # dp=1: the pass skipped


# --- on ranks ---------------------------------------------------------------------------------

SWITCH = {"aux_loss_coef": AUX}
"""The in-repo MoE with its own Switch-style load-balancing loss (means over the tokens)."""
DEEPSEEK = {"router": "sigmoid", "shared_experts": 1, "bias_update_rate": 0.01}
"""The in-repo DeepSeek style, its selection bias moved from the batch's token counts."""

# torch's eager grouped GEMM (Hugging Face's default experts, the reference's path) takes no
# float64: that case runs in float32
GROUPED = {"implementation": "grouped_mm", "dtype": torch.float32}

TWO_RANKS = [("mixtral", {}, "dp=2"), ("mixtral", {}, "dp=2,mb=2"), ("mixtral", GROUPED, "dp=2"),
             ("mixtral", {"layers": 2}, "dp=2,ep=2"), ("mixtral", {}, "cp=2"),
             ("moe", SWITCH, "dp=2,mb=2"), ("moe", DEEPSEEK, "dp=2,ep=2,mb=2")]
FOUR_RANKS = [("mixtral", {}, "dp=2,ep=2,tp=2,etp=1"), ("mixtral", {}, "dp=4,ep=2,mb=2"),
              ("mixtral", {"layers": 2}, "dp=2,pp=2,mb=2"), ("mixtral", {}, "dp=2,cp=2"),
              ("moe", SWITCH, "dp=2,tp=2,sp=on,ep=2"), ("moe", DEEPSEEK, "dp=2,ep=2,pp=2,mb=2")]


def _model(kind: str, options: dict):
    """(model, args, kwargs) of one global batch of 8 sequences, labels included."""
    if kind == "mixtral":
        model, ids = _mixtral(batch=8, output_router_logits=True, router_aux_loss_coef=AUX,
                              **options)
        return model, (), {"input_ids": ids, "labels": ids}
    from partitioner.models import tiny_moe

    model, (ids,) = tiny_moe(batch=8, **options)
    return model.to(torch.float64), (ids,), {"labels": ids}


def _loss(output) -> torch.Tensor:
    return output.loss if hasattr(output, "loss") else output


def _forward(model, args, kwargs) -> torch.Tensor:
    """A forward call on the whole batch (labels included: one device's statistics): the
    logits of a Hugging Face model, the loss of the in-repo one."""
    out = model(*args, **kwargs)
    return out.logits if hasattr(out, "logits") else out


def _forward_shared(pm, kind, options, args, kwargs):
    with shared_captures(("test_batch_statistics", kind, repr(sorted(options.items())))):
        return _forward(pm, args, kwargs)


def _whole_batch_statistics(cases):
    """On each rank, per case: the largest relative error of the loss, every gradient, the
    buffers after the step (the selection bias) and a forward call on the whole batch against
    one device; and how far the step would be off with every rank's statistic its own."""
    from partitioner.api import parallelize

    out = {}
    for kind, options, plan in cases:
        model, args, kwargs = _model(kind, options)
        reference, control = copy.deepcopy(model), copy.deepcopy(model)
        parsed = Plan.parse(plan).resolve(torch.distributed.get_world_size())
        batches = global_microbatches(args, kwargs, parsed.dp, parsed.microbatches)
        ref_loss = sum(_loss(reference(*a, **k)) for a, k in batches) / len(batches)
        ref_loss.backward()
        # one model, several plans: each input shape captured once (shared_captures)
        with shared_captures(("test_batch_statistics", kind, repr(sorted(options.items())))):
            pm = parallelize(model, plan, example_inputs=args, example_kwargs=kwargs)
            loss = pm.step(*args, **kwargs)
        grads, state = pm.full_grad_dict(), pm.full_state_dict()
        errors = {"loss": relative_error(loss, ref_loss),
                  "gradients": max(relative_error(grads[name], p.grad)
                                   for name, p in reference.named_parameters()
                                   if p.grad is not None),
                  "buffers": max((relative_error(state[name], b)
                                  for name, b in reference.named_buffers()
                                  if name in state), default=0.0),
                  "forward": relative_error(_forward_shared(pm, kind, options, args, kwargs),
                                            _forward(reference, args, kwargs))}
        # what the pass prevents: dp rank 0 computing its statistics from its own share
        shares = split_batch((args, kwargs), parsed.dp * parsed.microbatches,
                             len(kwargs["labels"]))
        per_rank = sum(_loss(control(*a, **k)) for a, k in shares) / len(shares)
        drift = max((relative_error(b, dict(reference.named_buffers())[name])
                     for name, b in control.named_buffers()), default=0.0)
        out[f"{kind} {options} {plan}"] = errors, max(relative_error(per_rank, ref_loss), drift)
    return out


def _assert_whole(results, cases):
    for by_case in results:
        for kind, options, plan in cases:
            errors, per_rank_error = by_case[f"{kind} {options} {plan}"]
            tolerance = TOLERANCES[options.get("dtype", torch.float64)]
            # Hugging Face computes the router loss in float32 whatever the model's dtype
            # (routing_weights.float(), histc), so the loss sums float32 partials
            assert errors["loss"] < max(tolerance, 1e-6 if kind == "mixtral" else 0), \
                (plan, errors)
            assert max(errors["forward"], errors["gradients"], errors["buffers"]) < \
                tolerance, (kind, options, plan, errors)
            if "dp=" in plan:  # each dp rank's own statistic would be off: the check can fail
                assert per_rank_error > 1e-6, (kind, options, plan, per_rank_error)


def test_batch_statistics_under_dp_equal_one_device_on_two_ranks():
    _assert_whole(on_ranks(2, _whole_batch_statistics, TWO_RANKS), TWO_RANKS)


def test_batch_statistics_with_tp_sp_ep_pp_cp_equal_one_device_on_four_ranks():
    _assert_whole(on_ranks(4, _whole_batch_statistics, FOUR_RANKS), FOUR_RANKS)
