"""Plain-torch versions of every kernel in runtime/kernels/, same signatures and outputs.

These are the CPU / float64 path the runtime dispatches to (dispatch.py) and the ground truth the
kernel tests compare against. They are differentiable through ordinary autograd. Half-precision
inputs are computed in float32 and cast back, as the kernels do; float64 stays float64.

One deliberate difference: ``flash_attention``'s ``lse`` is float32 for 16/32-bit inputs (the
kernel contract) but float64 for float64 inputs, so float64 equivalence tests of ring attention
(which merge blocks through lse) keep full precision.

Contracts (see each kernel module's docstring for the details):
- ``flash_attention(q, k, v, causal=True, scale=None, *, q_offset=0, k_offset=0) -> (out, lse)``
- ``rms_norm(x, weight, eps=1e-6)``; ``layer_norm(x, weight, bias, eps=1e-5)`` (weight/bias may be None)
- ``swiglu(gate, up) = silu(gate) * up``
- ``grouped_gemm(x, w, group_sizes)``: x (tokens, K) sorted by group, w (groups, K, N)
- ``permute(tokens, expert_ids, num_experts) -> (permuted, row_id_map, group_sizes)``;
  ``unpermute(permuted, row_id_map, probs=None) -> (tokens, hidden)``
"""

from __future__ import annotations

import math

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def flash_attention(q, k, v, causal=True, scale=None, *, q_offset=0, k_offset=0):
    """softmax(scale * q k^T + mask) v and the row log-sum-exp; GQA by repeating kv heads."""
    B, H, Sq, D = q.shape
    KH, Sk = k.shape[1], k.shape[2]
    if H % KH != 0:
        raise ValueError(f"flash_attention: heads ({H}) must be a multiple of kv_heads ({KH})")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    ct = _compute_dtype(q.dtype)
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    if KH != H:
        kc = kc.repeat_interleave(H // KH, dim=1)  # (B, H, Sk, D)
        vc = vc.repeat_interleave(H // KH, dim=1)
    s = torch.matmul(qc, kc.transpose(-2, -1)) * scale  # (B, H, Sq, Sk)
    if causal:
        qpos = torch.arange(Sq, device=q.device) + q_offset
        kpos = torch.arange(Sk, device=q.device) + k_offset
        hidden = kpos[None, :] > qpos[:, None]  # (Sq, Sk)
        s = s.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Sq); -inf for rows with no visible key
    # subtract 0 on empty rows so that exp(-inf - -inf) never makes a NaN
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    out = torch.matmul(p, vc).to(q.dtype)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out, lse.to(lse_dtype)


def rms_norm(x, weight=None, eps=1e-6):
    """x / sqrt(mean(x^2, -1) + eps) * weight over the last dim; weight None means 1."""
    ct = _compute_dtype(x.dtype)
    xc = x.to(ct)
    y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(ct)
    return y.to(x.dtype)


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim (biased variance)."""
    ct = _compute_dtype(x.dtype)
    xc = x.to(ct)
    mean = xc.mean(-1, keepdim=True)
    var = (xc - mean).pow(2).mean(-1, keepdim=True)
    y = (xc - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)


def swiglu(gate, up):
    """silu(gate) * up."""
    ct = _compute_dtype(gate.dtype)
    return (torch.nn.functional.silu(gate.to(ct)) * up.to(ct)).to(gate.dtype)


def grouped_gemm(x, w, group_sizes):
    """out[rows of group g] = x[rows of group g] @ w[g]; rows past sum(group_sizes) give 0."""
    T, K = x.shape
    G, K2, N = w.shape
    if K2 != K or group_sizes.numel() != G:
        raise ValueError(f"grouped_gemm: x {tuple(x.shape)}, w {tuple(w.shape)}, "
                         f"group_sizes {tuple(group_sizes.shape)} do not match")
    sizes = [int(s) for s in group_sizes.tolist()]
    if any(s < 0 for s in sizes) or sum(sizes) > T:
        raise ValueError(f"grouped_gemm: group_sizes {sizes} must be >= 0 and sum to <= {T} tokens")
    ct = _compute_dtype(x.dtype)
    outs, start = [], 0
    for g, n in enumerate(sizes):
        outs.append(x[start:start + n].to(ct) @ w[g].to(ct))
        start += n
    outs.append(x.new_zeros((T - start, N), dtype=ct))
    return torch.cat(outs, 0).to(x.dtype)


def _row_id_map(expert_ids, num_experts):
    """Destination row of each (token, k) copy: stable sort by expert, then by token order."""
    T, topk = expert_ids.shape
    flat = expert_ids.reshape(-1).to(torch.int64)  # (T*topk,), token-major
    order = torch.sort(flat, stable=True).indices  # permuted row -> flat source index
    row_id_map = torch.empty_like(order)
    row_id_map[order] = torch.arange(flat.numel(), device=flat.device)
    group_sizes = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    group_sizes.index_add_(0, flat, torch.ones_like(flat))
    return row_id_map.view(T, topk), group_sizes


def permute(tokens, expert_ids, num_experts):
    """Copies of each token, sorted by expert: see runtime/kernels/permute.py for the contract."""
    T, Hd = tokens.shape
    if expert_ids.dim() == 1:
        expert_ids = expert_ids[:, None]
    if expert_ids.shape[0] != T:
        raise ValueError(f"permute: expert_ids {tuple(expert_ids.shape)} must be (tokens={T}, topk)")
    row_id_map, group_sizes = _row_id_map(expert_ids, num_experts)
    topk = expert_ids.shape[1]
    src = torch.arange(T, device=tokens.device).repeat_interleave(topk)  # flat index -> token
    permuted = tokens.new_empty((T * topk, Hd))
    permuted = permuted.index_copy(0, row_id_map.reshape(-1), tokens[src])
    return permuted, row_id_map, group_sizes


def unpermute(permuted, row_id_map, probs=None):
    """out[t] = sum_k probs[t, k] * permuted[row_id_map[t, k]] (probs None means 1)."""
    T, topk = row_id_map.shape
    ct = _compute_dtype(permuted.dtype)
    rows = permuted[row_id_map.reshape(-1)].to(ct).view(T, topk, -1)  # (T, topk, H)
    if probs is not None:
        rows = rows * probs.to(ct).reshape(T, topk, 1)
    return rows.sum(1).to(permuted.dtype)
