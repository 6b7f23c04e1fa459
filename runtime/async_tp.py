"""What the async-TP ops of `core.ops` do (plan `async_tp=on`): sp's all-gather before the
column-parallel linears and its reduce-scatter after a row-parallel linear, each decomposed into
`size` steps of a ring of point-to-point transfers, each step's matmuls computed while the next
step's chunk travels (torch's micro-pipeline TP `fused_all_gather_matmul` /
`fused_matmul_reduce_scatter`, Megatron's `tp_comm_overlap`). Registered at import.

The ring: rank r sends to r+1 and receives from r-1 (ranks of the group). Chunk c is the c-th
of `size` equal slices along the sequence dim, rank c's shard.

    all_gather_matmul      forward  step k: out_i[chunk r-k] = linear(chunk r-k, w_i, b_i)
                                    while chunk r-k travels to r+1
                           backward step k: the partial input gradient of chunk r-k-1 added
                                    to what came from r-1 and sent on (a reduce-scatter), and
                                    the weight gradients of the chunk r-k of x (re-gathered
                                    through the same ring: only the shard is kept)
    matmul_reduce_scatter  forward  step k: partial of chunk r-k-1 = linear(x[chunk], w) +
                                    what came from r-1, sent on; the last is our own chunk
                           backward the output gradient all-gathered through the ring, each
                                    chunk's input and weight gradients computed as it arrives

Each is the conjugate of the other, as Megatron's f/g pairs: the gather's backward is a
reduce-scatter and the reduce-scatter's backward a gather. Sums run in ring order (rank r-1's
partial first), which is not the order of gloo's reduce-scatter: equal within rounding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from core import ops
from runtime.ring import Ring, wait


def _ring(group: str) -> Ring:
    """The ring of the named process group the collective op carries."""
    return Ring(_resolve_process_group(group))


def _chunk(x: torch.Tensor, dim: int, size: int, index: int) -> torch.Tensor:
    return x.narrow(dim, index * (x.shape[dim] // size), x.shape[dim] // size)


def _weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d(linear(x, w))/dw for the tokens of `x`: grad^T @ x over every leading dim."""
    return grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


# --- the ring loops ------------------------------------------------------------------------

def gather_matmul(x: torch.Tensor, weights, biases, ring: Ring, dim: int) -> list[torch.Tensor]:
    """[linear(all-gather of x along dim, w, b)]: chunk k's matmuls overlap chunk k+1's trip."""
    size, rank = ring.size, ring.rank
    parts = [[None] * size for _ in weights]
    current = x.contiguous()
    for step in range(size):
        source = (rank - step) % size  # whose shard `current` is
        works, received = ring.shift(current) if step < size - 1 else ([], [None])
        for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
            parts[i][source] = torch.nn.functional.linear(current, w, b)
        wait(works)
        current = received[0]
    return [torch.cat(chunks, dim=dim) for chunks in parts]


def matmul_scatter(x: torch.Tensor, weight: torch.Tensor, ring: Ring, dim: int) -> torch.Tensor:
    """Reduce-scatter of linear(x, weight) along dim: the partial sum of the chunk sent at step k
    is computed while step k-1's travels."""
    size, rank = ring.size, ring.rank
    if x.shape[dim] % size:
        raise ValueError(f"matmul_reduce_scatter: dim {dim} of shape {tuple(x.shape)} is not "
                         f"divisible by the group size {size}")
    works, received = [], [None]
    for step in range(size):
        target = (rank - step - 1) % size  # the chunk this step's partial sum belongs to
        partial = torch.nn.functional.linear(_chunk(x, dim, size, target), weight)
        wait(works)
        if step:
            partial = partial + received[0]
        if step == size - 1:
            return partial.contiguous()
        works, received = ring.shift(partial.contiguous())
    raise AssertionError("unreachable")


def gather_matmul_backward(grads, x, weights, ring: Ring, dim: int, need_x: bool,
                           need_w: list[bool]):
    """The input gradient reduce-scattered and the weight gradients over the re-gathered x, both
    rings advancing together: step k adds this rank's partial of chunk r-k-1 (computed while
    step k-1's transfers run) to the sum from r-1 and sends it on with chunk r-k of x, whose
    weight-gradient matmuls run while both travel."""
    size, rank = ring.size, ring.rank
    grad_w = [torch.zeros_like(w) if need else None for w, need in zip(weights, need_w,
                                                                        strict=True)]
    shard, partial = x.contiguous(), None
    works, received = [], []
    for step in range(size):
        target = (rank - step - 1) % size  # the chunk of the input gradient summed this step
        source = (rank - step) % size  # whose shard of x `shard` is, once received
        if need_x:
            partial = sum(_chunk(grad, dim, size, target) @ w
                          for grad, w in zip(grads, weights, strict=True))
        wait(works)
        if step:
            *summed, shard = received
            if need_x:
                partial = partial + summed[0]
        if step < size - 1:
            sends = ((partial.contiguous(),) if need_x else ()) + (shard,)
            works, received = ring.shift(*sends)
        for i, grad in enumerate(grads):
            if grad_w[i] is not None:
                grad_w[i] += _weight_grad(_chunk(grad, dim, size, source), shard)
    return (partial.contiguous() if need_x else None), grad_w


