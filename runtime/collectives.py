"""What the collective ops declared in `core.ops` do: primitives on a named process group, and
each op's implementation and autograd formula, registered with torch.library at import.

A graph calls `core.ops.all_reduce(x, group)` with `group` the c10d name of the process group
(`passes.lowering.collectives` writes it in place of the mesh dimension; `Mesh.group_names()`
gives it to anyone calling an op directly). The group travels with the call, into backward too,
so nothing is looked up in ambient state: a lowered graph runs the same inside or outside
`torch.compile`, in forward or in a backward that runs long after the step returned.

The primitives are written in `torch.ops._c10d_functional` ops + `wait_tensor`, the form
torch.compile and inductor's collective reordering understand: each op's forward and backward
is already the decomposition a compiled rank would inline. (The graph keeps the ops themselves:
on torch 2.13 `_c10d_functional` nodes carry no gradient in eager autograd, and the graphs run
eagerly.) Each primitive returns a new tensor it owns (never the result of a collective on a
temporary that is then dropped: Megatron's `_reduce` loses its result for non-contiguous
inputs).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from core import ops

_F = torch.ops._c10d_functional


# --- primitives for the runtime's own buffers (data parallel, ZeRO) ---------------------------

def all_gather_into(out: torch.Tensor, x: torch.Tensor, group, async_op: bool = False):
    """`out` (size * x's dim 0) <- every rank's `x`, stacked along dim 0."""
    with warnings.catch_warnings():  # renamed to all_gather_single in torch 2.13; 2.11 lacks it
        warnings.simplefilter("ignore", FutureWarning)
        return dist.all_gather_into_tensor(out, x, group=group, async_op=async_op)


def reduce_scatter_into(out: torch.Tensor, x: torch.Tensor, group, async_op: bool = False):
    """`out` <- the sum over ranks of chunk `rank` of `x` along dim 0."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return dist.reduce_scatter_tensor(out, x, group=group, async_op=async_op)


# --- primitives on a group name: a tensor in, a fresh tensor out ------------------------------

def _size(group: str, group_size: int = 0) -> int:
    return group_size or _resolve_process_group(group).size()


def _all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    return _F.wait_tensor(_F.all_reduce(x, "sum", group))  # all_reduce clones x, contiguous


def _batch_statistic(x: torch.Tensor, group: str, mean: bool) -> torch.Tensor:
    total = _F.wait_tensor(_F.all_reduce(x, "sum", group))  # gloo has no "avg"
    return total / _size(group) if mean else total


def _all_gather(x: torch.Tensor, group: str, size: int, dim: int) -> torch.Tensor:
    out = _F.wait_tensor(_F.all_gather_into_tensor(x.contiguous(), size, group))
    if dim == 0:
        return out
    return torch.cat(out.chunk(size, dim=0), dim=dim)


def _reduce_scatter(x: torch.Tensor, group: str, size: int, dim: int) -> torch.Tensor:
    if x.shape[dim] % size:
        raise ValueError(f"reduce_scatter: dim {dim} of shape {tuple(x.shape)} is not "
                         f"divisible by the group size {size}")
    stacked = torch.cat(x.chunk(size, dim=dim), dim=0) if dim != 0 else x
    # chunk i of `dim` goes to rank i
    return _F.wait_tensor(_F.reduce_scatter_tensor(stacked.contiguous(), "sum", size, group))


def _split(x: torch.Tensor, group: str, size: int, dim: int) -> torch.Tensor:
    if x.shape[dim] % size:
        raise ValueError(f"split: dim {dim} of shape {tuple(x.shape)} is not divisible by "
                         f"the group size {size}")
    return x.chunk(size, dim=dim)[_resolve_process_group(group).rank()].contiguous()


def _all_to_all(x: torch.Tensor, group: str, size: int, scatter_dim: int,
                gather_dim: int) -> torch.Tensor:
    chunks = torch.stack(x.chunk(size, dim=scatter_dim))  # (size, *chunk): row i goes to rank i
    split = [1] * size
    received = _F.wait_tensor(_F.all_to_all_single(chunks, split, split, group))
    return torch.cat(received.unbind(0), dim=gather_dim)


# --- the ops: forward implementations --------------------------------------------------------

FORWARD = {
    ops.all_reduce: _all_reduce,
    ops.batch_statistic: _batch_statistic,
    ops.all_gather: lambda x, group, tensor_dim, *, group_size=0:
        _all_gather(x, group, _size(group, group_size), tensor_dim),
    ops.gather_for_region: lambda x, group, tensor_dim, *, group_size=0:
        _all_gather(x, group, _size(group, group_size), tensor_dim),
    ops.scatter: lambda x, group, tensor_dim, *, group_size=0:
        _split(x, group, _size(group, group_size), tensor_dim),
    ops.reduce_scatter: lambda x, group, tensor_dim, *, group_size=0:
        _reduce_scatter(x, group, _size(group, group_size), tensor_dim),
    ops.all_to_all: lambda x, group, scatter_dim, gather_dim, *, group_size=0:
        _all_to_all(x, group, _size(group, group_size), scatter_dim, gather_dim),
}
"""Each collective op's forward in `_c10d_functional` ops: its implementation, and the
decomposition a compiled graph inlines (runtime.compiled), so inductor sees the collectives
themselves in forward as it does in backward."""

torch.library.impl(ops.copy_to_region._name, "CompositeExplicitAutograd")(
    lambda x, group: x.view_as(x))
for _op, _forward in FORWARD.items():
    torch.library.impl(_op._name, "CompositeExplicitAutograd")(_forward)


# --- the ops: backward, each the conjugate of its forward -----------------------------------

class _CopyToRegion(torch.autograd.Function):
    """f: identity forward (a view: no copy), all-reduce backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


# copy_to_region returns an alias, which register_autograd does not take: its own Function
torch.library.impl(ops.copy_to_region._name, "Autograd")(_CopyToRegion.apply)


def _remember(ctx, inputs, keyword_only_inputs, output) -> None:
    """What every sized op's backward needs: the group, its size and the tensor dims."""
    ctx.group, *ctx.dims = inputs[1:]
    ctx.size = _size(ctx.group, keyword_only_inputs["group_size"])


def _backward(conjugate):
    """Backward of an op of signature (x, group, tensor_dim): `conjugate` on the gradient."""
    def backward(ctx, grad):
        return conjugate(grad, ctx.group, ctx.size, *ctx.dims), None, None
    return backward


torch.library.register_autograd(  # g: all-reduce forward, identity backward
    ops.all_reduce._name, lambda ctx, grad: (grad, None),
    setup_context=lambda ctx, inputs, output: None)
# A statistic over the batch's tokens: every rank's loss reads the reduced value and the
# gradients are summed over the same ranks (the loss is scaled by 1/ranks), so each rank's share
# gets the same reduction of the upstream gradient: sum for a sum, mean for a mean.
def _remember_statistic(ctx, inputs, output) -> None:
    _, ctx.group, ctx.mean = inputs


torch.library.register_autograd(
    ops.batch_statistic._name,
    lambda ctx, grad: (_batch_statistic(grad, ctx.group, ctx.mean), None, None),
    setup_context=_remember_statistic)
for _op, _conjugate in ((ops.all_gather, _split),                # keep our slice
                        (ops.scatter, _all_gather),              # gather every slice
                        (ops.reduce_scatter, _all_gather),
                        (ops.gather_for_region, _reduce_scatter)):
    torch.library.register_autograd(_op._name, _backward(_conjugate), setup_context=_remember)


def _all_to_all_backward(ctx, grad):
    scatter_dim, gather_dim = ctx.dims
    return _all_to_all(grad, ctx.group, ctx.size, gather_dim, scatter_dim), None, None, None


torch.library.register_autograd(ops.all_to_all._name, _all_to_all_backward,
                                setup_context=_remember)

