"""Cross-entropy over logits sharded along the vocabulary, without gathering them.

Megatron-Core's `vocab_parallel_cross_entropy`: rank r of the group holds columns
[r*Vl, (r+1)*Vl) of the (padded) vocabulary. Per token, the loss needs three numbers that are
reductions over the whole vocabulary, and each is a reduction of per-rank partials:

    m   = max_c z_c                      all-reduce MAX of the local maxima
    s   = sum_c exp(z_c - m)             all-reduce SUM  \
    z_t = z_target - m                   all-reduce SUM   } one all-reduce, stacked
    a   = sum_c (z_c - m)                all-reduce SUM  /  (label smoothing's mean log-prob)

    nll = log s - z_t                    -log p_target
    sum_c log p_c = a - V log s

Padded columns (zero rows appended so tp divides the vocabulary) take part in none of them.
Backward is local, with no communication: d nll / dz = softmax - onehot(target) and
d(sum_c log p_c)/dz = 1 - V softmax, on this rank's columns.

Three layers, as in runtime/collectives.py: the autograd Function, the two functions graphs call
(`vocab_parallel_log_softmax_stats`, `reduce_nll`: partitioner.loss_trace puts them in place of
`log_softmax` + `nll_loss` in a traced loss), and the public `vocab_parallel_cross_entropy`,
which has `F.cross_entropy`'s semantics for class-index targets.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from torch.distributed.distributed_c10d import _resolve_process_group

REDUCTIONS = ("none", "mean", "sum")
"""aten's reduction enum order: nll_loss's `reduction` argument indexes this tuple."""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # exp/sum over a vocabulary in 16 bits loses the loss; Megatron upcasts to float32 too
    return torch.float64 if dtype == torch.float64 else torch.float32


class _VocabParallelLogSoftmax(torch.autograd.Function):
    """(local logits (N, Vl), targets (N,)) -> per token (-log p_target, sum_c log p_c).

    Targets outside this rank's columns (other ranks', ignore_index, anything out of range)
    contribute nothing here; callers mask the tokens they ignore.
    """

    @staticmethod
    def forward(ctx, logits, target, group, rank, vocab_size):
        width = logits.shape[-1]
        start = rank * width
        real = max(0, min(width, vocab_size - start))  # this shard's columns that are not padding
        x = logits.narrow(-1, 0, real).to(_compute_dtype(logits.dtype))  # (N, real)
        tokens = x.shape[0]
        if real:
            local_max = x.amax(dim=-1)
        else:  # a shard of padding only: the other ranks hold every real column
            local_max = torch.full((tokens,), float("-inf"), dtype=x.dtype, device=x.device)
        if group is not None:
            dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
        shifted = x - local_max.unsqueeze(-1)  # (N, real); <= 0
        exp = shifted.exp()
        mine = (target >= start) & (target < start + real)
        column = (target - start).clamp(0, max(real - 1, 0))
        partials = torch.stack([
            exp.sum(dim=-1),
            (shifted.gather(-1, column.unsqueeze(-1)).squeeze(-1) * mine if real
             else torch.zeros_like(local_max)),
            shifted.sum(dim=-1),
        ])  # (3, N): sum-exp, target logit, logit sum; one all-reduce for all three
        if group is not None:
            dist.all_reduce(partials, group=group)
        sum_exp, target_logit, logit_sum = partials.unbind(0)
        log_sum_exp = sum_exp.log()
        nll = log_sum_exp - target_logit
        sum_log_prob = logit_sum - vocab_size * log_sum_exp
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), column, mine)
        ctx.shape, ctx.dtype, ctx.vocab_size = logits.shape, logits.dtype, vocab_size
        ctx.set_materialize_grads(False)  # an unused output costs no backward work
        return nll.to(logits.dtype), sum_log_prob.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_nll, grad_sum):
        softmax, column, mine = ctx.saved_tensors
        coef = torch.zeros(softmax.shape[0], dtype=softmax.dtype, device=softmax.device)
        if grad_nll is not None:
            coef = coef + grad_nll.to(softmax.dtype)
        if grad_sum is not None:
            coef = coef - ctx.vocab_size * grad_sum.to(softmax.dtype)
        grad = softmax * coef.unsqueeze(-1)  # (N, real)
        if grad_nll is not None and grad.shape[-1]:
            hit = (grad_nll.to(grad.dtype) * mine).unsqueeze(-1)
            grad.scatter_add_(-1, column.unsqueeze(-1), -hit)
        if grad_sum is not None:
            grad += grad_sum.to(grad.dtype).unsqueeze(-1)
        if grad.shape[-1] != ctx.shape[-1]:  # padded columns get no gradient
            full = grad.new_zeros(ctx.shape)
            full.narrow(-1, 0, grad.shape[-1]).copy_(grad)
            grad = full
        return grad.to(ctx.dtype), None, None, None, None


def _shard_of(group: str | None):
    """(process group or None, this rank's index in it) of the group named `group`."""
    if group is None:
        return None, 0
    process_group = _resolve_process_group(group)
    return process_group, process_group.rank()


def vocab_parallel_log_softmax_stats(local_logits: torch.Tensor, target: torch.Tensor | None,
                                     group: str | None, vocab_dim: int, vocab_size: int):
    """Per token, (-log p[target], sum over the vocabulary of log p), from this rank's shard.

    `local_logits` holds this rank's columns of the padded vocabulary along `vocab_dim`, this
    rank's index in `group` (a c10d group name; None: a group of one) saying which;
    `target` (the logits' shape without `vocab_dim`, or None when only the sum is wanted) holds
    global class indices. Both results have the target's shape and the logits' dtype; the first
    is meaningless for targets outside [0, vocab_size) (ignored ones), which `reduce_nll` masks.
    Forward: two all-reduces over `group` (max, then sum-exp/target/sum stacked). Backward:
    local, no communication.
    """
    x = local_logits.movedim(vocab_dim, -1)
    tokens = x.shape[:-1]
    if target is None:
        target = torch.zeros(tokens, dtype=torch.long, device=x.device)
    if tuple(target.shape) != tuple(tokens):
        raise ValueError(f"vocab-parallel cross-entropy: target shape {tuple(target.shape)} does "
                         f"not match the logits' token dims {tuple(tokens)}")
    process_group, rank = _shard_of(group)
    nll, sum_log_prob = _VocabParallelLogSoftmax.apply(
        x.reshape(-1, x.shape[-1]), target.reshape(-1), process_group, rank, vocab_size)
    return nll.reshape(tokens), sum_log_prob.reshape(tokens)


def reduce_nll(nll: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str,
               vocab_size: int) -> torch.Tensor:
    """`nll_loss`'s masking and reduction of per-token losses: ignored tokens count zero and
    "mean" divides by the tokens not ignored (NaN when there are none, as nll_loss gives)."""
    valid = target != ignore_index
    # nll_loss rejects an out-of-range class; asynchronously on CUDA, as nll_loss does there
    torch._assert_async(((target >= 0) & (target < vocab_size) | ~valid).all(),
                        "vocab-parallel cross-entropy: a target is outside [0, vocab_size)")
    loss = nll.masked_fill(~valid, 0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / valid.sum()
    raise ValueError(f"reduction {reduction!r}: choose one of {REDUCTIONS}")


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, target: torch.Tensor,
                                 group: str | None = None, *, vocab_size: int,
                                 ignore_index: int = -100, reduction: str = "mean",
                                 label_smoothing: float = 0.0) -> torch.Tensor:
    """`F.cross_entropy(full_logits, target, ...)` from this rank's vocabulary shard.

    `local_logits` (..., Vl) holds columns [r*Vl, (r+1)*Vl) of the padded vocabulary, r being
    this rank's index in `group` (a c10d group name, e.g. `Mesh.group_names()["tp"]`; None: a
    group of one; columns >= vocab_size are padding and ignored); `target` (...) holds class
    indices. Every rank of the group returns the same loss.
    Forward: two all-reduces over `group`. Backward: this shard's gradient, locally.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r}: choose one of {REDUCTIONS}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1]")
    nll, sum_log_prob = vocab_parallel_log_softmax_stats(local_logits, target, group, -1,
                                                         vocab_size)
    if label_smoothing:  # F.cross_entropy: (1-e) nll + e * mean over classes of -log p
        nll = (1 - label_smoothing) * nll - (label_smoothing / vocab_size) * sum_log_prob
    return reduce_nll(nll, target, ignore_index, reduction, vocab_size)
