"""MoE token permutation: sort token copies by expert, and the weighted inverse.

Contract
--------
``permute(tokens, expert_ids, num_experts) -> (permuted, row_id_map, group_sizes)``

- ``tokens``: (T, H) float16 / bfloat16 / float32; ``expert_ids``: (T, topk) (or (T,) for
  topk=1) integer tensor with every id in ``[0, num_experts)`` (not checked on CUDA: that would
  sync; ids outside it leave rows of ``permuted`` unwritten).
- ``permuted``: (T * topk, H) in tokens' dtype, the copies grouped by expert in ascending
  order; inside one expert the copies keep token order (a stable sort of the flat
  ``expert_ids``), so the layout matches the reference and is what ``grouped_gemm`` takes.
- ``row_id_map``: int64 (T, topk); ``permuted[row_id_map[t, k]] == tokens[t]`` (copy for the
  k-th choice of token t).
- ``group_sizes``: int64 (num_experts,), copies per expert (zeros allowed).
- Differentiable in ``tokens``: d(tokens)[t] = sum_k d(permuted)[row_id_map[t, k]].

``unpermute(permuted, row_id_map, probs=None) -> out``

- ``out``: (T, H) in permuted's dtype, ``out[t] = sum_k probs[t, k] * permuted[row_id_map[t, k]]``
  (probs None means weight 1, i.e. the plain inverse for topk=1 and a sum otherwise); ``probs``
  (T, topk) any float dtype, accumulation float32.
- Differentiable in ``permuted`` (d(permuted)[row_id_map[t, k]] = probs[t, k] * d(out)[t]) and in
  ``probs`` (d(probs)[t, k] = permuted[row_id_map[t, k]] . d(out)[t]), both from one kernel.

Kernels: the expert sort is a counting sort in two launches of one kernel (one program per
expert counts its copies, a cumsum of those counts gives each expert's first row, then each
program writes its copies' rows in token order), so nothing syncs with the host. Data movement
is one program per token: ``permute`` reads each token row once and writes its topk copies;
``unpermute`` gathers the topk rows and writes the weighted sum (no (T, topk, H) temporary).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_tensors, next_pow2


@triton.jit
def _expert_rows_kernel(
    # pointers: Ids (NUMEL,) flat token-major expert ids; Counts (E,) int64;
    # GroupStart (E,) int64 first row of each expert; RowIdMap (NUMEL,) int64
    Ids, Counts, GroupStart, RowIdMap,
    # sizes
    NUMEL,
    # meta-parameters
    WRITE: tl.constexpr, BLOCK: tl.constexpr,
):
    e = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    if WRITE:
        base = tl.load(GroupStart + e)
    else:
        base = tl.zeros([], dtype=tl.int64)
    count = tl.zeros([], dtype=tl.int64)
    for start in range(0, NUMEL, BLOCK):
        idx = start + offs
        ids = tl.load(Ids + idx, mask=idx < NUMEL, other=-1)
        hit = (ids == e).to(tl.int64)
        if WRITE:
            rank = tl.cumsum(hit, 0) - hit  # copies of expert e before this one in the chunk
            tl.store(RowIdMap + idx, base + count + rank, mask=(idx < NUMEL) & (hit != 0))
        count += tl.sum(hit, 0)
    if not WRITE:
        tl.store(Counts + e, count)


@triton.jit
def _scatter_rows_kernel(
    # pointers: Src (T, H); RowIdMap (T, TOPK) int64 contiguous; Probs (T, TOPK) contiguous or
    # None; Dst (T*TOPK, H); Permuted (T*TOPK, H) and DProbs (T, TOPK) only with DPROBS
    Src, RowIdMap, Probs, Dst, Permuted, DProbs,
    # sizes
    H, TOPK,
    # strides
    stride_src, stride_dst, stride_perm,
    # meta-parameters
    HAS_PROBS: tl.constexpr, DPROBS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # Dst[row_id_map[t, k]] = probs[t, k] * Src[t]; with DPROBS also
    # DProbs[t, k] = Permuted[row_id_map[t, k]] . Src[t]   (unpermute's backward)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    for k in range(0, TOPK):
        dst = tl.load(RowIdMap + t * TOPK + k)
        if HAS_PROBS:
            p = tl.load(Probs + t * TOPK + k).to(tl.float32)
        dot = tl.zeros([BLOCK_H], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + offs
            mask = cols < H
            x = tl.load(Src + t * stride_src + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_PROBS:
                val = x * p
            else:
                val = x
            tl.store(Dst + dst * stride_dst + cols, val.to(Dst.dtype.element_ty), mask=mask)
            if DPROBS:
                y = tl.load(Permuted + dst * stride_perm + cols, mask=mask, other=0.0).to(tl.float32)
                dot += x * y
        if DPROBS:
            tl.store(DProbs + t * TOPK + k, tl.sum(dot, 0).to(DProbs.dtype.element_ty))


@triton.jit
def _gather_rows_kernel(
    # pointers: Src (T*TOPK, H); RowIdMap (T, TOPK) int64 contiguous; Probs (T, TOPK) or None;
    # Out (T, H)
    Src, RowIdMap, Probs, Out,
    # sizes
    H, TOPK,
    # strides
    stride_src, stride_out,
    # meta-parameters
    HAS_PROBS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # Out[t] = sum_k probs[t, k] * Src[row_id_map[t, k]]
    t = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in range(0, TOPK):
        src = tl.load(RowIdMap + t * TOPK + k)
        x = tl.load(Src + src * stride_src + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_PROBS:
            x = x * tl.load(Probs + t * TOPK + k).to(tl.float32)
        acc += x
    tl.store(Out + t * stride_out + cols, acc.to(Out.dtype.element_ty), mask=mask)


def _block_h(H: int) -> int:
    return min(next_pow2(max(H, 1)), 4096)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def expert_row_map(expert_ids: torch.Tensor, num_experts: int):
    """Counting sort of token-major expert ids: (row_id_map (T, topk) int64, group_sizes (E,) int64)."""
    ids = expert_ids.reshape(-1).contiguous()
    numel = ids.numel()
    counts = torch.zeros(num_experts, device=ids.device, dtype=torch.int64)
    row_id_map = torch.empty(numel, device=ids.device, dtype=torch.int64)
    if numel and num_experts:
        block = min(next_pow2(numel), 1024 if ids.is_cuda else 256)
        _expert_rows_kernel[(num_experts,)](ids, counts, counts, row_id_map, numel, WRITE=False, BLOCK=block)
        group_start = torch.cumsum(counts, 0) - counts
        _expert_rows_kernel[(num_experts,)](ids, counts, group_start, row_id_map, numel, WRITE=True, BLOCK=block)
    return row_id_map.view(expert_ids.shape), counts


def _scatter(src, row_id_map, probs, out_rows, permuted=None, dprobs=None):
    T, H = src.shape
    topk = row_id_map.shape[1]
    dst = torch.empty((out_rows, H), device=src.device, dtype=src.dtype)
    if T and H and topk:
        _scatter_rows_kernel[(T,)](
            src, row_id_map, probs, dst, permuted, dprobs,
            H, topk,
            src.stride(0), dst.stride(0), permuted.stride(0) if permuted is not None else 0,
            HAS_PROBS=probs is not None, DPROBS=dprobs is not None, BLOCK_H=_block_h(H),
        )
    return dst


def _gather(src, row_id_map, probs):
    T, topk = row_id_map.shape
    H = src.shape[1]
    out = torch.zeros((T, H), device=src.device, dtype=src.dtype)
    if T and H and topk:
        block = _block_h(H)
        _gather_rows_kernel[(T, triton.cdiv(H, block))](
            src, row_id_map, probs, out, H, topk, src.stride(0), out.stride(0),
            HAS_PROBS=probs is not None, BLOCK_H=block,
        )
    return out


class PermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, expert_ids, num_experts):
        row_id_map, group_sizes = expert_row_map(expert_ids, num_experts)
        permuted = _scatter(_rows(tokens), row_id_map, None, expert_ids.numel())
        ctx.save_for_backward(row_id_map)
        ctx.mark_non_differentiable(row_id_map, group_sizes)
        return permuted, row_id_map, group_sizes

    @staticmethod
    def backward(ctx, dpermuted, _drow_id_map, _dgroup_sizes):
        (row_id_map,) = ctx.saved_tensors
        return _gather(_rows(dpermuted), row_id_map, None), None, None


class UnpermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, permuted, row_id_map, probs):
        permuted = _rows(permuted)
        row_id_map = row_id_map.contiguous()
        probs = probs.contiguous() if probs is not None else None
        ctx.save_for_backward(permuted, row_id_map, probs)
        return _gather(permuted, row_id_map, probs)

    @staticmethod
    def backward(ctx, dout):
        permuted, row_id_map, probs = ctx.saved_tensors
        dout = _rows(dout)
        want_dprobs = probs is not None and ctx.needs_input_grad[2]
        dprobs = torch.empty_like(probs) if want_dprobs else None
        dpermuted = _scatter(dout, row_id_map, probs, permuted.shape[0],
                             permuted=permuted if want_dprobs else None, dprobs=dprobs)
        return dpermuted, None, dprobs


def permute(tokens, expert_ids, num_experts):
    """Sort token copies by expert; returns ``(permuted, row_id_map, group_sizes)`` (see module doc)."""
    if expert_ids.dim() == 1:
        expert_ids = expert_ids[:, None]
    check_tensors("permute", tokens)
    if tokens.dim() != 2 or expert_ids.dim() != 2 or expert_ids.shape[0] != tokens.shape[0]:
        raise ValueError(f"permute: tokens must be (T, H) and expert_ids (T, topk), got "
                         f"{tuple(tokens.shape)} and {tuple(expert_ids.shape)}")
    if expert_ids.dtype.is_floating_point or expert_ids.dtype == torch.bool:
        raise TypeError(f"permute: expert_ids must be an integer tensor, got {expert_ids.dtype}")
    if expert_ids.device != tokens.device:
        raise ValueError(f"permute: expert_ids on {expert_ids.device}, tokens on {tokens.device}")
    if expert_ids.device.type == "cpu" and expert_ids.numel():
        if int(expert_ids.min()) < 0 or int(expert_ids.max()) >= num_experts:
            raise ValueError(f"permute: expert ids must lie in [0, {num_experts})")
    return PermuteFunction.apply(tokens, expert_ids, int(num_experts))


def unpermute(permuted, row_id_map, probs=None):
    """Weighted inverse of ``permute``: ``out[t] = sum_k probs[t, k] * permuted[row_id_map[t, k]]``."""
    check_tensors("unpermute", permuted)
    if permuted.dim() != 2 or row_id_map.dim() != 2:
        raise ValueError(f"unpermute: permuted must be (rows, H) and row_id_map (T, topk), got "
                         f"{tuple(permuted.shape)} and {tuple(row_id_map.shape)}")
    if probs is not None:
        check_tensors("unpermute", permuted, probs)
        if tuple(probs.shape) != tuple(row_id_map.shape):
            raise ValueError(f"unpermute: probs {tuple(probs.shape)} must match row_id_map "
                             f"{tuple(row_id_map.shape)}")
    return UnpermuteFunction.apply(permuted, row_id_map.to(torch.int64), probs)
