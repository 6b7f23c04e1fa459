import time

import pytest
import torch
import torch.distributed as dist

from core.plan import Plan
from runtime import RankError, RankPool, spawn
from core import ops as C
from runtime.mesh import Mesh


def _rank_and_world():
    return dist.get_rank(), dist.get_world_size()


def _fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("boom on rank one")
    dist.barrier()  # rank 0 would wait here forever without spawn's clean-up
    return "unreachable"


def test_spawn_returns_every_rank_result():
    assert spawn(3, _rank_and_world) == [(0, 3), (1, 3), (2, 3)]


def test_spawn_reraises_a_rank_error_without_hanging():
    start = time.monotonic()
    with pytest.raises(RankError, match="rank 1 failed(.|\n)*boom on rank one"):
        spawn(2, _fail_on_rank_one, timeout=120)
    assert time.monotonic() - start < 60


def _pid_and_sum(value):
    import os

    total = torch.tensor([float(value)])
    dist.all_reduce(total)
    return os.getpid(), total.item()


def _catch_a_recorded_failure():
    """A failure reported to the other ranks (as the executor does while graphs run) that the
    rank's own code then catches."""
    from runtime.failure import watch_failures

    if dist.get_rank() == 0:
        try:
            with watch_failures().scope():
                raise ValueError("caught on rank zero")
        except ValueError:
            pass
    time.sleep(1.0)  # the other rank's watcher may stop it here, or the run's end does
    return "done"


def _make_groups():
    """One group runtime.mesh keeps for reuse and three of the run's own: the process's
    groups, the default one included."""
    from runtime.mesh import process_group

    process_group([0, 1])
    for _ in range(3):
        dist.new_group([0, 1])
    return len(dist.distributed_c10d._world.pg_map)


def _live_groups():
    from runtime.mesh import cached_groups

    return len(dist.distributed_c10d._world.pg_map), len(cached_groups())


def test_a_rank_pool_runs_many_times_on_the_same_ranks_and_a_failure_ends_it():
    with RankPool(2, timeout=120) as pool:
        first = pool.run(_pid_and_sum, 1)
        second = pool.run(_pid_and_sum, 2)
        assert [total for _, total in first] == [2.0, 2.0]
        assert [total for _, total in second] == [4.0, 4.0]
        assert [pid for pid, _ in first] == [pid for pid, _ in second]  # no new processes
        # a run's own process groups end with it; runtime.mesh's cached ones are reused
        assert pool.run(_make_groups) == [5, 5]
        assert pool.run(_live_groups) == [(2, 1), (2, 1)]  # the default and the cached group
        with pytest.raises(RankError, match="rank 1 failed(.|\n)*boom on rank one"):
            pool.run(_fail_on_rank_one, timeout=120)
        assert not pool.alive
        with pytest.raises(RuntimeError, match="start a new one"):
            pool.run(_pid_and_sum, 1)
    with RankPool(2, timeout=120) as pool:  # a caught failure fails its run, not a later one
        with pytest.raises(RankError, match="caught on rank zero"):
            pool.run(_catch_a_recorded_failure, timeout=120)
        assert not pool.alive


def _collective_checks():
    """Forward and backward of every conjugate pair on a tp=2 x dp=2 mesh (float64), each op
    naming its group as a lowered graph does."""
    mesh = Mesh(Plan(tp=2, dp=2).resolve(4))
    tp, group = mesh.coord("tp"), mesh.group_names()["tp"]
    results = {}
    base = torch.arange(8, dtype=torch.float64).reshape(2, 4) + 10 * dist.get_rank()
    peer = base + 10 * (mesh.ranks("tp")[1 - tp] - dist.get_rank())  # the other tp rank's
    x = base.clone().requires_grad_()
    y = C.all_reduce(x, group)  # forward sum over tp, backward identity
    y.backward(torch.ones_like(y))
    results["all_reduce"] = (torch.equal(y, base + peer), torch.equal(x.grad, torch.ones_like(x)))
    x = base.clone().requires_grad_()
    y = C.copy_to_region(x, group)  # forward identity, backward all-reduce
    y.backward(torch.full_like(y, 1.0 + tp))
    results["copy_to_region"] = (torch.equal(y, base), torch.equal(x.grad, torch.full_like(x, 3.0)))
    x = base.clone().requires_grad_()
    y = C.all_gather(x, group, tensor_dim=1)  # (2, 8)
    y.backward(torch.arange(16, dtype=torch.float64).reshape(2, 8))
    results["all_gather"] = (tuple(y.shape) == (2, 8) and torch.equal(y[:, 4 * tp: 4 * tp + 4], base),
                             torch.equal(x.grad, torch.arange(16, dtype=torch.float64).reshape(2, 8)[:, 4 * tp: 4 * tp + 4]))
    x = base.clone().requires_grad_()
    y = C.reduce_scatter(x, group, tensor_dim=1)  # (2, 2)
    y.backward(torch.ones_like(y))
    results["reduce_scatter"] = (torch.equal(y, (base + peer)[:, 2 * tp: 2 * tp + 2]),
                                 torch.equal(x.grad, torch.ones(2, 4, dtype=torch.float64)))
    x = base.clone().requires_grad_()
    y = C.gather_for_region(x, group, tensor_dim=0)  # (4, 4), backward reduce-scatter
    y.backward(torch.ones_like(y))
    results["gather_for_region"] = (tuple(y.shape) == (4, 4), torch.equal(x.grad, torch.full_like(x, 2.0)))
    x = base.clone().requires_grad_()
    y = C.scatter(x, group, tensor_dim=1)
    y.backward(torch.ones_like(y))
    # backward all-gathers: the other slices' gradients come from the other tp ranks
    results["scatter"] = (torch.equal(y, base[:, 2 * tp: 2 * tp + 2]),
                          torch.equal(x.grad, torch.ones(2, 4, dtype=torch.float64)))
    x = base.clone().requires_grad_()
    y = C.all_to_all(x, group, scatter_dim=1, gather_dim=0)  # (4, 2)
    y.backward(y.detach().clone())
    results["all_to_all"] = (tuple(y.shape) == (4, 2), torch.equal(x.grad, base))
    x = base.clone().requires_grad_()
    y = C.copy_to_region(x, group)
    results["copy_to_region_is_a_view"] = (y._base is x, True)  # f costs no copy
    # another model's mesh over the same ranks gets the same process groups, not new ones
    again, other = Mesh(Plan(tp=2, dp=2).resolve(4)), Mesh(Plan(tp=2, pp=2).resolve(4))
    results["groups_made_once"] = (again.group("tp") is mesh.group("tp"),
                                   other.group("pp") is mesh.group("dp"))
    return results


