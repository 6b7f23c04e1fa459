"""Expert parallelism at run time: what `core.ops`' `moe_dispatch`, `moe_return` and
`grouped_mm` do, and their gradients.

The experts of one MoE layer lie evenly over the ep group, rank r holding experts
[r*E/ep, (r+1)*E/ep). A token routed to k experts is copied once per choice; the copies are
sorted by expert (so each rank's share is one contiguous run), the counts are exchanged first
(one small all-to-all: every rank must know how many rows it will receive before it can receive
them, the one device-to-host read the sizes need), then the rows go by one all-to-all with
uneven splits. A rank receives, per source rank, its experts' rows in expert order; they are
regrouped expert-major so that each local expert's rows are one block for the grouped GEMM.
`moe_return` runs the same movement backwards. Each op's gradient is the other movement, so
backward sends exactly what forward sent, the other way.

The grouped GEMM runs every local expert's matmul in one launch of the Triton kernel
(`runtime.kernels.grouped_gemm`, forward and both gradients) on CUDA tensors of 16/32-bit
floats, with the group sizes read on the device (no host sync); elsewhere (CPU, float64) it is a
loop of matmuls, one per local expert (an expert with no rows is an empty matmul, which is
fine).
"""

from __future__ import annotations

import importlib

import torch
from torch.distributed.distributed_c10d import _resolve_process_group

from core import ops
from core.capacity import within_capacity
from runtime.kernels.dispatch import use_triton

_F = torch.ops._c10d_functional


def _group_size(group: str, group_size: int) -> int:
    return group_size or _resolve_process_group(group).size()


def _sorted_by_expert(indices: torch.Tensor, num_experts: int):
    """(order, per_expert): the (token, choice) pairs in expert order (stable, so a token's
    rows keep token order within an expert), and how many pairs each expert gets. Pairs a
    capacity dropped (expert index `num_experts`, core.ops.expert_capacity) are not in `order`:
    they are sent nowhere and come back as zeros."""
    flat = indices.reshape(-1)
    per_expert = torch.bincount(flat, minlength=num_experts + 1)
    order = torch.argsort(flat, stable=True)
    dropped = int(per_expert[num_experts])
    if dropped:
        order = order[:flat.numel() - dropped]
    return order, per_expert[:num_experts]


def _expert_major(counts: torch.Tensor) -> torch.Tensor:
    """For rows laid out source-major by `counts` (sources, experts), the source-major position
    of each row of the expert-major layout (expert by expert, sources in order within one)."""
    flat = counts.reshape(-1)
    source_major_start = (torch.cumsum(flat, 0) - flat).view_as(counts)
    by_expert = counts.t().reshape(-1)
    start = source_major_start.t().reshape(-1)
    expert_major_start = torch.cumsum(by_expert, 0) - by_expert
    rows = int(by_expert.sum())
    return (torch.arange(rows, device=counts.device)
            + torch.repeat_interleave(start - expert_major_start, by_expert, output_size=rows))


def _exchange(rows: torch.Tensor, send: list[int], receive: list[int], group: str) -> torch.Tensor:
    return _F.wait_tensor(_F.all_to_all_single(rows.contiguous(), receive, send, group))


def _send(sorted_rows: torch.Tensor, per_expert: torch.Tensor, counts: torch.Tensor, group: str,
          size: int) -> torch.Tensor:
    """Rows in expert order (global experts) -> this rank's experts' rows, expert-major."""
    if size == 1:
        return sorted_rows
    send = per_expert.view(size, -1).sum(1).tolist()
    received = _exchange(sorted_rows, send, counts.sum(1).tolist(), group)
    return received[_expert_major(counts)]


def _receive(rows: torch.Tensor, per_expert: torch.Tensor, counts: torch.Tensor, group: str,
             size: int) -> torch.Tensor:
    """Inverse of `_send`: this rank's experts' rows, expert-major -> this rank's tokens' rows
    in expert order."""
    if size == 1:
        return rows
    source_major = torch.empty_like(rows)
    source_major[_expert_major(counts)] = rows
    return _exchange(source_major, counts.sum(1).tolist(), per_expert.view(size, -1).sum(1).tolist(),
                     group)


