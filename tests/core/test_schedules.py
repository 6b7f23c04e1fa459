import pytest

from core.schedules import Action, action_graph, dependencies, schedule, timeline


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


def test_dependencies_are_the_activation_and_gradient_edges():
    assert dependencies(Action("F", 3, 0), 4) == []
    assert dependencies(Action("F", 3, 2), 4) == [Action("F", 3, 1)]
    assert dependencies(Action("B", 3, 2), 4) == [Action("F", 3, 2), Action("B", 3, 3)]
    assert dependencies(Action("B", 3, 3), 4) == [Action("F", 3, 3)]  # the last stage
    assert dependencies(Action("S", 0, 1), 4) == []  # the cost model's step tail


def test_action_graph_orders_every_action_after_its_inputs():
    orders = schedule("interleaved-1f1b", 2, 4, 2)
    graph = action_graph(orders)
    assert graph.number_of_nodes() == sum(len(actions) for actions in orders)
    assert graph.has_edge(Action("F", 1, 0), Action("F", 1, 1))  # data, across ranks
    assert graph.has_edge(orders[0][0], orders[0][1])  # the rank's own order


def test_a_deadlocking_schedule_is_refused_before_anything_runs():
    # rank 0 waits for the backward of stage 1 before running the forward stage 1 needs
    crossed = [[Action("B", 0, 0), Action("F", 0, 0)], [Action("F", 0, 1), Action("B", 0, 1)]]
    with pytest.raises(ValueError, match="schedule deadlocks: the ranks' orders wait"):
        action_graph(crossed)
    with pytest.raises(ValueError, match="schedule deadlocks"):
        timeline(crossed)
    missing = [[Action("F", 0, 0), Action("B", 0, 0)], [Action("B", 0, 1)]]  # no F of stage 1
    with pytest.raises(ValueError, match="F0.1, which no rank runs"):
        action_graph(missing)
