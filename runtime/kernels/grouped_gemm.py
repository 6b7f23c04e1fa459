"""Grouped GEMM for MoE experts: every expert's matmul in one launch.

Contract
--------
``grouped_gemm(x, w, group_sizes) -> out``

- ``x``: (tokens, K), rows sorted by group (what ``permute`` produces); ``w``: (groups, K, N);
  ``group_sizes``: (groups,) integer tensor (any int dtype) on x's device, each >= 0, summing to
  at most ``tokens``. Group ``g`` owns rows ``[sum(sizes[:g]), sum(sizes[:g+1]))``.
- ``out``: (tokens, N) in x's dtype, ``out[rows of g] = x[rows of g] @ w[g]``; empty groups are
  fine (no tile is scheduled for them, their d(w) is 0); rows past ``sum(group_sizes)`` (capacity
  padding) give 0 and get zero gradient.
- x and w share a dtype (float16 / bfloat16 / float32; float32 uses IEEE products, not tf32);
  accumulation is float32.
- Backward: ``dx = dy @ w[g]^T`` is the same kernel on a transposed view of ``w``; ``dw[g] =
  x_g^T dy_g`` is one launch with one program per (group, K tile, N tile) that walks the group's
  rows. Nothing syncs with the host: the tile schedule (which group each row tile belongs to) is
  computed on the device with cumsum + searchsorted; the grid is the upper bound
  ``cdiv(tokens, BLOCK_M) + groups`` row tiles and surplus programs exit at once. Group sizes are
  only validated against ``tokens`` when they live on the CPU (checking CUDA ones would sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_tensors, dot_precision


@triton.jit
def _grouped_gemm_kernel(
    # pointers: X (T, K), W (G, K, N) through strides, Out (T, N);
    # TileGroup (MAX_TILES,) group of each row tile (>= G: no work), TileStart (G,) first tile of
    # each group, GroupStart (G,) first row of each group, GroupSize (G,)
    X, W, Out, TileGroup, TileStart, GroupStart, GroupSize,
    # sizes
    G, K, N,
    # strides
    stride_xm, stride_xk,
    stride_wg, stride_wk, stride_wn,
    stride_om, stride_on,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.load(TileGroup + pid_m).to(tl.int32)
    if g < G:
        tile = pid_m - tl.load(TileStart + g).to(tl.int32)
        row0 = tl.load(GroupStart + g).to(tl.int64)
        rows_in_group = tl.load(GroupSize + g).to(tl.int32)
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # row inside the group
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < rows_in_group
        mask_n = offs_n < N
        x_ptrs = X + (row0 + offs_m[:, None]) * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = W + g.to(tl.int64) * stride_wg + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask_k = (k0 + offs_k) < K
            a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        o_ptrs = Out + (row0 + offs_m[:, None]) * stride_om + offs_n[None, :] * stride_on
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _grouped_gemm_dw_kernel(
    # pointers: X (T, K), DY (T, N), DW (G, K, N) contiguous, GroupStart / GroupSize (G,)
    X, DY, DW, GroupStart, GroupSize,
    # sizes
    K, N,
    # strides
    stride_xm, stride_xk,
    stride_dym, stride_dyn,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # dw[g] tile (BLOCK_K, BLOCK_N) = sum over the group's rows of x^T dy
    g = tl.program_id(0)
    pid_kn = tl.program_id(1)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_k = pid_kn // tiles_n
    pid_n = pid_kn % tiles_n
    row0 = tl.load(GroupStart + g).to(tl.int64)
    rows = tl.load(GroupSize + g).to(tl.int32)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_k = offs_k < K
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for m0 in range(0, rows, BLOCK_M):
        mask_m = (m0 + offs_m) < rows
        xt = tl.load(X + (row0 + m0 + offs_m[None, :]) * stride_xm + offs_k[:, None] * stride_xk,
                     mask=mask_k[:, None] & mask_m[None, :], other=0.0)  # (BLOCK_K, BLOCK_M)
        dy = tl.load(DY + (row0 + m0 + offs_m[:, None]) * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)  # (BLOCK_M, BLOCK_N)
        acc = tl.dot(xt, dy, acc, input_precision=DOT_PRECISION)
    dw_ptrs = DW + g.to(tl.int64) * K * N + offs_k[:, None] * N + offs_n[None, :]
    tl.store(dw_ptrs, acc.to(DW.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


def _config(device: torch.device, kind: str) -> dict:
    if device.type != "cuda":  # interpreter: small tiles so tests cross tile edges
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    if kind == "dw":
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def _schedule(group_sizes: torch.Tensor, tokens: int, block_m: int):
    """Device-side tile schedule: (tile_group, tile_start, group_start, sizes), no host sync."""
    sizes = group_sizes.to(torch.int64)
    G = sizes.numel()
    group_start = torch.cumsum(sizes, 0) - sizes
    tiles = (sizes + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    max_tiles = triton.cdiv(tokens, block_m) + G  # each group wastes at most one partial tile
    tile_ids = torch.arange(max_tiles, device=sizes.device, dtype=torch.int64)
    tile_group = torch.searchsorted(tile_end, tile_ids, right=True)  # == G past the last tile
    return tile_group, tile_end - tiles, group_start, sizes, max_tiles


def _launch(x, w_view, group_sizes, out, N):
    """out = per-group x @ w_view[g], w_view (G, K, N) given by strides."""
    T, K = x.shape
    G = w_view.shape[0]
    cfg = _config(x.device, "fwd")
    tile_group, tile_start, group_start, sizes, max_tiles = _schedule(group_sizes, T, cfg["BLOCK_M"])
    grid = (max_tiles, triton.cdiv(N, cfg["BLOCK_N"]))
    _grouped_gemm_kernel[grid](
        x, w_view, out, tile_group, tile_start, group_start, sizes,
        G, K, N,
        x.stride(0), x.stride(1),
        w_view.stride(0), w_view.stride(1), w_view.stride(2),
        out.stride(0), out.stride(1),
        DOT_PRECISION=dot_precision(x.dtype), **cfg,
    )


def _check(x, w, group_sizes):
    check_tensors("grouped_gemm", x, w)
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_gemm: x must be (tokens, K) and w (groups, K, N), got "
                         f"{tuple(x.shape)} and {tuple(w.shape)}")
    if x.dtype != w.dtype:
        raise TypeError(f"grouped_gemm: x ({x.dtype}) and w ({w.dtype}) dtypes differ")
    if group_sizes.dim() != 1 or group_sizes.numel() != w.shape[0]:
        raise ValueError(f"grouped_gemm: group_sizes must be ({w.shape[0]},), got {tuple(group_sizes.shape)}")
    if group_sizes.dtype.is_floating_point or group_sizes.dtype == torch.bool:
        raise TypeError(f"grouped_gemm: group_sizes must be an integer tensor, got {group_sizes.dtype}")
    if group_sizes.device != x.device:
        raise ValueError(f"grouped_gemm: group_sizes on {group_sizes.device}, x on {x.device}")
    if group_sizes.device.type == "cpu":
        if bool((group_sizes < 0).any()) or int(group_sizes.sum()) > x.shape[0]:
            raise ValueError(f"grouped_gemm: group_sizes {group_sizes.tolist()} must be >= 0 and sum "
                             f"to at most tokens={x.shape[0]}")


def grouped_gemm_forward(x, w, group_sizes):
    """The forward launch alone (no autograd): what `grouped_gemm` computes."""
    T, N = x.shape[0], w.shape[2]
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.zeros((T, N), device=x.device, dtype=x.dtype)  # padding rows stay 0
    if T and N and w.shape[0]:
        _launch(x, w, group_sizes, out, N)
    return out


def grouped_gemm_backward(x, w, group_sizes, dy, needs_dx: bool = True, needs_dw: bool = True):
    """(dx, dw) of `grouped_gemm` for the output gradient `dy` (None where not needed): the
    same kernel on a transposed view of w, and one launch for every group's x_g^T dy_g."""
    T, K = x.shape
    G, _, N = w.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dx = dw = None
    if needs_dx:
        dx = torch.zeros_like(x, memory_format=torch.contiguous_format)
        if T and K and G:
            _launch(dy, w.transpose(1, 2), group_sizes, dx, K)  # w^T as a (G, N, K) view
    if needs_dw:
        dw = torch.empty((G, K, N), device=w.device, dtype=w.dtype)
        if G and K and N:
            cfg = _config(x.device, "dw")
            sizes = group_sizes.to(torch.int64)
            group_start = torch.cumsum(sizes, 0) - sizes
            grid = (G, triton.cdiv(K, cfg["BLOCK_K"]) * triton.cdiv(N, cfg["BLOCK_N"]))
            _grouped_gemm_dw_kernel[grid](
                x, dy, dw, group_start, sizes,
                K, N,
                x.stride(0), x.stride(1),
                dy.stride(0), dy.stride(1),
                DOT_PRECISION=dot_precision(x.dtype), **cfg,
            )
    return dx, dw


class GroupedGemmFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, group_sizes):
        ctx.save_for_backward(x, w, group_sizes)
        return grouped_gemm_forward(x, w, group_sizes)

    @staticmethod
    def backward(ctx, dy):
        x, w, group_sizes = ctx.saved_tensors
        dx, dw = grouped_gemm_backward(x, w, group_sizes, dy, ctx.needs_input_grad[0],
                                       ctx.needs_input_grad[1])
        return dx, dw, None


def grouped_gemm(x, w, group_sizes):
    """Per-group ``x_g @ w[g]`` for rows sorted by group, in one launch; differentiable in x and w."""
    _check(x, w, group_sizes)
    return GroupedGemmFunction.apply(x, w, group_sizes)