def _unsort(sorted_rows: torch.Tensor, order: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    out = sorted_rows.new_zeros(indices.numel(), sorted_rows.shape[-1])  # dropped pairs: 0
    out[order] = sorted_rows
    return out.view(*indices.shape, sorted_rows.shape[-1])


# --- what the experts received ------------------------------------------------------------

class ReceivedRows:
    """Rows each of this rank's experts received, one list per dispatch since the last `take`:
    the balance users watch. The counts are read on the host by the dispatch anyway."""

    def __init__(self) -> None:
        self._calls: list[list[int]] = []

    def record(self, counts: torch.Tensor) -> None:
        self._calls.append(counts.sum(0).tolist())

    def take(self) -> list[list[int]]:
        calls, self._calls = self._calls, []
        return calls


RECEIVED = ReceivedRows()
"""This process's dispatches (`ParallelModel.step` takes them after each step)."""


# --- dispatch ------------------------------------------------------------------------------

def _dispatch(tokens, indices, group, num_experts, *, group_size=0):
    size = _group_size(group, group_size)
    order, per_expert = _sorted_by_expert(indices, num_experts)
    local = num_experts // size
    if size == 1:
        counts = per_expert.view(1, local)
    else:  # row s: how many rows source rank s sends to each of this rank's experts
        counts = _exchange(per_expert.view(size, local), [1] * size, [1] * size, group)
    rows = _send(tokens[order // indices.shape[-1]], per_expert, counts, group, size)
    RECEIVED.record(counts)
    return rows, counts


def _dispatch_setup(ctx, inputs, keyword_only_inputs, output) -> None:
    tokens, indices, group, num_experts = inputs
    ctx.save_for_backward(indices, output[1])
    ctx.group, ctx.num_experts, ctx.size = group, num_experts, output[1].shape[0]


def _dispatch_backward(ctx, grad_rows, _grad_counts):
    indices, counts = ctx.saved_tensors
    grad = _return(grad_rows, indices, counts, ctx.group, ctx.num_experts, group_size=ctx.size)
    return grad.sum(-2), None, None, None


# --- return --------------------------------------------------------------------------------

def _return(rows, indices, counts, group, num_experts, *, group_size=0):
    size = _group_size(group, group_size)
    order, per_expert = _sorted_by_expert(indices, num_experts)
    return _unsort(_receive(rows, per_expert, counts, group, size), order, indices)


def _return_setup(ctx, inputs, keyword_only_inputs, output) -> None:
    rows, indices, counts, group, num_experts = inputs
    ctx.save_for_backward(indices, counts)
    ctx.group, ctx.num_experts, ctx.size = group, num_experts, counts.shape[0]


def _return_backward(ctx, grad):
    indices, counts = ctx.saved_tensors
    order, per_expert = _sorted_by_expert(indices, ctx.num_experts)
    choices = grad.reshape(-1, grad.shape[-1])
    rows = _send(choices[order], per_expert, counts, ctx.group, ctx.size)
    return rows, None, None, None, None


# --- the experts' GEMMs --------------------------------------------------------------------

def _group_sizes(counts: torch.Tensor) -> list[int]:
    return _size_tensor(counts).tolist()


def _size_tensor(counts: torch.Tensor) -> torch.Tensor:
    return counts.sum(0) if counts.dim() == 2 else counts


def _kernels():
    """The Triton module (its import needs triton: only where the kernel runs). By module
    path: the package's `grouped_gemm` attribute is the function."""
    return importlib.import_module("runtime.kernels.grouped_gemm")


def _grouped_mm(rows, weight, counts):
    if use_triton(rows, weight):
        return _kernels().grouped_gemm_forward(rows, weight, _size_tensor(counts))
    groups = rows.split(_group_sizes(counts))
    if not groups:
        return rows.new_empty(0, weight.shape[-1])
    return torch.cat([group @ weight[e] for e, group in enumerate(groups)])


def _grouped_mm_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad):
    rows, weight, counts = ctx.saved_tensors
    if use_triton(rows, weight):
        grad_rows, grad_weight = _kernels().grouped_gemm_backward(
            rows, weight, _size_tensor(counts), grad, *ctx.needs_input_grad[:2])
        return grad_rows, grad_weight, None
    sizes = _group_sizes(counts)
    grad_rows = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_rows = _grouped_mm(grad, weight.transpose(-1, -2), counts)
    if ctx.needs_input_grad[1]:
        grad_weight = torch.stack([r.t() @ g for r, g in zip(rows.split(sizes), grad.split(sizes))])
    return grad_rows, grad_weight, None


def _expert_capacity(indices, num_experts, capacity):
    kept = within_capacity(indices, num_experts, capacity)
    return torch.where(kept, indices, torch.full_like(indices, num_experts))


torch.library.impl(ops.expert_capacity._name, "CompositeExplicitAutograd")(_expert_capacity)

for _op, _forward, _setup, _backward in (
        (ops.moe_dispatch, _dispatch, _dispatch_setup, _dispatch_backward),
        (ops.moe_return, _return, _return_setup, _return_backward),
        (ops.grouped_mm, _grouped_mm, _grouped_mm_setup, _grouped_mm_backward)):
    torch.library.impl(_op._name, "CompositeExplicitAutograd")(_forward)
    torch.library.register_autograd(_op._name, _backward, setup_context=_setup)
