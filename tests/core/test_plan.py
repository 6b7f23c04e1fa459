import pytest

from core.plan import Plan, PlanError, Rule


def test_defaults_match_the_design_card():
    plan = Plan()
    assert (plan.tp, plan.pp, plan.cp, plan.dp, plan.ep, plan.etp) == (1, 1, 1, None, 1, None)
    assert Plan(tp=4).expert_tp == 4 and Plan(tp=4, etp=1).expert_tp == 1  # etp follows tp
    assert (plan.cp_pad, plan.cp_a2a, plan.capacity_factor, plan.stage_layers) == (
        True, None, None, None)
    assert (plan.async_tp, plan.compile, plan.param_dtype, plan.reduce_dtype, plan.loss_scale,
            plan.seed) == (False, False, None, "fp32", None, 0)
    assert (plan.schedule, plan.microbatches, plan.vpp, plan.cp_algo) == ("1f1b", 1, 1, "ring")
    assert (plan.zero, plan.recompute, plan.order, plan.sp) == (0, "none", "tp-cp-ep-dp-pp", False)


def test_parse_round_trips_every_field():
    text = ("tp=2,pp=2,cp=2,dp=1,ep=2,etp=1,sp=on,mb=8,schedule=interleaved-1f1b,vpp=2,"
            "cp_algo=a2a,zero=1,recompute=selective,order=tp-cp-ep-dp-pp,"
            "rules=blocks.*.mlp:replicate;lm_head:vocab")
    plan = Plan.parse(text)
    assert plan.microbatches == 8 and plan.sp is True and plan.vpp == 2
    assert plan.rules == (Rule("blocks.*.mlp", "replicate"), Rule("lm_head", "vocab"))
    assert Plan.parse(str(plan)) == plan
    assert Plan(**{**plan.to_dict(), "rules": plan.to_dict()["rules"]}) == plan


def test_rules_first_match_wins():
    plan = Plan.parse("rules=blocks.0.*:replicate;blocks.*:colwise")
    assert plan.rule_for("blocks.0.attn") == "replicate"
    assert plan.rule_for("blocks.1.attn") == "colwise"
    assert plan.rule_for("lm_head") is None


@pytest.mark.parametrize("text, fragment", [
    ("tp=0", "tp=0 must be a positive integer"),
    ("pp=-1", "pp=-1 must be a positive integer"),
    ("tp=two", "tp='two' in 'tp=two' must be an integer"),
    ("foo=1", "unknown plan key 'foo'"),
    ("tp=2,tp=4", "given twice"),
    ("tp2", "is not key=value"),
    ("sp=maybe", "sp='maybe' in 'sp=maybe' must be on or off"),
    ("sp=on", "sp=on needs tp>1"),
    ("vpp=2", "vpp=2 needs schedule=interleaved-1f1b"),
    ("pp=4,mb=6,schedule=interleaved-1f1b", "microbatches % pp == 0"),
    ("schedule=zigzag", "schedule='zigzag' is unknown"),
    ("cp_algo=tree", "cp_algo='tree' is unknown"),
    ("recompute=some", "recompute='some' is unknown"),
    ("zero=3", "zero=3 must be 0 or 1"),
    ("order=tp-dp-pp", "must be a permutation"),
    ("rules=lm_head", "must be glob:kind"),
    ("rules=lm_head:shard", "kind 'shard' is unknown"),
    ("tp=2,dp=1,ep=4,etp=1", "etp*ep=1*4=4 must divide tp*cp*dp"),
    ("tp=2,dp=1,ep=2", "etp*ep=2*2=4 must divide tp*cp*dp=2*1*1=2"),
    ("cp=4,cp_algo=hybrid", "cp_algo=hybrid needs cp_a2a, the all-to-all sub-group size (one of "
                            "2 for cp=4)"),
    ("cp=2,cp_algo=hybrid", "cp=2 has none: use cp_algo=ring or cp_algo=a2a"),
    ("cp=4,cp_algo=hybrid,cp_a2a=3", "cp_a2a=3 must divide cp=4 and lie strictly between 1 and cp "
                                     "(valid: 2)"),
    ("cp=2,cp_a2a=2", "set cp_algo=hybrid or drop cp_a2a"),
    ("pp=2,stage_layers=1/2/3", "stage_layers has 3 counts but the plan has pp*vpp=2*1=2"),
    ("pp=2,stage_layers=0/0", "puts no layer on any stage"),
    ("pp=2,stage_layers=a/b", "must be layer counts joined by '/'"),
    ("pp=2,stage_layers=2*0", "`n*k` for k stages of n"),
    ("pp=4,stage_layers=1/0/0/3", "leaves middle stage(s) 1, 2 without a layer; only the "
                                  "first stage (the embedding alone) and the last"),
    ("capacity_factor=-1", "capacity_factor=-1.0 must be a positive number"),
    ("capacity_factor=lots", "capacity_factor='lots' in 'capacity_factor=lots' must be a number"),
    ("pp=2,schedule=zb-v", "schedule=zb-v places two stages per rank in a V: set vpp=2"),
    ("pp=2,vpp=2,schedule=zb-h1", "vpp=2 needs schedule=interleaved-1f1b"),
    ("param_dtype=fp8", "param_dtype='fp8' is unknown"),
    ("reduce_dtype=int8", "reduce_dtype='int8' is unknown"),
    ("loss_scale=dynamic", "loss_scale=dynamic is for param_dtype=fp16"),
    ("param_dtype=fp16,loss_scale=static", "loss_scale='static' is unknown"),
    ("async_tp=on", "async_tp=on needs tp>1"),
    ("tp=4,async_tp=on", "async_tp=on needs sp=on (it decomposes sp's all-gather before the "
                         "column-parallel linears and reduce-scatter after the row-parallel "
                         "ones into tp=4 ring steps"),
    ("compile=maybe", "compile='maybe' in 'compile=maybe' must be on or off"),
    ("seed=-1", "seed=-1 must be a non-negative integer"),
])
def test_every_validation_rule_names_the_values(text, fragment):
    with pytest.raises(PlanError) as info:
        Plan.parse(text)
    assert fragment in str(info.value)


