"""Dropout equals one device (core/dropout.py, passes/dropout.py): the plan's masks are those of
the single-device model drawing the same counter generator on the whole batch
(`check.DropoutReference`), whatever the sharding, microbatch split, schedule or recompute."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core import meta, ops
from core.dropout import DropoutKey, IndexSpec, drawing, keep_mask, node_key
from core.plan import Plan
from core.sequence_layout import SequenceLayout
from equivalence import assert_passed, equivalence_worker
from model_zoo import hf_gpt2
from partitioner import models
from partitioner.capture import capture
from partitioner.check import DropoutReference
from partitioner.compiler import compile_rank
from passes import PassError
from ranks import on_ranks

importlib.import_module("runtime")  # registers what partitioner.dropout_mask does

P = 0.1
MODEL = {"dropout": P}

# (name, plan, world size[, factory, its kwargs]): each checked with check_rank (output, loss, every gradient, the
# weights after AdamW steps) against one device with the plan's seed.
PLANS = [
    ("tp", "tp=2", 2),
    ("tp+sp", "tp=2,sp=on", 2),
    ("pp 1F1B", "pp=2,mb=2,schedule=1f1b", 2),
    ("pp interleaved 1F1B", "pp=2,vpp=2,mb=2,schedule=interleaved-1f1b", 2),
    ("cp ring (load-balanced chunks)", "cp=2", 2),
    ("dp with microbatches", "dp=2,mb=2", 2),
    ("tp, full recompute", "tp=2,recompute=full", 2),
    ("tp, selective recompute", "tp=2,recompute=selective", 2),
    ("pp, full recompute (backward after the next forward)", "pp=2,mb=2,recompute=full", 2),
    ("tp, another seed", "tp=2,seed=7", 2),
    ("sp inside cp", "tp=2,sp=on,cp=2", 4),
    ("dp x pp", "dp=2,pp=2,mb=2", 4),
    # Hugging Face GPT-2's own nn.Dropout modules (attention dropout 0: refused under tp, cp)
    ("hf gpt2 tp+sp", "tp=2,sp=on", 2, hf_gpt2, {"resid_pdrop": P, "embd_pdrop": P}),
    ("hf gpt2 cp", "cp=2", 2, hf_gpt2, {"resid_pdrop": P, "embd_pdrop": P}),
]


def _cases(world: int) -> list:
    return [(name, *(model or ("tiny", MODEL)), plan, torch.float64)
            for name, plan, size, *model in PLANS if size == world]


def _modes_on_ranks(path: str) -> dict:
    """Training and eval calls of one tp=2 model: the step counter, eval, replaying a step,
    a checkpoint keeping the counter."""
    from partitioner.api import parallelize

    torch.manual_seed(0)
    model, (ids,) = models.tiny(dropout=0.5)
    model = model.double()
    pm = parallelize(model, "tp=2", example_inputs=(ids,))
    first, second = pm(ids).detach(), pm(ids).detach()
    steps_after_training = pm.dropout_step
    pm.eval()
    evaluated = pm(ids).detach()
    steps_after_eval = pm.dropout_step
    pm.train()
    pm.dropout_step = 0
    replayed = pm(ids).detach()
    plain = model.eval()(ids).detach()
    pm.dropout_step = 5
    pm.save(path)
    pm.dropout_step = 0
    pm.load(path)
    return {"resumed counter": pm.dropout_step,
            "steps differ": not torch.allclose(first, second),
            "counter": (steps_after_training, steps_after_eval),
            "eval drops nothing": (evaluated - plain).abs().max().item(),
            "replay": torch.equal(first, replayed)}


def _world_two(cases, path):
    return equivalence_worker(cases), _modes_on_ranks(path)


def test_dropout_equals_one_device_on_two_ranks(tmp_path):
    cases = _cases(2)
    results = on_ranks(2, _world_two, cases, str(tmp_path / "ckpt"))
    assert_passed([reports for reports, _ in results], cases)
    for _, modes in results:
        assert modes["steps differ"] and modes["replay"]
        assert modes["counter"] == (2, 2)  # eval calls draw nothing and count nothing
        assert modes["eval drops nothing"] < 1e-12
        assert modes["resumed counter"] == 5


def test_dropout_equals_one_device_on_four_ranks():
    cases = _cases(4)
    assert_passed(on_ranks(4, equivalence_worker, cases), cases)


def test_compiled_full_recompute_keeps_the_forward_masks():
    """compile=on: AOTAutograd replays a checkpointed block inside the compiled backward, after
    the next microbatch's forward (1F1B), where no key of the replayed forward is current; the
    region keeps its masks there (core.ops.CheckpointedRegion)."""
    cases = [("pp, full recompute, compiled", "tiny", {**MODEL, "n_layer": 2},
              "pp=2,mb=2,recompute=full,compile=on", torch.float32)]
    assert_passed(on_ranks(2, equivalence_worker, cases), cases)


# --- the generator ---------------------------------------------------------------------------

def _full(shape) -> IndexSpec:
    return IndexSpec.of(tuple(shape), [list(range(n)) for n in shape])


def test_masks_depend_on_seed_node_and_step_and_honour_p():
    spec = _full((8, 64, 64))
    base = keep_mask(P, 0, node_key("dropout"), spec, DropoutKey(), 1)
    assert torch.equal(base, keep_mask(P, 0, node_key("dropout"), spec, DropoutKey(), 1))
    for other in (keep_mask(P, 1, node_key("dropout"), spec, DropoutKey(), 1),
                  keep_mask(P, 0, node_key("dropout_1"), spec, DropoutKey(), 1),
                  keep_mask(P, 0, node_key("dropout"), spec, DropoutKey(step=1), 1)):
        assert (other != base).float().mean() > 0.1  # independent masks disagree on ~2p(1-p)
    n = base.numel()
    for p in (0.1, 0.5, 0.9):
        kept = keep_mask(p, 3, 5, spec, DropoutKey(), 1).float().mean().item()
        assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), (p, kept)
    assert keep_mask(0.0, 0, 1, spec, DropoutKey(), 1).all()
    assert not keep_mask(1.0, 0, 1, spec, DropoutKey(), 1).any()


def test_a_shard_draws_its_slice_of_the_global_batch_mask():
    """Rows from a microbatch's first sample, a tp feature chunk, fused blocks and cp's two
    load-balanced chunks each give exactly the slice of the whole batch's mask."""
    batch, seq, hidden = 8, 16, 12
    whole = keep_mask(0.5, 0, 9, _full((batch, seq, hidden)), DropoutKey(step=4), 1)
    layout = SequenceLayout(seq, 2, balanced=True)
    positions = layout.positions(1).tolist()
    features = list(range(6, 12))
    spec = IndexSpec.of((2, seq, hidden), [[0, 1], positions, features])
    local = keep_mask(0.5, 0, 9, spec, DropoutKey(step=4, first_sample=3), 1)
    assert torch.equal(local, whole[3:5][:, positions][..., features])
    # (batch*seq, hidden) rows: rows_per_sample = seq
    rows = keep_mask(0.5, 0, 9, _full((2 * seq, hidden)), DropoutKey(step=4, first_sample=3),
                     seq)
    assert torch.equal(rows, whole[3:5].reshape(2 * seq, hidden))
    assert str(spec) == "2x16[4:12]x12[6:12]"
    assert IndexSpec.parse(spec.flat()) == spec


