"""partitioner.parallel_state against Megatron-Core's rank order.

Megatron-Core builds its groups with `RankGenerator(tp, ep, dp, pp, cp, order).get_ranks(token)`
over `generate_masked_orthogonal_rank_groups` (megatron/core/parallel_state.py): a dense
generator (ep=1) and an expert generator (tp=etp, dp=edp, cp=1). `megatron_get_ranks` below is
that documented algorithm, written from its docstring; the layout must agree with it for every
example's plan. The documented tp=2, cp=2, pp=2 layout on 8 ranks is checked literally.
"""

from __future__ import annotations

import math

import example_scripts
import pytest

from partitioner import parallel_state
from core.plan import Plan
from ranks import on_ranks


def megatron_get_ranks(sizes: dict[str, int], order: str, token: str) -> list[list[int]]:
    """RankGenerator.get_ranks(token): the rank is a mixed-radix number over `order`'s
    dimensions, the first fastest; a group varies the dimensions in `token` and fixes the rest.
    Groups are numbered by the fixed dimensions, ranks inside one by the varying ones."""
    names = order.split("-")
    strides = [math.prod(sizes[n] for n in names[:i]) for i in range(len(names))]
    inside = [(sizes[n], s) for n, s in zip(names, strides) if n in token.split("-")]
    outside = [(sizes[n], s) for n, s in zip(names, strides) if n not in token.split("-")]

    def offset(index: int, dims) -> int:
        total = 0
        for size, stride in dims:
            index, digit = divmod(index, size)
            total += digit * stride
        return total

    group_size = math.prod(size for size, _ in inside)
    groups = math.prod(size for size, _ in outside)
    return [[offset(g, outside) + offset(r, inside) for r in range(group_size)]
            for g in range(groups)]


def megatron_groups(plan: Plan) -> dict[str, list[list[int]]]:
    """Megatron's groups for a resolved plan, under our dimension names."""
    world = plan.world_size
    dense = {"tp": plan.tp, "cp": plan.cp, "dp": plan.dp, "pp": plan.pp, "ep": 1}
    edp = world // (plan.expert_tp * plan.ep * plan.pp)
    expert = {"tp": plan.expert_tp, "cp": 1, "dp": edp, "pp": plan.pp, "ep": plan.ep}
    return {
        **{dim: megatron_get_ranks(dense, plan.order, dim) for dim in ("tp", "cp", "dp", "pp")},
        "dp-cp": megatron_get_ranks(dense, plan.order, "dp-cp"),
        "etp": megatron_get_ranks(expert, plan.order, "tp"),
        "ep": megatron_get_ranks(expert, plan.order, "ep"),
        "edp": megatron_get_ranks(expert, plan.order, "dp"),
    }