def test_resolve_fills_dp_and_checks_the_world():
    assert Plan(tp=2, pp=2).resolve(8).dp == 2
    assert Plan(tp=2, dp=2).resolve(4).world_size == 4
    with pytest.raises(PlanError, match=r"world size 6 is not divisible by tp\*pp\*cp=2\*2\*1=4"):
        Plan(tp=2, pp=2).resolve(6)
    with pytest.raises(PlanError, match=r"tp\*pp\*cp\*dp=2\*1\*1\*2=4 != world size 8; set dp=4"):
        Plan(tp=2, dp=2).resolve(8)
    with pytest.raises(PlanError, match="etp\\*ep"):
        Plan(tp=1, ep=4).resolve(2)


def test_plan_is_frozen_and_hashable():
    plan = Plan(tp=2)
    with pytest.raises(Exception):
        plan.tp = 4  # type: ignore[misc]
    assert {plan: 1}[Plan(tp=2)] == 1


def test_new_fields_round_trip_through_the_plan_string():
    text = ("tp=2,pp=2,cp=4,cp_algo=hybrid,cp_a2a=2,cp_pad=off,ep=2,etp=1,capacity_factor=1.25,"
            "stage_layers=3/5,sp=on,async_tp=on,compile=on,param_dtype=fp16,reduce_dtype=bf16,"
            "loss_scale=dynamic,seed=7")
    plan = Plan.parse(text)
    assert plan.stage_layers == (3, 5) and plan.capacity_factor == 1.25 and plan.cp_pad is False
    assert Plan.parse(str(plan)) == plan
    assert Plan(**plan.to_dict()) == plan
    assert Plan.parse("pp=2,vpp=2,schedule=zb-v,mb=4").vpp == 2


def test_fields_that_have_not_landed_are_refused_with_the_way_out():
    from core.plan import NotLanded

    assert Plan(tp=2, sp=True, pp=2, microbatches=2).pending() == []
    assert Plan(tp=4, etp=4).pending() == []  # etp equal to tp is the default layout
    assert Plan(tp=2, compile=True).pending() == []  # compile landed (issue 17)
    # ep beside cp landed (issue 13), zb-h1 too
    assert Plan.parse("tp=2,cp=2,ep=2,etp=1,compile=on,schedule=zb-h1,pp=2").pending() == []
    asks = Plan.parse("tp=4,cp=2,ep=2,etp=2").pending()
    assert [a.split(" is not available")[0] for a in asks] == [
        "expert tensor parallelism other than 1 or tp (1 < etp != tp)"]
    assert "(the plan asks etp=2); set etp=1" in asks[0]
    for algo in (dict(cp_algo="hybrid", cp_a2a=2), dict(cp_algo="allgather")):
        with pytest.raises(NotLanded, match=r"hybrid and all-gather context parallelism .*"
                                            r"the plan asks cp_algo=.*use cp_algo=ring"):
            Plan(cp=4, **algo).refuse_pending()
    assert Plan(cp=2).pending() == []
    # async TP landed (issue 18), except compiled or under a zero-bubble schedule
    assert Plan.parse("tp=2,sp=on,async_tp=on,pp=2,mb=2").pending() == []
    for extra in ("compile=on", "pp=2,mb=2,schedule=zb-h1"):
        asks = Plan.parse(f"tp=2,sp=on,async_tp=on,{extra}").pending()
        assert len(asks) == 1 and asks[0].startswith("async tensor parallelism with compile=on "
                                                     "or a zero-bubble schedule")
        assert "set async_tp=off, or compile=off and a schedule other than" in asks[0]
    # mixed precision landed (issue 15), except beside compiled ranks
    assert Plan.parse("tp=2,param_dtype=fp16,reduce_dtype=bf16,loss_scale=dynamic").pending() == []
    assert Plan(param_dtype="bf16", compile=True).pending()[0].startswith(
        "mixed precision with compiled ranks (param_dtype with compile=on) is not available yet")


