import pytest

from partitioner.plan import Plan, PlanError, Rule


def test_defaults_match_the_design_card():
    plan = Plan()
    assert (plan.tp, plan.pp, plan.cp, plan.dp, plan.ep, plan.etp) == (1, 1, 1, None, 1, 1)
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
    ("tp=2,dp=1,ep=4", "etp*ep=1*4=4 must divide tp*cp*dp"),
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