def test_conjugate_collectives_forward_and_backward():
    for rank, results in enumerate(spawn(4, _collective_checks)):
        for name, (forward_ok, backward_ok) in results.items():
            assert forward_ok, f"{name} forward wrong on rank {rank}"
            assert backward_ok, f"{name} backward wrong on rank {rank}"


def test_an_unlowered_collective_has_no_shape_and_says_so():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), pytest.raises(ValueError, match="passes.lowering.collectives"):
        C.all_gather(torch.empty(2, 4), "tp", 1)
    with FakeTensorMode():  # lowered: the group size is in the call
        assert C.all_gather(torch.empty(2, 4), "1", 1, group_size=2).shape == (2, 8)
        assert C.all_to_all(torch.empty(2, 4), "1", 1, 0, group_size=2).shape == (4, 2)


def _compiled_matches_eager():
    """torch.compile (aot_eager, one graph: no break) traces lowered ops, backward included."""
    mesh = Mesh(Plan(tp=2).resolve(2))
    group = mesh.group_names()["tp"]
    w = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def step(x):
        y = C.copy_to_region(x, group) @ w
        z = C.reduce_scatter(C.all_reduce(y, group), group, 0, group_size=2)
        return C.gather_for_region(z, group, 1, group_size=2).sum()

    x = torch.arange(16, dtype=torch.float64).reshape(4, 4) + dist.get_rank()
    results = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        x_ = x.clone().requires_grad_()
        loss = fn(x_)
        loss.backward()
        results.append((loss.detach(), x_.grad))
    (loss, grad), (compiled_loss, compiled_grad) = results
    return torch.equal(loss, compiled_loss), torch.equal(grad, compiled_grad)


def test_lowered_collectives_compile_into_one_graph():
    # the group is a constant of the call, not ambient state: nothing for dynamo to break on
    assert spawn(2, _compiled_matches_eager) == [(True, True), (True, True)]


def _ops_in_backward_of_gather_regions():
    """What backward runs for sp's gather regions (passes.recompute.save_gathered_as_shards):
    one reader (plain checkpoint) and three readers (gather recomputed, linears kept)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from core.ops import CheckpointedRegion

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    group = Mesh(Plan(tp=2).resolve(2)).group_names()["tp"]
    seen = []
    for readers, recomputed in ((1, ()), (3, (C.gather_for_region,))):
        graph = torch.fx.Graph()
        shard, *params = (graph.placeholder(f"p{i}") for i in range(1 + 2 * readers))
        full = graph.call_function(C.gather_for_region, (shard, group, 1), {"group_size": 2})
        graph.output(tuple(graph.call_function(torch.ops.aten.linear.default, (full, w, b))
                           for w, b in zip(params[::2], params[1::2], strict=True)))
        region = CheckpointedRegion(torch.fx.GraphModule(torch.nn.Module(), graph), recomputed)
        inputs = [torch.randn(2, 3, 4, requires_grad=True)]
        inputs += [torch.randn(*shape, requires_grad=True) for _ in range(readers)
                   for shape in ((5, 4), (5,))]
        outputs = region(*inputs)
        with Record() as record:
            sum(out.sum() for out in outputs).backward()
        seen.append((record.ops.count(C.gather_for_region),
                     record.ops.count(torch.ops.aten.addmm.default)))
    return seen


def test_sp_gather_regions_regather_once_and_run_no_linear_again():
    # forward's linears are addmm (bias); backward's gradients are mm: no addmm in backward
    assert spawn(2, _ops_in_backward_of_gather_regions) == [[(1, 0), (1, 0)]] * 2
