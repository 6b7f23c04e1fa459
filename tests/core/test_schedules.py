import pytest

from core.schedules import Action, schedule, timeline


@pytest.mark.parametrize("name, pp, m, vpp", [
    ("gpipe", 2, 4, 1), ("gpipe", 4, 3, 1), ("1f1b", 2, 1, 1), ("1f1b", 4, 8, 1),
    ("1f1b", 4, 2, 1), ("interleaved-1f1b", 2, 4, 2), ("interleaved-1f1b", 4, 8, 2),
    ("interleaved-1f1b", 2, 2, 3),
])
def test_every_microbatch_runs_forward_then_backward_once_per_stage(name, pp, m, vpp):
    per_rank = schedule(name, pp, m, vpp)
    assert len(per_rank) == pp
    for rank, actions in enumerate(per_rank):
        expected = {(k, mb, rank + c * pp) for k in "FB" for mb in range(m) for c in range(vpp)}
        assert {(a.kind, a.microbatch, a.stage) for a in actions} == expected
        assert len(actions) == len(expected)
        for a in actions:  # a backward never precedes its own forward on the rank
            if a.kind == "B":
                assert actions.index(Action("F", a.microbatch, a.stage)) < actions.index(a)
    timeline(per_rank)  # raises if the orders deadlock against each other


@pytest.mark.parametrize("pp, m", [(2, 4), (4, 8), (4, 4), (2, 1)])
def test_1f1b_and_gpipe_bubble_matches_theory(pp, m):
    theory = (pp - 1) / (m + pp - 1)
    for name in ("1f1b", "gpipe"):
        text = timeline(schedule(name, pp, m))
        measured = float(text.rsplit("bubble fraction ", 1)[1].split()[0])
        assert measured == pytest.approx(theory, abs=1e-3)


def test_1f1b_keeps_at_most_pp_microbatches_in_flight():
    for rank, actions in enumerate(schedule("1f1b", 4, 8)):
        in_flight = peak = 0
        for a in actions:
            in_flight += 1 if a.kind == "F" else -1
            peak = max(peak, in_flight)
        assert peak == 4 - rank  # GPipe would hold all 8


def test_interleaving_shrinks_the_bubble():
    plain = timeline(schedule("1f1b", 4, 8))
    interleaved = timeline(schedule("interleaved-1f1b", 4, 8, 2))
    bubble = lambda text: float(text.rsplit("bubble fraction ", 1)[1].split()[0])  # noqa: E731
    assert bubble(interleaved) < bubble(plain)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule 'zigzag'"):
        schedule("zigzag", 2, 2)
