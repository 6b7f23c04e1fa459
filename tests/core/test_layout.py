import pytest

from core.plan import Plan
from core.layout import RankLayout


def test_dense_layout_is_megatron_order_tp_fastest():
    layout = RankLayout.dense(Plan(tp=2, pp=2, dp=2))
    assert layout.coords(0) == {"tp": 0, "cp": 0, "dp": 0, "pp": 0}
    assert layout.coords(1) == {"tp": 1, "cp": 0, "dp": 0, "pp": 0}
    assert layout.coords(2) == {"tp": 0, "cp": 0, "dp": 1, "pp": 0}
    assert layout.coords(5) == {"tp": 1, "cp": 0, "dp": 0, "pp": 1}
    assert layout.partitions("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.partitions("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.partitions("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_order_string_permutes_the_layout():
    layout = RankLayout.dense(Plan(tp=2, dp=2, order="dp-cp-ep-tp-pp"))
    assert layout.partitions("dp") == [[0, 1], [2, 3]]
    assert layout.partitions("tp") == [[0, 2], [1, 3]]


def test_expert_layout_carves_ep_out_of_the_dense_ranks():
    plan = Plan(tp=2, dp=2, ep=2, etp=1).resolve(4)
    layout = RankLayout.expert(plan)
    assert dict(layout.sizes) == {"etp": 1, "ep": 2, "edp": 2, "pp": 1}
    assert layout.partitions("ep") == [[0, 1], [2, 3]]


@pytest.mark.parametrize("plan", [Plan(tp=2, pp=2, dp=2), Plan(tp=4, cp=2, dp=1),
                                  Plan(pp=2, dp=4, order="pp-dp-cp-ep-tp")])
def test_every_rank_in_exactly_one_group_per_dim(plan):
    layout = RankLayout.dense(plan)
    for dim, size in layout.sizes:
        groups = layout.partitions(dim)
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(layout.world_size))
        assert all(len(g) == size for g in groups)
        for rank in range(layout.world_size):
            assert layout.rank_of(layout.coords(rank)) == rank
