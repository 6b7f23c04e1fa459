"""Flash attention (tiled online softmax) with log-sum-exp output, GQA and offset causal masks.

Contract
--------
``flash_attention(q, k, v, causal=True, scale=None, *, q_offset=0, k_offset=0) -> (out, lse)``

- ``q``: (batch, heads, seq_q, head_dim); ``k``, ``v``: (batch, kv_heads, seq_k, head_dim) with
  ``heads % kv_heads == 0`` (GQA/MQA: query head ``h`` reads kv head ``h // (heads // kv_heads)``).
  float16, bfloat16 or float32, any strides; ``seq_q != seq_k`` is fine; head_dim any size up to
  256 (it is padded to a power of two inside the kernel and masked).
- ``scale`` None means ``1 / sqrt(head_dim)``.
- ``causal``: query ``i`` (global position ``q_offset + i``) sees key ``j`` (global position
  ``k_offset + j``) iff ``k_offset + j <= q_offset + i``. The offsets are how ring attention
  places one block of queries against another rank's block of keys; without ``causal`` they are
  ignored.
- ``out``: like ``q`` (contiguous, q's dtype). ``lse``: float32 (batch, heads, seq_q), the natural
  log of ``sum_j exp(scale * q_i . k_j + mask_ij)``. A row with no visible key gives ``out = 0``
  and ``lse = -inf`` (and zero gradients).
- Backward recomputes the probabilities from ``lse`` (nothing of size seq_q x seq_k is stored)
  and takes a gradient for ``lse`` as well as for ``out``: with ``D_i = dO_i . O_i`` the score
  gradient is ``dS_ij = P_ij (dP_ij - D_i + dlse_i)``, so ``dlse`` only shifts ``D``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import check_tensors, dot_precision, next_pow2

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------- forward kernel
@triton.jit
def _attn_fwd_kernel(
    # pointers
    Q, K, V, Out, Lse,
    # strides (batch, head, seq, dim); Lse is contiguous (batch, heads, seq_q)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    # sizes
    HEADS, GROUP, SEQ_Q, SEQ_K, HEAD_DIM,
    q_offset, k_offset, qk_scale,  # qk_scale = scale * log2(e): the softmax runs in base 2
    # meta-parameters
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HEADS).to(tl.int64)  # int64 so b * stride_b cannot overflow
    h = pid_bh % HEADS
    kh = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < SEQ_Q
    mask_d = offs_d < HEAD_DIM

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_base = K + b * stride_kb + kh * stride_kh
    v_base = V + b * stride_vb + kh * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi = SEQ_K
    if CAUSAL:
        # last query of this block sees keys up to q_offset + last - k_offset
        hi = tl.minimum(SEQ_K, q_offset + (pid_m + 1) * BLOCK_M - k_offset)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < SEQ_K
        kt = tl.load(
            k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=mask_d[:, None] & mask_n[None, :], other=0.0,
        )  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        visible = mask_n[None, :]
        if CAUSAL:
            visible = visible & ((k_offset + cols[None, :]) <= (q_offset + offs_m[:, None]))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no key yet keeps m = -inf; subtract 0 instead to avoid inf - inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=mask_n[:, None] & mask_d[None, :], other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(Lse + pid_bh * SEQ_Q + offs_m, lse, mask=mask_m)


# ----------------------------------------------------------------------------- backward kernels
@triton.jit
def _attn_bwd_preprocess_kernel(
    # pointers: Out, dOut contiguous (batch*heads*seq_q, head_dim); dLse, Delta (batch*heads*seq_q)
    Out, DOut, DLse, Delta,
    # sizes
    ROWS, HEAD_DIM,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < ROWS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOut + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    dlse = tl.load(DLse + offs_m, mask=offs_m < ROWS, other=0.0)
    tl.store(Delta + offs_m, tl.sum(o * do, 1) - dlse, mask=offs_m < ROWS)


@triton.jit
def _attn_bwd_dkdv_kernel(
    # pointers; dO is contiguous like Out, Lse/Delta contiguous (batch, heads, seq_q)
    Q, K, V, DO, Lse, Delta, DK, DV,
    # strides
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,  # DK and DV share these (both contiguous)
    # sizes
    HEADS, KV_HEADS, GROUP, SEQ_Q, SEQ_K, HEAD_DIM,
    q_offset, k_offset, qk_scale, sm_scale,
    # meta-parameters
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # one program owns a block of keys of one kv head and sums over every query head of its group
    pid_n = tl.program_id(0)
    pid_bkh = tl.program_id(1)
    b = (pid_bkh // KV_HEADS).to(tl.int64)
    kh = pid_bkh % KV_HEADS

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < SEQ_K
    mask_d = offs_d < HEAD_DIM
    mask_nd = mask_n[:, None] & mask_d[None, :]

    k = tl.load(K + b * stride_kb + kh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=mask_nd, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + b * stride_vb + kh * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=mask_nd, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    lo = 0
    if CAUSAL:
        # first query that sees the first key of this block, rounded down to a query block
        lo = tl.maximum(k_offset + pid_n * BLOCK_N - q_offset, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    for g in range(0, GROUP):
        h = kh * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        row_base = (b * HEADS + h) * SEQ_Q
        for start_m in range(lo, SEQ_Q, BLOCK_M):
            offs_m = start_m + offs_m0
            mask_m = offs_m < SEQ_Q
            qt = tl.load(q_base + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd,
                         mask=mask_d[:, None] & mask_m[None, :], other=0.0)  # (BLOCK_D, BLOCK_M)
            lse = tl.load(Lse + row_base + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
            lse = tl.where(lse == float("-inf"), 0.0, lse)  # empty rows: every score is masked
            st = tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
            visible = mask_n[:, None] & mask_m[None, :]
            if CAUSAL:
                visible = visible & ((k_offset + offs_n[:, None]) <= (q_offset + offs_m[None, :]))
            pt = tl.where(visible, tl.math.exp2(st - lse[None, :]), 0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                         mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
            delta = tl.load(Delta + row_base + offs_m, mask=mask_m, other=0.0)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PRECISION)

    dk = dk * sm_scale
    out_off = b * stride_dkb + kh * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit
def _attn_bwd_dq_kernel(
    # pointers
    Q, K, V, DO, Lse, Delta, DQ,
    # strides
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    # sizes
    HEADS, GROUP, SEQ_Q, SEQ_K, HEAD_DIM,
    q_offset, k_offset, qk_scale, sm_scale,
    # meta-parameters
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HEADS).to(tl.int64)  # int64 so b * stride_b cannot overflow
    h = pid_bh % HEADS
    kh = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < SEQ_Q
    mask_d = offs_d < HEAD_DIM
    mask_md = mask_m[:, None] & mask_d[None, :]

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=mask_md, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask_md, other=0.0)
    lse = tl.load(Lse + pid_bh * SEQ_Q + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(Delta + pid_bh * SEQ_Q + offs_m, mask=mask_m, other=0.0)
    k_base = K + b * stride_kb + kh * stride_kh
    v_base = V + b * stride_vb + kh * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi = SEQ_K
    if CAUSAL:
        hi = tl.minimum(SEQ_K, q_offset + (pid_m + 1) * BLOCK_M - k_offset)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < SEQ_K
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=mask_d[:, None] & mask_n[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
        vt = tl.load(v_base + cols[None, :] * stride_vn + offs_d[:, None] * stride_vd,
                     mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        visible = mask_m[:, None] & mask_n[None, :]
        if CAUSAL:
            visible = visible & ((k_offset + cols[None, :]) <= (q_offset + offs_m[:, None]))
        p = tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)

    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=mask_md)


# ----------------------------------------------------------------------------- launchers
def _blocks(device: torch.device, block_d: int, kind: str) -> dict:
    """Tile sizes and launch options (fixed, not autotuned). Small tiles under the interpreter
    so that tests cross block edges; on CUDA, smaller tiles as head_dim grows so the fp32
    accumulators stay in registers."""
    if device.type != "cuda":
        return dict(BLOCK_M=16 if kind == "dkdv" else 32, BLOCK_N=32 if kind == "dkdv" else 16)
    if block_d <= 64:
        table = dict(fwd=(128, 128, 4, 4), dkdv=(32, 128, 4, 2), dq=(128, 32, 4, 2))
    elif block_d <= 128:
        table = dict(fwd=(128, 64, 8, 3), dkdv=(32, 64, 8, 2), dq=(64, 32, 8, 2))
    else:
        table = dict(fwd=(64, 32, 8, 2), dkdv=(16, 32, 8, 1), dq=(32, 16, 8, 1))
    bm, bn, warps, stages = table[kind]
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)


def _check(q, k, v):
    check_tensors("flash_attention", q, k, v)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_attention: q, k, v must be (batch, heads, seq, head_dim), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"flash_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    B, H, _, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"flash_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must be "
                         f"(batch={B}, kv_heads, seq_k, head_dim={D})")
    if k.shape[1] == 0 or H % k.shape[1] != 0:
        raise ValueError(f"flash_attention: heads ({H}) must be a multiple of kv_heads ({k.shape[1]})")
    if D > 256:
        raise ValueError(f"flash_attention: head_dim {D} > 256 is not supported by the kernel")
    if B * H > 65535:  # the grid's second axis
        raise ValueError(f"flash_attention: batch * heads = {B * H} > 65535; split the batch")


def _forward(q, k, v, causal, scale, q_offset, k_offset):
    B, H, Sq, D = q.shape
    KH, Sk = k.shape[1], k.shape[2]
    out = torch.empty((B, H, Sq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Sq), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out.zero_(), lse
    block_d = max(16, next_pow2(D))
    cfg = _blocks(q.device, block_d, "fwd")
    grid = (triton.cdiv(Sq, cfg["BLOCK_M"]), B * H)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, H // KH, Sq, Sk, D,
        int(q_offset), int(k_offset), float(scale) * LOG2E,
        CAUSAL=bool(causal), BLOCK_D=block_d, DOT_PRECISION=dot_precision(q.dtype), **cfg,
    )
    return out, lse


def _backward(q, k, v, out, lse, dout, dlse, causal, scale, q_offset, k_offset):
    B, H, Sq, D = q.shape
    KH, Sk = k.shape[1], k.shape[2]
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
    dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
    dv = torch.zeros_like(v, memory_format=torch.contiguous_format)
    if q.numel() == 0 or k.numel() == 0:
        return dq, dk, dv
    block_d = max(16, next_pow2(D))
    dout = dout.contiguous()
    dlse = dlse.contiguous().to(torch.float32)
    delta = torch.empty_like(lse)
    rows = B * H * Sq
    _attn_bwd_preprocess_kernel[(triton.cdiv(rows, 64),)](
        out, dout, dlse, delta, rows, D, BLOCK_M=64, BLOCK_D=block_d,
    )
    common = dict(CAUSAL=bool(causal), BLOCK_D=block_d, DOT_PRECISION=dot_precision(q.dtype))
    cfg = _blocks(q.device, block_d, "dkdv")
    _attn_bwd_dkdv_kernel[(triton.cdiv(Sk, cfg["BLOCK_N"]), B * KH)](
        q, k, v, dout, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(),
        H, KH, H // KH, Sq, Sk, D,
        int(q_offset), int(k_offset), float(scale) * LOG2E, float(scale),
        **common, **cfg,
    )
    cfg = _blocks(q.device, block_d, "dq")
    _attn_bwd_dq_kernel[(triton.cdiv(Sq, cfg["BLOCK_M"]), B * H)](
        q, k, v, dout, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
        H, H // KH, Sq, Sk, D,
        int(q_offset), int(k_offset), float(scale) * LOG2E, float(scale),
        **common, **cfg,
    )
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """(q, k, v) -> (out, lse); backward takes d(out) and d(lse), either may be None."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, q_offset, k_offset):
        out, lse = _forward(q, k, v, causal, scale, q_offset, k_offset)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, scale, q_offset, k_offset)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        if dlse is None:
            dlse = torch.zeros_like(lse)
        dq, dk, dv = _backward(q, k, v, out, lse, dout, dlse, *ctx.args)
        return dq, dk, dv, None, None, None, None


def flash_attention(q, k, v, causal=True, scale=None, *, q_offset=0, k_offset=0):
    """Attention over (batch, heads, seq, head_dim) tensors; returns ``(out, lse)``.

    Forward: ``out = softmax(scale * q k^T + mask) v`` and ``lse = logsumexp(scale * q k^T + mask)``
    (float32, natural log); see the module docstring for GQA, offsets and empty rows.
    Backward: gradients for q, k, v from both ``out`` and ``lse``.
    """
    _check(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return FlashAttentionFunction.apply(q, k, v, bool(causal), float(scale), int(q_offset), int(k_offset))
