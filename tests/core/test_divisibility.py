import pytest

from core.divisibility import divisors, nearest_multiples, proper_divisors
from core.plan import Plan, PlanError


def test_divisors_and_nearest_multiples():
    assert divisors(12) == [1, 2, 3, 4, 6, 12] and divisors(0) == []
    assert proper_divisors(8) == [2, 4] and proper_divisors(7) == []
    assert nearest_multiples(6, 4) == (4, 8)
    assert nearest_multiples(8, 4) == (8, 12)  # already valid: the next one up
    assert nearest_multiples(3, 4) == (4, 8)  # nothing below: the two smallest


def test_world_size_message_names_sizes_that_work():
    with pytest.raises(PlanError) as info:
        Plan(tp=2, pp=2).resolve(6)
    assert "launch a multiple of 4 ranks (4 or 8)" in str(info.value)
    assert "(1, 2, 3, 6)" in str(info.value)
    Plan(tp=2, pp=2).resolve(8)  # the suggested size is accepted


def test_expert_message_names_ep_values_that_fit():
    with pytest.raises(PlanError, match="ep values that fit with etp=1: 1, 2, 4"):
        Plan(tp=2, dp=2, ep=8, etp=1).resolve(4)
    assert Plan(tp=2, dp=2, ep=4, etp=1).resolve(4).ep == 4  # a suggested value is accepted
