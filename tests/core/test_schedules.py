import pytest

from core.schedules import (Action, action_graph, dependencies, placement, schedule, timeline,
                            unit_bubble, unit_finish_times)


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


# --- zero-bubble schedules (Qi et al. 2023) -------------------------------------------------
ZERO_BUBBLE = [("zb-h1", 2, 4, 1), ("zb-h1", 4, 8, 1), ("zb-h1", 4, 2, 1), ("zb-h1", 3, 5, 1),
               ("zb-h1", 2, 1, 1), ("zb-v", 2, 4, 2), ("zb-v", 4, 8, 2), ("zb-v", 4, 2, 2),
               ("zb-v", 3, 5, 2), ("zb-v", 2, 1, 2)]


@pytest.mark.parametrize("name, pp, m, vpp", ZERO_BUBBLE)
def test_zero_bubble_runs_f_i_w_once_per_stage_in_dependency_order(name, pp, m, vpp):
    orders = schedule(name, pp, m, vpp)
    ranks = placement(name, pp, vpp)
    assert len(ranks) == pp * vpp and sorted(set(ranks)) == list(range(pp))
    for rank, actions in enumerate(orders):
        stages = [s for s, r in enumerate(ranks) if r == rank]
        expected = {(k, mb, s) for k in "FIW" for mb in range(m) for s in stages}
        assert {(a.kind, a.microbatch, a.stage) for a in actions} == expected
        assert len(actions) == len(expected)
        for a in actions:  # every dependency on the same rank comes earlier in its order
            for dep in dependencies(a, pp * vpp):
                if ranks[dep.stage] == rank:
                    assert actions.index(dep) < actions.index(a), (a, dep)
    action_graph(orders)  # cross-rank dependencies: no deadlock


def test_zb_v_places_stages_in_a_v_and_refuses_other_vpp():
    assert placement("zb-v", 4, 2) == (0, 1, 2, 3, 3, 2, 1, 0)  # last stage (loss) on rank 0
    assert placement("interleaved-1f1b", 4, 2) == (0, 1, 2, 3, 0, 1, 2, 3)
    assert placement("zb-h1", 2) == (0, 1)
    with pytest.raises(ValueError, match="vpp must be 2"):
        placement("zb-v", 2, 3)
    with pytest.raises(ValueError, match="zb-h1 has one stage per rank: vpp must be 1"):
        schedule("zb-h1", 2, 4, 2)


def test_zero_bubble_dependencies_split_the_backward():
    assert dependencies(Action("I", 1, 2), 4) == [Action("F", 1, 2), Action("I", 1, 3)]
    assert dependencies(Action("I", 1, 3), 4) == [Action("F", 1, 3)]
    assert dependencies(Action("W", 1, 2), 4) == [Action("I", 1, 2)]  # nothing of another stage
    # a W before its I on the rank is a cycle; an I that waits for a B no rank runs is refused
    with pytest.raises(ValueError, match="schedule deadlocks"):
        action_graph([[Action("F", 0, 0), Action("W", 0, 0), Action("I", 0, 0)]])
    with pytest.raises(ValueError, match="B0.1, which no rank runs"):
        action_graph([[Action("F", 0, 0), Action("B", 0, 0)], [Action("F", 0, 1),
                                                               Action("I", 0, 1)]])


def _peaks(actions):
    """Peak count of microbatch stages forwarded but not yet past their I, and past their W."""
    before_i = before_w = peak_i = peak_w = 0
    for a in actions:
        before_i += {"F": 1, "I": -1}.get(a.kind, 0)
        before_w += {"F": 1, "W": -1}.get(a.kind, 0)
        peak_i, peak_w = max(peak_i, before_i), max(peak_w, before_w)
    return peak_i, peak_w


@pytest.mark.parametrize("pp, m", [(2, 4), (4, 8), (4, 4), (3, 5), (4, 2)])
def test_zb_h1_memory_is_1f1b_peak(pp, m):
    """Rank r holds at most min(m, p - r) microbatches waiting for their input gradient (1F1B's
    in-flight count) and at most min(m, p) waiting for their weight gradient (the paper: the W
    delay makes every rank hold p, 1F1B's peak on rank 0)."""
    for rank, actions in enumerate(schedule("zb-h1", pp, m)):
        peak_i, peak_w = _peaks(actions)
        assert peak_i <= min(m, pp - rank)
        assert peak_w <= min(m, pp)


@pytest.mark.parametrize("pp, m", [(2, 4), (4, 8), (3, 5)])
def test_zb_v_memory_is_1f1b_peak(pp, m):
    """ZB-V holds at most 2p stage activations per rank (each half the rank's layers): p
    microbatches of its layers, 1F1B's peak."""
    for actions in schedule("zb-v", pp, m, 2):
        assert _peaks(actions)[1] <= 2 * pp


@pytest.mark.parametrize("pp, m", [(2, 4), (4, 8), (4, 4), (3, 5), (2, 8)])
def test_zero_bubble_spans_match_theory_on_unit_costs(pp, m):
    """With T_F = T_I = T_W = 1 per stage (B = I + W = 2), for m >= p:
    1F1B: span (m + p - 1) * 3, bubble (p-1)(F+B) per rank;
    ZB-H1: span 3m + (p-1), bubble (p-1)(F + I - W) per rank (the paper's formula, a third of
    1F1B's);
    ZB-V: two half-size stages per rank, span 6m + (p-1) in stage units: only rank p-1's wait
    for the first microbatch's p-1 forwards, the least any order can do (zero bubble as
    m grows, as the paper's ZB-V)."""
    span = lambda orders: max(unit_finish_times(orders).values())  # noqa: E731
    assert span(schedule("1f1b", pp, m)) == (m + pp - 1) * 3
    assert span(schedule("zb-h1", pp, m)) == 3 * m + (pp - 1)
    assert span(schedule("zb-v", pp, m, 2)) == 6 * m + (pp - 1)
    assert unit_bubble(schedule("zb-h1", pp, m)) == pytest.approx((pp - 1) / (3 * m + pp - 1))
    assert (unit_bubble(schedule("gpipe", pp, m)) >= unit_bubble(schedule("1f1b", pp, m))
            > unit_bubble(schedule("zb-h1", pp, m)) > unit_bubble(schedule("zb-v", pp, m, 2)))
    assert "I0" in timeline(schedule("zb-h1", pp, m)) and "W0.1" in timeline(
        schedule("zb-v", pp, m, 2))


def test_zb_v_bubble_is_within_its_start_up_bound():
    """In stage units (F = I = W = 1, a stage half a rank's layers) no ZB-V order can end before
    6m + p - 1 (rank p-1 waits p-1 forwards for its first input, then has 6m of work). The
    greedy order reaches it at p = 2 and stays within p - 2 of it up to p = 8 (under 1F1B's
    activation memory): always less idle time than ZB-H1 (3m + p - 1 of full-stage units, i.e.
    6m + 2p - 2 here) and than interleaved 1F1B."""
    for pp in range(2, 9):
        for m in (pp, pp + 1, 2 * pp, 3 * pp + 1):
            span = max(unit_finish_times(schedule("zb-v", pp, m, 2)).values())
            assert 6 * m + pp - 1 <= span <= 6 * m + max(pp - 1, 2 * pp - 3), (pp, m)
            assert span < 2 * max(unit_finish_times(schedule("zb-h1", pp, m)).values())
            if m % pp == 0:
                assert span < max(unit_finish_times(
                    schedule("interleaved-1f1b", pp, m, 2)).values())
