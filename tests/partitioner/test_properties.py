"""Property-based tests (hypothesis): random small transformers under random valid plans match
the single-device model on real gloo ranks; random invalid plans are refused with a message.

Every spawn pays torch's import time, so the valid cases are drawn in the parent first (one
`@given` that only collects what it draws) and then all of one world size are checked in one
spawn, next to the dynamic-shape check. `PARTITIONER_PROPERTY_EXAMPLES=N,M` draws N cases on 2
ranks and M on 4 (default 3,1: the file in about 90 s on 2 shared cores);
`benchmarks/property_sweep.py` runs a longer sweep.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from core.plan import NotLanded, Plan, PlanError
from equivalence import assert_passed, equivalence_worker
from partitioner import models
from partitioner.compiler import rank_programs
from passes import PassError
from ranks import on_ranks

BATCH, SEQ = 4, 16
REFUSALS = (PlanError, PassError, NotLanded)


def examples(world: int) -> int:
    """Cases per world size this run (2 ranks first, then 4)."""
    counts = os.environ.get("PARTITIONER_PROPERTY_EXAMPLES", "3,1").split(",")
    return int(counts[0 if world == 2 else -1])


# --- drawing models and plans ------------------------------------------------------------------
@st.composite
def configs(draw, moe: bool | None = None) -> dict:
    """GPTConfig fields of a small transformer (dense, or MoE with stacked experts)."""
    heads = draw(st.sampled_from([2, 4]))
    swiglu = draw(st.booleans())
    fields = dict(
        n_layer=draw(st.integers(1, 2)), n_head=heads,
        n_kv_head=draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0])),
        n_embd=heads * draw(st.sampled_from([4, 8])),  # head dim 4 or 8
        vocab_size=draw(st.integers(17, 80)),  # odd sizes: padded under a vocab-parallel tp
        tie_embeddings=draw(st.booleans()), bias=draw(st.booleans()), swiglu=swiglu,
        fused_gate_up=swiglu and draw(st.booleans()), fused_qkv=draw(st.booleans()),
        norm=draw(st.sampled_from(["layernorm", "rmsnorm"])),
        position=draw(st.sampled_from(["learned", "rope"])), seq_len=SEQ)
    if moe if moe is not None else _on_or_off(draw):
        experts = draw(st.sampled_from([2, 4]))
        fields.update(n_experts=experts, topk=draw(st.integers(1, 2)), moe_ffn_hidden=16)
    return fields


def _divisors(n: int) -> list[int]:
    """Largest first: hypothesis starts from the first choice, so a run of a few examples
    begins with the most parallel plan rather than the trivial one."""
    return [d for d in range(n, 0, -1) if n % d == 0]


def _on_or_off(draw) -> bool:
    return draw(st.sampled_from([True, False]))  # on first, for the same reason


@st.composite
def plans(draw, config: dict, world: int) -> str:
    """A plan text for `world` ranks built to be valid for `config` (degrees dividing the
    world, heads, experts and the batch; only forms that have landed)."""
    heads, kv = config["n_head"], config["n_kv_head"]
    experts = config.get("n_experts", 0)
    # one draw over every factorization, so that cp is as likely as tp (drawn one after the
    # other, cp would come only when tp and pp both drew 1)
    shapes = [(tp, pp, cp, world // (tp * pp * cp)) for tp in _divisors(world)
              if heads % tp == 0 and (kv % tp == 0 or tp % kv == 0)
              for pp in _divisors(world // tp) for cp in _divisors(world // (tp * pp))]
    tp, pp, cp, dp = draw(st.sampled_from(shapes))
    ep = 1
    if experts and experts % 2 == 0 and (tp * cp * dp) % 2 == 0:
        ep = draw(st.sampled_from([2, 1]))  # experts over 2 of the tp*cp*dp ranks (etp=1)
    items = [f"tp={tp}", f"pp={pp}", f"cp={cp}", f"dp={dp}"]
    if tp > 1 and _on_or_off(draw):
        items.append("sp=on")
    if cp > 1:
        items.append(f"cp_algo={draw(st.sampled_from(['ring', 'a2a']))}")
    if ep > 1:
        items += [f"ep={ep}", "etp=1"]
    elif dp > 1 and _on_or_off(draw):
        items.append("zero=1")
    microbatches = draw(st.sampled_from(_divisors(BATCH // dp)))  # dp*mb divides the batch
    if pp > 1:
        items += pipeline_items(draw, pp, config["n_layer"])
    items.append(f"mb={microbatches}")
    items.append(f"recompute={draw(st.sampled_from(['none', 'selective', 'full']))}")
    return ",".join(items)


def pipeline_items(draw, pp: int, layers: int) -> list[str]:
    """A schedule, with the virtual stages it needs, and sometimes a layout of the layers over
    the stages (`stage_layers`): the embedding stage and the head stage may hold none, a middle
    stage holds at least one (the plan's rule), so a layout exists when layers >= stages - 2."""
    schedule = draw(st.sampled_from(["1f1b", "zb-v", "interleaved-1f1b", "zb-h1", "gpipe"]))
    vpp = 2 if schedule in ("zb-v", "interleaved-1f1b") else 1
    stages = pp * vpp
    items = [f"schedule={schedule}"] + ([f"vpp={vpp}"] if vpp > 1 else [])
    layouts = [counts for counts in _compositions(layers, stages)
               if all(counts[1:-1])]
    if layouts and _on_or_off(draw):
        items.append("stage_layers=" + "/".join(map(str, draw(st.sampled_from(layouts)))))
    return items


def _compositions(total: int, parts: int) -> list[tuple[int, ...]]:
    """Every way to write `total` as `parts` non-negative counts, in order."""
    if parts == 1:
        return [(total,)]
    return [(first,) + rest for first in range(total, -1, -1)
            for rest in _compositions(total - first, parts - 1)]


def refusal(config: dict, plan: str, world: int, seq: int = SEQ) -> Exception | None:
    """What the compiler says of `plan` for this model before any rank runs (None: accepted)."""
    try:
        resolved = Plan.parse(plan).resolve(world)
        resolved.refuse_pending()
        model, (ids,) = models.tiny(batch=BATCH, seq=seq, **config)
        rank_programs(model, resolved, (ids,), ranks=[0])
    except REFUSALS as error:
        return error
    return None


@st.composite
def valid_cases(draw, world: int) -> tuple:
    """One equivalence case: a model and a plan the compiler accepts (refused draws are
    filtered out; they are the subject of the invalid-plan test below)."""
    config = draw(configs())
    plan = draw(plans(config, world))
    assume(refusal(config, plan, world) is None)
    options = dict(token_weighted=draw(st.booleans()), steps=1)
    return (f"{plan} on {config}", "tiny", dict(batch=BATCH, seq=SEQ, **config), plan,
            torch.float64, options)


def draw_cases(world: int, count: int) -> list:
    """`count` valid cases for `world` ranks, drawn in this process (deterministically)."""
    cases: list = []

    @settings(max_examples=count, derandomize=True, deadline=None, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(valid_cases(world))
    def collect(case):
        cases.append(case)

    collect()
    return cases


# --- dynamic shapes ----------------------------------------------------------------------------
DYNAMIC_PLANS = {2: ["cp=2", "pp=2,mb=2"], 4: ["tp=2,sp=on,dp=2,zero=1"]}
DYNAMIC_MODEL = dict(n_layer=2, n_embd=32, vocab_size=96, seq_len=32)  # tiny_llama, smaller


def dynamic_shapes(plan: str) -> tuple[dict[str, float], str]:
    """On every rank: a model parallelized at batch 4 x seq 16 run forward and stepped at 8 x 32,
    and forward at 4 x 8; relative errors against the single-device model, and explain()."""
    from partitioner import parallelize
    from partitioner.check import lm_logits, lm_loss, relative_error

    torch.manual_seed(0)
    model, (ids,) = models.tiny_llama(batch=4, seq=16, **DYNAMIC_MODEL)
    model = model.double()
    reference = copy.deepcopy(model)
    pm = parallelize(model, plan, example_inputs=(ids,), loss_fn=lm_loss)
    generator = torch.Generator().manual_seed(1)
    vocab = DYNAMIC_MODEL["vocab_size"]
    big = torch.randint(0, vocab, (8, 32), generator=generator)
    target = torch.randint(0, vocab, (8, 32), generator=generator)
    short = torch.randint(0, vocab, (4, 8), generator=generator)

    errors = {"forward 8x32": relative_error(lm_logits(pm(big)), lm_logits(reference(big)))}
    ref_loss = lm_loss(reference(big), target)
    ref_loss.backward()
    errors["loss 8x32"] = relative_error(pm.step(big, target=target), ref_loss)
    grads = pm.full_grad_dict()
    errors["gradients 8x32"] = max(relative_error(grads[name], p.grad)
                                   for name, p in reference.named_parameters())
    errors["forward 4x8"] = relative_error(lm_logits(pm(short)), lm_logits(reference(short)))
    return errors, pm.explain()


def _worker(cases, dynamic_plans):
    """Everything one world size checks, in one spawn."""
    return equivalence_worker(cases), [dynamic_shapes(plan) for plan in dynamic_plans]


@pytest.mark.parametrize("world", [2, 4])
def test_random_models_and_plans_match_one_device(world):
    cases = draw_cases(world, examples(world))
    assert len(cases) == examples(world)
    results = on_ranks(world, _worker, cases, DYNAMIC_PLANS[world])
    assert_passed([equivalence for equivalence, _ in results], cases)
    for rank, (_, dynamic) in enumerate(results):
        for plan, (errors, explained) in zip(DYNAMIC_PLANS[world], dynamic, strict=True):
            bad = {name: err for name, err in errors.items() if not err <= 1e-9}
            assert not bad, f"{plan}, rank {rank}: {bad}"
            # step captured one microbatch of this rank's share of the 8 x 32 batch
            plan_ = Plan.parse(plan).resolve(world)
            rows = 8 // (plan_.degree("dp") * plan_.microbatches)
            assert f"({rows}, 32) int64: step and forward" in explained, explained
            assert "(4, 8) int64" in explained and "(8, 32) int64" in explained, explained


# --- invalid plans -----------------------------------------------------------------------------
@st.composite
def any_plans(draw) -> tuple[str, int]:
    """(plan text, world size) over small degrees with no regard for validity. Defaults are
    drawn more often and the world mostly fits the degrees, so that many plans get past the
    plan's own checks to the passes."""
    values = {key: draw(st.sampled_from(choices)) for key, choices in (
        ("tp", [1, 1, 2, 3, 4]), ("pp", [1, 1, 2, 3]), ("cp", [1, 1, 2, 4]),
        ("ep", [1, 1, 1, 2, 3]), ("sp", ["off", "on"]), ("mb", [1, 1, 2, 3]),
        ("zero", [0, 0, 1]), ("vpp", [1, 1, 1, 2]),
        ("schedule", ["1f1b", "1f1b", "gpipe", "interleaved-1f1b", "zb-h1", "zb-v"]),
        ("cp_algo", ["ring", "ring", "a2a", "hybrid"]), ("cp_pad", ["on", "off"]),
        ("recompute", ["none", "full"]))}
    if draw(st.integers(0, 3)) == 0:
        values["dp"] = draw(st.sampled_from([1, 2, 3]))
    if draw(st.integers(0, 3)) == 0:
        values["etp"] = draw(st.sampled_from([1, 2]))
    if draw(st.integers(0, 3)) == 0:  # any counts, right or wrong in number and placement
        values["stage_layers"] = "/".join(str(draw(st.integers(0, 2)))
                                          for _ in range(draw(st.integers(1, 4))))
    dense = values["tp"] * values["pp"] * values["cp"]
    world = (draw(st.sampled_from([1, 2, 3, 4])) if draw(st.integers(0, 4)) == 0 else
             dense * draw(st.sampled_from([1, 1, 2])))
    return ",".join(f"{key}={value}" for key, value in values.items()), world


@settings(max_examples=20, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(config=configs(), plan_world=any_plans(), seq=st.sampled_from([SEQ, 12, 15]))
def test_random_plans_are_accepted_or_refused_with_a_message(config, plan_world, seq):
    """Compiling every rank's program on the meta device either works or raises one of our
    refusals with a message naming values; never another exception from deep inside."""
    plan, world = plan_world
    error = refusal(config, plan, world, seq)
    if error is not None:
        message = str(error)
        assert len(message) > 20 and any(c.isdigit() for c in message), repr(error)


@settings(max_examples=10, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(config=configs(), other=configs(), world=st.sampled_from([2, 4]),
       seq=st.sampled_from([SEQ, 12, 10, 6]), data=st.data())
def test_plans_valid_for_another_model_are_accepted_or_refused_with_a_message(
        config, other, world, seq, data):
    """A plan built valid for one model, applied to another one and another length: these get
    past the plan's own checks to the passes (heads, kv heads, experts, sequence splits)."""
    plan = data.draw(plans(config, world))
    error = refusal(other, plan, world, seq)
    if error is not None:
        message = str(error)
        assert len(message) > 20 and any(c.isdigit() for c in message), repr(error)