def test_documented_tp2_cp2_pp2_layout_on_8_ranks():
    # Megatron's defaults: order tp-cp-ep-dp-pp, expert tensor parallelism = tp.
    groups = parallel_state.megatron_rank_groups(Plan(tp=2, cp=2, pp=2, etp=2).resolve(8))
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["cp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups["dp"] == [[r] for r in range(8)]
    assert groups["dp-cp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["etp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["ep"] == [[r] for r in range(8)]
    assert groups["edp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_megatron_docstring_example_16_ranks_tp2_pp4():
    # initialize_model_parallel's docstring: 16 GPUs, tp=2, pp=4 -> dp=2.
    groups = parallel_state.megatron_rank_groups(Plan(tp=2, pp=4).resolve(16))
    assert groups["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert groups["tp"] == [[2 * i, 2 * i + 1] for i in range(8)]
    assert groups["pp"] == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]


@pytest.mark.parametrize("plan,world", [
    (Plan(tp=2, cp=2, pp=2, etp=2), 8),
    (Plan(tp=2, cp=2, pp=2, etp=2), 16),
    (Plan(tp=4, pp=2, ep=2, etp=2), 16),
    (Plan(tp=2, pp=2, cp=2, ep=4, etp=1), 32),
    (Plan(tp=2, dp=2, pp=2, order="tp-pp-dp-cp-ep"), 8),
    (Plan(tp=2, cp=2, dp=2, order="cp-tp-ep-dp-pp"), 8),
])
def test_layout_follows_megatron_rank_generator(plan, world):
    assert parallel_state.megatron_rank_groups(plan.resolve(world)) == \
        megatron_groups(plan.resolve(world))


def _example_jobs():
    """Every example's job at its smallest run and at the guide's size."""
    jobs = []
    for name in example_scripts.NAMES:
        example = example_scripts.example(name)
        for world in sorted({example.smallest_world, example_scripts.GUIDE_WORLD[name]}):
            job = example_scripts.common().job_for(example, [], world)
            jobs.append(pytest.param(job, id=f"{name}-{world}"))
    return jobs


@pytest.mark.parametrize("job", _example_jobs())
def test_every_example_plan_follows_megatron(job):
    plan = Plan.parse(job.plan)
    groups = parallel_state.megatron_rank_groups(plan)
    assert groups == megatron_groups(plan)
    for rank in range(plan.world_size):  # the getters' per-rank view of the same groups
        state = parallel_state.ModelParallelState.of_rank(plan, rank)
        for dim, partition in groups.items():
            mine = next(group for group in partition if rank in group)
            assert state.ranks(dim) == mine
            assert state.rank_in(dim) == mine.index(rank)


def test_getters_before_initialization_say_how_to_initialize():
    parallel_state.destroy_model_parallel()
    assert not parallel_state.model_parallel_is_initialized()
    with pytest.raises(RuntimeError, match="initialize_model_parallel"):
        parallel_state.get_tensor_model_parallel_rank()


def test_getters_name_the_most_recent_model_in_their_docstring():
    for getter in (parallel_state.get_tensor_model_parallel_rank,
                   parallel_state.get_context_parallel_group,
                   parallel_state.get_data_parallel_world_size,
                   parallel_state.is_pipeline_last_stage):
        assert "most recent" in getter.__doc__


def _snapshot():
    import torch.distributed as dist

    ps = parallel_state
    views = {"tp": "tensor_model_parallel", "pp": "pipeline_model_parallel",
             "cp": "context_parallel", "ep": "expert_model_parallel",
             "etp": "expert_tensor_parallel", "edp": "expert_data_parallel"}
    out = {}
    for dim, name in views.items():
        group = getattr(ps, f"get_{name}_group")()
        out[dim] = (dist.get_process_group_ranks(group), getattr(ps, f"get_{name}_rank")(),
                    getattr(ps, f"get_{name}_world_size")())
    for dim, with_cp in (("dp", False), ("dp-cp", True)):
        group = ps.get_data_parallel_group(with_context_parallel=with_cp)
        out[dim] = (dist.get_process_group_ranks(group),
                    ps.get_data_parallel_rank(with_context_parallel=with_cp),
                    ps.get_data_parallel_world_size(with_context_parallel=with_cp))
    return out


def _live_worker():
    """initialize_model_parallel, then a model's mesh, then initialize again: the getters
    always describe the most recent, and their groups really reduce over those ranks."""
    import torch
    import torch.distributed as dist

    from runtime.mesh import Mesh

    ps = parallel_state
    rank = dist.get_rank()
    results = {}
    ps.initialize_model_parallel(context_parallel_size=2)  # dp=2, cp=2: a new dp-cp group
    results["init cp=2"] = _snapshot()
    total = torch.tensor([float(rank)])
    dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    alone = torch.tensor([float(rank)])  # tp has size 1: a group of this rank alone
    dist.all_reduce(alone, group=ps.get_tensor_model_parallel_group())
    results["sums"] = (total.item(), alone.item())
    ps.install(Mesh(Plan(tp=2, pp=2).resolve(4)))
    results["mesh tp=2,pp=2"] = _snapshot()
    ps.initialize_model_parallel(pipeline_model_parallel_size=2,
                                 virtual_pipeline_model_parallel_size=2)
    results["init pp=2,vpp=2"] = _snapshot()
    results["pipeline"] = (ps.get_virtual_pipeline_model_parallel_world_size(),
                           ps.is_pipeline_first_stage(),
                           ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=1),
                           ps.get_pipeline_model_parallel_next_rank(),
                           ps.get_pipeline_model_parallel_prev_rank())
    return results


def test_live_getters_follow_the_most_recent_state():
    plans = {"init cp=2": Plan(cp=2, etp=1), "mesh tp=2,pp=2": Plan(tp=2, pp=2),
             "init pp=2,vpp=2": Plan(pp=2, etp=1)}
    for rank, results in enumerate(on_ranks(4, _live_worker, timeout=300)):
        for key, plan in plans.items():
            groups = megatron_groups(plan.resolve(4))
            for dim, (ranks, index, size) in results[key].items():
                mine = next(group for group in groups[dim] if rank in group)
                assert (ranks, index, size) == (mine, mine.index(rank), len(mine)), (key, dim)
        dp_cp = next(g for g in megatron_groups(Plan(cp=2).resolve(4))["dp-cp"] if rank in g)
        assert results["sums"] == (float(sum(dp_cp)), float(rank))
        pp_rank, partner = rank // 2, (rank + 2) % 4
        assert results["pipeline"] == (2, pp_rank == 0, pp_rank == 1, partner, partner)


def test_first_and_last_stage_follow_the_schedules_placement():
    # interleaved: rank pp-1 holds the last stage as its last virtual stage; zb-v's V puts the
    # first and the last stage on rank 0 (virtual stages 0 and 1)
    def holds(plan, rank, stage, **kwargs):
        return parallel_state.ModelParallelState.of_rank(plan, rank).holds_stage(stage, **kwargs)

    interleaved = Plan(pp=2, vpp=2, microbatches=2, schedule="interleaved-1f1b").resolve(2)
    assert [holds(interleaved, r, 3) for r in (0, 1)] == [False, True]
    assert holds(interleaved, 1, 3, ignore_virtual=False, vp_stage=1)
    assert not holds(interleaved, 1, 3, ignore_virtual=False, vp_stage=0)
    v = Plan(pp=2, vpp=2, microbatches=2, schedule="zb-v").resolve(2)
    assert [holds(v, r, 3) for r in (0, 1)] == [True, False]
    assert [holds(v, r, 0) for r in (0, 1)] == [True, False]
    assert holds(v, 0, 3, ignore_virtual=False, vp_stage=1)
    assert not holds(v, 0, 3, ignore_virtual=False, vp_stage=0)