def test_reduce_dtype_needs_mixed_precision():
    with pytest.raises(PlanError, match="reduce_dtype=bf16 is the dtype of gradient reduction "
                                        "under mixed precision, which needs param_dtype"):
        Plan(reduce_dtype="bf16")
    assert Plan(param_dtype="bf16", reduce_dtype="bf16").reduce_dtype == "bf16"


def _refusal(text: str, world: int) -> str:
    with pytest.raises(PlanError) as info:
        Plan.parse(text).resolve(world)
    return str(info.value)


def test_the_fixes_plan_messages_print_are_accepted():
    """Each value a message suggests, applied, gives a plan that resolves."""
    import re

    message = _refusal("tp=2,pp=2", 6)  # launch (4 or 8) ranks, or degrees dividing 6
    launch = re.search(r"launch a multiple of 4 ranks \((\d+) or (\d+)\)", message)
    for world in map(int, launch.groups()):
        Plan.parse("tp=2,pp=2").resolve(world)
    products = re.search(r"whose product divides 6 \(([\d, ]+)\)", message).group(1)
    for product in map(int, products.split(", ")):
        Plan(tp=product).resolve(6)
    dp = re.search(r"set dp=(\d+)", _refusal("tp=2,dp=2", 8)).group(1)
    Plan.parse(f"tp=2,dp={dp}").resolve(8)
    mb = re.search(r"use mb=(\d+)", _refusal("pp=2,vpp=2,schedule=interleaved-1f1b,mb=3", 2))
    Plan.parse(f"pp=2,vpp=2,schedule=interleaved-1f1b,mb={mb.group(1)}").resolve(2)
    fits = re.search(r"ep values that fit with etp=2: ([\d, ]+)", _refusal("tp=2,ep=4,dp=2", 4))
    for ep in map(int, fits.group(1).split(", ")):
        Plan(tp=2, ep=ep, dp=2).resolve(4)
    Plan.parse(re.search(r"set (sp=on)", _refusal("tp=2,async_tp=on", 2)).group(1) +
               ",tp=2,async_tp=on").resolve(2)
    valid = re.search(r"\(valid: ([\d, ]+)\)", _refusal("cp=8,cp_algo=hybrid,cp_a2a=3", 8))
    for size in map(int, valid.group(1).split(", ")):
        Plan(cp=8, cp_algo="hybrid", cp_a2a=size).resolve(8)


def test_stage_layers_repeat_syntax_and_megatron_uneven_layouts():
    from core.plan import uneven_layouts

    plan = Plan.parse("pp=16,vpp=2,schedule=interleaved-1f1b,mb=16,stage_layers=3/4*30/3")
    assert plan.stage_layers == (3,) + (4,) * 30 + (3,) and sum(plan.stage_layers) == 126
    assert "stage_layers=3/4*30/3" in str(plan) and Plan.parse(str(plan)) == plan
    assert Plan.parse("pp=2,stage_layers=0/3").stage_layers == (0, 3)  # the embedding alone
    assert Plan.parse("pp=2,stage_layers=0/3").pending() == []  # landed (issue 18)
    # first and last stage fewer, the middle equal: 2*edge + (stages-2)*middle == layers
    assert uneven_layouts(126, 32) == [(3,) + (4,) * 30 + (3,)]
    assert uneven_layouts(126, 64) == [(1,) + (2,) * 62 + (1,)]
    assert uneven_layouts(126, 16) == [(7,) + (8,) * 14 + (7,), (0,) + (9,) * 14 + (0,)]
    assert uneven_layouts(128, 48) == [] and uneven_layouts(7, 4) == []
    assert uneven_layouts(5, 2) == []  # two stages have no middle: both are edges