def test_the_op_scales_what_it_keeps_and_is_the_identity_in_eval():
    x = torch.randn(4, 8, 16, dtype=torch.float64)
    spec = _full(x.shape).flat()
    mask = ops.dropout_mask(x, 0.25, 0, 1, 1, spec)
    assert set(mask.unique().tolist()) == {0.0, 1 / 0.75}
    with drawing(DropoutKey(training=False)):
        assert torch.equal(ops.dropout_mask(x, 0.25, 0, 1, 1, spec), torch.ones_like(x))
    with pytest.raises(RuntimeError, match="index spec"):
        ops.dropout_mask(x[:, :4], 0.25, 0, 1, 1, spec)


# --- the pass and the reference ---------------------------------------------------------------

def _run(captured, plan: str, rank: int = 0):
    """This rank's (one-stage) program, compiled on the meta device."""
    parsed = Plan.parse(plan)
    return compile_rank(captured, parsed.resolve(parsed.tp * parsed.cp), rank,
                        "meta").stages[0].gm


class _AttentionDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = (proj(x).view(B, S, 2, 8).transpose(1, 2)  # (B, nh, S, hd)
                   for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1 if self.training else 0.0,
                                           is_causal=True)  # (B, nh, S, hd)
        return self.o(y.transpose(1, 2).reshape(B, S, 16))


def test_attention_dropout_under_tp_is_refused_with_the_fix():
    captured = capture(_AttentionDropout().train(), (torch.randn(2, 8, 16),))
    with pytest.raises(PassError, match=r"dropout_p=0.1.*tp=2.*set the attention dropout to 0"):
        _run(captured, "tp=2")


def test_the_record_names_each_dropout_and_eval_captures_keep_none():
    model, (ids,) = models.tiny(dropout=P)
    gm = _run(capture(model, (ids,)), "tp=2,sp=on", rank=1)
    record = gm.meta[meta.DROPOUT_RECORD]
    assert [d.node for d in record.dropped] == ["dropout"] + [f"dropout_{i}" for i in range(1, 5)]
    assert record.dropped[1].spec == "4x16[8:16]x64"  # sp: rank 1's half of the sequence
    assert "5 dropouts on the counter generator (seed 0)" in record.summary()
    evaluated = _run(capture(model.eval(), (ids,)), "tp=2")
    assert evaluated.meta[meta.DROPOUT_RECORD].removed == 5
    assert not any(n.target is ops.dropout_mask for n in evaluated.graph.nodes)


class _TransposedDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return F.dropout(self.proj(x).transpose(0, 1), 0.1, self.training)  # (S, B, h)


def test_a_value_that_is_not_batch_first_is_refused():
    captured = capture(_TransposedDropout().train(), (torch.randn(2, 3, 8),))
    with pytest.raises(PassError, match="whose dim 0 is not a multiple of the batch 2"):
        _run(captured, "tp=1")


def test_channel_dropout_on_several_ranks_is_refused():
    captured = capture(nn.Sequential(nn.Linear(8, 8), nn.Dropout1d(0.2)).train(),
                       (torch.randn(2, 3, 8),))
    _run(captured, "tp=1")  # one rank: torch's RNG is one device's
    with pytest.raises(PassError, match=r"aten.feature_dropout \(p=0.2\).*use nn.Dropout"):
        compile_rank(captured, Plan(dp=2).resolve(2), 0, "meta")


def test_the_reference_draws_per_call_and_runs_eval_models_as_they_are():
    torch.manual_seed(0)
    model, (ids,) = models.tiny(dropout=0.5)
    model = model.double()
    reference = DropoutReference(model, seed=3)
    first, second = reference(ids), reference(ids)
    assert reference.dropout_step == 2 and not torch.allclose(first, second)
    reference.dropout_step = 0
    assert torch.equal(reference(ids), first)
    reference.model.eval()
    assert torch.equal(reference(ids), model(ids)) and reference.dropout_step == 1
