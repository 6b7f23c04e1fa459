"""runtime/async_tp.py: the ring-decomposed ops against their plain composition
(gather_for_region then linear; linear then reduce_scatter), forward and every gradient, on
gloo ranks (float64), for tp=2 and tp=4, gathering along the sequence dim and dim 0, with an
output nobody reads and an input that needs no gradient; and copy_matmul (a column entry with
its linears, the gradient all-reduce overlapping the weight gradients) against copy_to_region
then linear."""

from __future__ import annotations

import torch

from ranks import on_ranks


def _compare(dim: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _get_process_group_name

    import runtime  # noqa: F401 - registers the ops
    from core import ops

    group = _get_process_group_name(dist.group.WORLD)
    size, rank = dist.get_world_size(), dist.get_rank()
    f64 = torch.float64
    shape = [2, 3, 6]
    shape[dim] *= size
    torch.manual_seed(rank)  # each rank its own shard, weights and partial sums
    errors = {}

    # all_gather_matmul: three weights, one with a bias, the third output unread
    x = torch.randn(*shape, dtype=f64).chunk(size, dim)[0].clone().requires_grad_()
    weights = [torch.randn(5, 6, dtype=f64, requires_grad=True) for _ in range(3)]
    bias = torch.randn(5, dtype=f64, requires_grad=True)
    ours = ops.all_gather_matmul(x, weights, [bias, None, None], group, dim, group_size=size)
    ref_in = [t.detach().clone().requires_grad_() for t in (x, *weights, bias)]
    gathered = ops.gather_for_region(ref_in[0], group, dim, group_size=size)
    plain = [torch.nn.functional.linear(gathered, ref_in[1], ref_in[4]),
             torch.nn.functional.linear(gathered, ref_in[2]),
             torch.nn.functional.linear(gathered, ref_in[3])]
    grads = [torch.randn_like(plain[0]), torch.randn_like(plain[1])]
    torch.autograd.backward(ours[:2], grads)
    torch.autograd.backward(plain[:2], grads)
    errors["gather fwd"] = max((a - b).abs().max().item() for a, b in zip(ours, plain))
    errors["gather grads"] = max((a.grad - b.grad).abs().max().item()
                                 for a, b in zip((x, *weights[:2], bias), ref_in[:3] + ref_in[4:]))
    assert ref_in[3].grad is None  # torch leaves it unset; the fused op's backward gives zeros
    errors["unread weight grad"] = weights[2].grad.abs().max().item()

    # matmul_reduce_scatter: x's gradient not needed
    y = torch.randn(*shape, dtype=f64)
    w = torch.randn(4, 6, dtype=f64, requires_grad=True)
    out = ops.matmul_reduce_scatter(y, w, group, dim, group_size=size)
    w_ref = w.detach().clone().requires_grad_()
    ref = ops.reduce_scatter(torch.nn.functional.linear(y, w_ref), group, dim, group_size=size)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    errors["scatter fwd"] = (out - ref).abs().max().item()
    errors["scatter weight grad"] = (w.grad - w_ref.grad).abs().max().item()
    y2 = y.clone().requires_grad_()
    ops.matmul_reduce_scatter(y2, w.detach(), group, dim, group_size=size).backward(grad)
    y_ref = y.clone().requires_grad_()
    ops.reduce_scatter(torch.nn.functional.linear(y_ref, w.detach()), group, dim,
                       group_size=size).backward(grad)
    errors["scatter input grad"] = (y2.grad - y_ref.grad).abs().max().item()
    # copy_matmul: linears forward; the input gradient all-reduced (overlapping the weights')
    xc = torch.randn(*shape, dtype=f64, requires_grad=True)
    copied = ops.copy_matmul(xc, weights[:2], [bias, None], group)
    ref_c = [t.detach().clone().requires_grad_() for t in (xc, weights[0], weights[1], bias)]
    entered = ops.copy_to_region(ref_c[0], group)
    plain_c = [torch.nn.functional.linear(entered, ref_c[1], ref_c[3]),
               torch.nn.functional.linear(entered, ref_c[2])]
    grads_c = [torch.randn_like(plain_c[0]), torch.randn_like(plain_c[1])]
    for w in (*weights, bias):
        w.grad = None
    torch.autograd.backward(copied, grads_c)
    torch.autograd.backward(plain_c, grads_c)
    errors["copy fwd"] = max((a - b).abs().max().item() for a, b in zip(copied, plain_c))
    errors["copy grads"] = max((a.grad - b.grad).abs().max().item()
                               for a, b in zip((xc, weights[0], weights[1], bias), ref_c))
    with torch.no_grad():  # forward-only calls take the plain loops
        again = ops.all_gather_matmul(x, weights, [bias, None, None], group, dim,
                                      group_size=size)
    errors["no_grad fwd"] = (again[0] - plain[0]).abs().max().item()
    return errors


def _both_dims():
    return {dim: _compare(dim) for dim in (1, 0)}


def test_ring_ops_equal_their_plain_composition():
    for world in (2, 4):
        for by_dim in on_ranks(world, _both_dims, timeout=240):
            for dim, errors in by_dim.items():
                assert errors["unread weight grad"] == 0.0, (world, dim)
                bad = {name: e for name, e in errors.items() if e > 1e-12}
                assert not bad, (world, dim, bad)