def scatter_matmul_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            ring: Ring, dim: int, need_x: bool, need_w: bool):
    """The output gradient gathered through the ring; each chunk's input gradient (its slice of
    x's gradient) and weight gradient computed as it arrives."""
    size, rank = ring.size, ring.rank
    grad_x = [None] * size
    grad_w = torch.zeros_like(weight) if need_w else None
    current = grad.contiguous()
    for step in range(size):
        source = (rank - step) % size  # whose output chunk `current` is
        works, received = ring.shift(current) if step < size - 1 else ([], [None])
        if need_x:
            grad_x[source] = current @ weight
        if need_w:
            grad_w += _weight_grad(current, _chunk(x, dim, size, source))
        wait(works)
        current = received[0]
    return (torch.cat(grad_x, dim=dim) if need_x else None), grad_w


# --- autograd ------------------------------------------------------------------------------

class _AllGatherMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, dim, count, with_bias, x, *params):
        weights, biases = params[:count], _biases(params[count:], with_bias)
        ctx.ring, ctx.dim, ctx.count, ctx.with_bias = _ring(group), dim, count, with_bias
        ctx.save_for_backward(x, *weights)  # the shard: x is gathered again in backward
        return tuple(gather_matmul(x, weights, biases, ctx.ring, dim))

    @staticmethod
    def backward(ctx, *grads):  # (an unused output's gradient comes as zeros)
        x, *weights = ctx.saved_tensors
        need_x, need = ctx.needs_input_grad[4], ctx.needs_input_grad[5:]
        grad_x, grad_w = gather_matmul_backward(grads, x, weights, ctx.ring, ctx.dim, need_x,
                                                list(need[:ctx.count]))
        bias_needs = iter(need[ctx.count:])
        grad_b = [g.reshape(-1, g.shape[-1]).sum(0) if next(bias_needs) else None
                  for g, has in zip(grads, ctx.with_bias, strict=True) if has]
        return (None, None, None, None, grad_x, *grad_w, *grad_b)


def _biases(present, with_bias):
    present = iter(present)
    return [next(present) if has else None for has in with_bias]


def _all_gather_matmul(x, weights, biases, group, gather_dim, *, group_size=0):
    with_bias = tuple(b is not None for b in biases)
    return list(_AllGatherMatmul.apply(group, gather_dim, len(weights), with_bias, x, *weights,
                                       *(b for b in biases if b is not None)))


class _MatmulReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, dim, x, weight):
        ctx.ring, ctx.dim = _ring(group), dim
        ctx.save_for_backward(x, weight)
        return matmul_scatter(x, weight, ctx.ring, dim)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x, grad_w = scatter_matmul_backward(grad, x, weight, ctx.ring, ctx.dim,
                                                 ctx.needs_input_grad[2],
                                                 ctx.needs_input_grad[3])
        return None, None, grad_x, grad_w


class _CopyMatmul(torch.autograd.Function):
    """Linears on a column region's input; backward all-reduces the input gradient while the
    weight gradients are computed."""

    @staticmethod
    def forward(ctx, group, count, with_bias, x, *params):
        weights, biases = params[:count], _biases(params[count:], with_bias)
        ctx.group, ctx.count, ctx.with_bias = group, count, with_bias
        ctx.save_for_backward(x, *weights)
        return tuple(torch.nn.functional.linear(x, w, b)
                     for w, b in zip(weights, biases, strict=True))

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        need_x, need = ctx.needs_input_grad[3], ctx.needs_input_grad[4:]
        grad_x, work = None, None
        if need_x:
            grad_x = sum(grad @ w for grad, w in zip(grads, weights, strict=True))
            work = dist.all_reduce(grad_x, group=_resolve_process_group(ctx.group),
                                   async_op=True)  # on a tensor we own and return
        grad_w = [_weight_grad(grad, x) if need[i] else None for i, grad in enumerate(grads)]
        bias_needs = iter(need[ctx.count:])
        grad_b = [g.reshape(-1, g.shape[-1]).sum(0) if next(bias_needs) else None
                  for g, has in zip(grads, ctx.with_bias, strict=True) if has]
        if work is not None:
            work.wait()
        return (None, None, None, grad_x, *grad_w, *grad_b)


def _copy_matmul(x, weights, biases, group):
    with_bias = tuple(b is not None for b in biases)
    return list(_CopyMatmul.apply(group, len(weights), with_bias, x, *weights,
                                  *(b for b in biases if b is not None)))


def _matmul_reduce_scatter(x, weight, group, scatter_dim, *, group_size=0):
    return _MatmulReduceScatter.apply(group, scatter_dim, x, weight)


def _all_gather_matmul_plain(x, weights, biases, group, gather_dim, *, group_size=0):
    with torch.no_grad():
        return gather_matmul(x, list(weights), list(biases), _ring(group), gather_dim)


def _matmul_reduce_scatter_plain(x, weight, group, scatter_dim, *, group_size=0):
    return matmul_scatter(x, weight, _ring(group), scatter_dim)


# the Function on the Autograd key (as copy_to_region's), the plain loops below it
torch.library.impl(ops.all_gather_matmul._name, "Autograd")(_all_gather_matmul)
torch.library.impl(ops.matmul_reduce_scatter._name, "Autograd")(_matmul_reduce_scatter)
torch.library.impl(ops.copy_matmul._name, "Autograd")(_copy_matmul)
torch.library.impl(ops.copy_matmul._name, "CompositeExplicitAutograd")(
    lambda x, weights, biases, group: [torch.nn.functional.linear(x, w, b)
                                       for w, b in zip(weights, biases, strict=True)])
torch.library.impl(ops.all_gather_matmul._name, "CompositeExplicitAutograd")(
    _all_gather_matmul_plain)
torch.library.impl(ops.matmul_reduce_scatter._name, "CompositeExplicitAutograd")(
    _matmul_reduce_scatter_plain)
