"""Context-parallel attention: each cp rank holds a slice of the sequence (core.sequence_layout).

Ring (`ring_attention`): every rank keeps its queries; the key/value blocks travel around the
ring by P2P, one step per rank, while each rank computes attention of its queries on the block
it holds. Blocks merge exactly through their log-sum-exp: with block results (o_i, lse_i),
lse = logsumexp_i lse_i and o = sum_i exp(lse_i - lse) o_i. The backward is a ring too: the
blocks travel again with their dK/dV accumulators, which arrive back at their owner after cp
steps; dQ stays local. Per step the next block's transfer is posted before the current block's
compute, so sends overlap work where the backend runs them asynchronously.

Masks are computed per (query chunk, key chunk) pair from global positions (and per-token
document ids for packed sequences), so each block sees exactly the single-device mask: causal,
bidirectional, sliding window, document. A chunk pair the mask empties is skipped, which with the
load-balanced layout halves the causal work on every rank alike.

All-to-all (`a2a_attention`, DeepSpeed-Ulysses): sequence-split q/k/v become head-split over the
whole sequence, attention runs locally with the full mask, and the output goes back.

Plain torch (float64 stays float64): the per-block math is flash attention's, forward and
backward, so the result equals one device's attention up to summation order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from core import ops
from core.sequence_layout import SequenceLayout
from runtime.ring import Ring, wait


@dataclass(frozen=True)
class AttentionMask:
    """Which keys a query sees, from global positions: the single-device mask, block by block.

    `causal`: key position <= query position. `window`: query - key < window (with causal, a
    sliding window of `window` tokens including itself). Document ids (per token, given to the
    attention call) restrict attention to tokens of the same document (packed sequences).
    """

    causal: bool = True
    window: int | None = None

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor, q_doc=None, k_doc=None):
        """Bool (Lq, Lk), or (B, 1, Lq, Lk) with documents; None when every pair is visible."""
        diff = q_pos[:, None] - k_pos[None, :]
        mask = None
        if self.causal:
            mask = diff >= 0
        if self.window is not None:
            near = diff < self.window if self.causal else diff.abs() < self.window
            mask = near if mask is None else mask & near
        if q_doc is not None:
            same = (q_doc[:, :, None] == k_doc[:, None, :])[:, None]  # (B, 1, Lq, Lk)
            mask = same if mask is None else mask & same
        return mask


# --- one block: flash attention's forward and backward on explicit scores --------------------

def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _fold_kv(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Sum the gradient of repeated kv heads back onto each kv head (GQA)."""
    b, h, s, d = grad.shape
    return grad if h == kv_heads else grad.view(b, kv_heads, h // kv_heads, s, d).sum(2)


_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _fused(q, mask, bias) -> bool:
    """Whether a block runs in torch's fused CPU flash kernel (which returns the lse): no mask
    tensor (every key visible, or the causal diagonal block) on a CPU tensor."""
    return mask is None and bias is None and q.device.type == "cpu"


def _block_forward(q, k, v, mask, scale, causal: bool = False, bias=None):
    """(out, lse) of q on one key block; rows seeing no key get out 0 and lse -inf. `causal`:
    the block is its own diagonal (query and key positions the same), masked causally."""
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    if _fused(q, mask, bias):
        out, lse = _FLASH_CPU(q.contiguous(), k.contiguous(), v.contiguous(), 0.0, causal,
                              scale=scale)
        return out, lse
    if causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - _finite(lse).unsqueeze(-1))
    return torch.matmul(probs, v), lse


def _block_backward(q, k, v, out, lse, grad_out, mask, scale, causal: bool = False, bias=None):
    """Gradients of one block given the *merged* out and lse (flash attention's backward)."""
    kv_heads = k.shape[1]
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    if _fused(q, mask, bias):
        # the merged out may be held in more bits than q (bf16 blocks merged in fp32)
        grad_q, grad_k, grad_v = _FLASH_CPU_BACKWARD(
            grad_out.to(q.dtype).contiguous(), q.contiguous(), k.contiguous(), v.contiguous(),
            out.to(q.dtype).contiguous(), lse.contiguous(), 0.0, causal, scale=scale)
        return grad_q, _fold_kv(grad_k, kv_heads), _fold_kv(grad_v, kv_heads)
    if q.dtype.itemsize < 4:  # 16-bit blocks: the explicit softmax backward in fp32
        low = q.dtype
        grads = _block_backward(q.float(), k.float(), v.float(), out.float(), lse.float(),
                                grad_out.float(), mask, scale, causal, bias)
        return tuple(_fold_kv(g.to(low), kv_heads) if i else g.to(low)
                     for i, g in enumerate(grads))
    if causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.exp(scores - _finite(lse).unsqueeze(-1))  # this block's share of softmax
    grad_v = torch.matmul(probs.transpose(-2, -1), grad_out)
    grad_probs = torch.matmul(grad_out, v.transpose(-2, -1))
    row = (grad_out * out).sum(-1, keepdim=True)
    grad_scores = probs * (grad_probs - row) * scale
    grad_q = torch.matmul(grad_scores, k)
    grad_k = torch.matmul(grad_scores.transpose(-2, -1), q)
    return grad_q, _fold_kv(grad_k, kv_heads), _fold_kv(grad_v, kv_heads)


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (no visible key) as 0, so exp(-inf - lse) is 0, never NaN."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def merge_blocks(out, lse, block_out, block_lse):
    """Merge a block's (out, lse) into the running (out, lse): exact log-sum-exp weighting
    (rows with lse -inf, no visible key yet, take the block's result as is)."""
    new_lse = torch.logaddexp(lse, block_lse)
    base = _finite(new_lse)
    merged = (out * torch.exp(lse - base).unsqueeze(-1)
              + block_out * torch.exp(block_lse - base).unsqueeze(-1))
    return merged, new_lse


# --- chunk pairs -------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Pair:
    """A (query chunk, key chunk) pair of one ring step and its mask (None: all visible)."""

    q: slice
    k: slice
    mask: torch.Tensor | None
    causal: bool = False
    """The pair is one chunk against itself under a plain causal mask (`mask` is then None):
    the diagonal block, which a fused kernel masks itself."""
    bias: torch.Tensor | None = None
    """The model's float mask for this block, added to the scores."""


def _pairs(layout: SequenceLayout, q_rank: int, k_rank: int, mask: AttentionMask,
           q_doc, k_doc, device, whole: torch.Tensor | None = None) -> list[_Pair]:
    """The chunk pairs of q_rank's queries against k_rank's keys that the mask leaves work in.
    `whole`: the model's own (.., S, S) mask (bool: visible; float: added to the scores)."""
    pairs = []
    c = layout.chunk
    q_pos, k_pos = layout.positions(q_rank, device), layout.positions(k_rank, device)
    for qi in range(len(layout.chunk_ids(q_rank))):
        for ki in range(len(layout.chunk_ids(k_rank))):
            qs, ks = slice(qi * c, (qi + 1) * c), slice(ki * c, (ki + 1) * c)
            if whole is not None:
                block = whole[..., q_pos[qs], :][..., k_pos[ks]]
                if block.dtype == torch.bool:
                    visible = mask.visible(q_pos[qs], k_pos[ks])
                    visible = block if visible is None else block & visible
                    if bool(visible.any()):
                        pairs.append(_Pair(qs, ks, None if bool(visible.all()) else visible))
                elif not bool(torch.isneginf(block).all()):
                    visible = mask.visible(q_pos[qs], k_pos[ks])
                    pairs.append(_Pair(qs, ks, visible, bias=block))
                continue
            if (mask.causal and mask.window is None and q_doc is None
                    and torch.equal(q_pos[qs], k_pos[ks])):
                pairs.append(_Pair(qs, ks, None, causal=True))
                continue
            visible = mask.visible(q_pos[qs], k_pos[ks],
                                   None if q_doc is None else q_doc[:, qs],
                                   None if k_doc is None else k_doc[:, ks])
            if visible is not None and not bool(visible.any()):
                continue  # the mask empties this pair: no work, no contribution
            if visible is not None and bool(visible.all()):
                visible = None
            pairs.append(_Pair(qs, ks, visible))
    return pairs


# --- the ring ----------------------------------------------------------------------------------


def _pack(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unpack(flat: torch.Tensor, likes: list[torch.Tensor]) -> list[torch.Tensor]:
    out, start = [], 0
    for like in likes:
        out.append(flat[start:start + like.numel()].view_as(like))
        start += like.numel()
    return out


def _ring_forward(q, k, v, doc, layout: SequenceLayout, mask: AttentionMask, scale: float, group,
                  whole: torch.Tensor | None = None):
    """(out, lse) of this rank's queries over every rank's keys, the blocks passed in a ring."""
    ring = Ring(group)
    me = ring.rank
    # 16-bit blocks merge in fp32 (flash attention's accumulators; its CPU kernel's lse is fp32)
    acc = torch.float32 if q.dtype.itemsize < 4 else q.dtype
    out = torch.zeros_like(q, dtype=acc)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
    block = _pack(k, v)
    k_doc = doc
    for step in range(ring.size):
        source = (me - step) % ring.size  # whose keys this rank holds at this step
        # the next step's keys travel while this step's are used
        pending = (ring.shift(block, *(() if doc is None else (k_doc,)))
                   if step + 1 < ring.size else None)
        k_blk, v_blk = _unpack(block, [k, v])
        for pair in _pairs(layout, me, source, mask, doc, k_doc, q.device, whole):
            o, l = _block_forward(q[:, :, pair.q], k_blk[:, :, pair.k], v_blk[:, :, pair.k],
                                  pair.mask, scale, pair.causal, pair.bias)
            _merge_rows(out, lse, o, l, pair.q)
        if pending is not None:
            works, received = pending
            wait(works)
            block, *rest = received
            k_doc = rest[0] if doc is not None else None
    return out.to(q.dtype), lse


def _ring_backward(q, k, v, out, lse, doc, grad_out, layout: SequenceLayout,
                   mask: AttentionMask, scale: float, group, whole: torch.Tensor | None = None):
    """(dq, dk, dv): the blocks travel the ring again with their dK/dV accumulators, which
    arrive back at their owner after cp steps; dq stays local."""
    ring = Ring(group)
    me = ring.rank
    grad_q = torch.zeros_like(q)
    block = _pack(k, v, torch.zeros_like(k), torch.zeros_like(v))
    k_doc = doc
    for step in range(ring.size):
        source = (me - step) % ring.size
        k_blk, v_blk, gk, gv = _unpack(block, [k, v, k, v])
        for pair in _pairs(layout, me, source, mask, doc, k_doc, q.device, whole):
            dq, dk, dv = _block_backward(
                q[:, :, pair.q], k_blk[:, :, pair.k], v_blk[:, :, pair.k], out[:, :, pair.q],
                lse[:, :, pair.q], grad_out[:, :, pair.q], pair.mask, scale, pair.causal,
                pair.bias)
            grad_q[:, :, pair.q] += dq
            gk[:, :, pair.k] += dk
            gv[:, :, pair.k] += dv
        # every step sends on, the last one brings the accumulated dK/dV home
        with_doc = doc is not None and step + 1 < ring.size
        works, received = ring.shift(block, *((k_doc,) if with_doc else ()))
        wait(works)
        block, *rest = received
        if with_doc:
            k_doc = rest[0]
    _, _, grad_k, grad_v = _unpack(block, [k, v, k, v])
    return grad_q, grad_k, grad_v


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc, layout, mask, scale, group):
        out, lse = _ring_forward(q, k, v, doc, layout, mask, scale, group)
        ctx.save_for_backward(q, k, v, out, lse, *(() if doc is None else (doc,)))
        ctx.layout, ctx.mask, ctx.scale, ctx.group = layout, mask, scale, group
        ctx.has_doc = doc is not None
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, *rest = ctx.saved_tensors
        doc = rest[0] if ctx.has_doc else None
        grads = _ring_backward(q, k, v, out, lse, doc, grad_out, ctx.layout, ctx.mask,
                               ctx.scale, ctx.group)
        return *grads, None, None, None, None, None


def _merge_rows(out, lse, block_out, block_lse, rows: slice) -> None:
    """Merge a block's result for query rows `rows` into the local (out, lse), in place."""
    merged, merged_lse = merge_blocks(out[:, :, rows], lse[:, :, rows], block_out, block_lse)
    out[:, :, rows] = merged
    lse[:, :, rows] = merged_lse


def ring_attention(q, k, v, layout: SequenceLayout, group, mask: AttentionMask = AttentionMask(),
                   doc: torch.Tensor | None = None, scale: float | None = None):
    """Attention of this rank's queries on the whole sequence, keys/values passed in a ring.

    q (B, H, S_local, D), k/v (B, KH, S_local, D) (GQA: H a multiple of KH) hold this rank's
    tokens in `layout`'s order; `doc` (B, S_local) their document ids for packed sequences.
    Returns (out (B, H, S_local, D), lse (B, H, S_local)). Differentiable in q, k, v.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if dist.get_world_size(group) == 1:
        pos = layout.positions(0, q.device)
        visible = mask.visible(pos, pos, doc, doc)
        return _block_forward(q, k, v, visible, scale)
    return _RingAttention.apply(q, k, v, doc, layout, mask, scale, group)


# --- all-to-all (Ulysses) -----------------------------------------------------------------------

class _Exchange(torch.autograd.Function):
    """All-to-all over `group`: chunk i of `scatter_dim` goes to rank i, the received chunks
    are concatenated along `gather_dim`; backward is the same exchange with the dims swapped.
    (B, H, S/cp, D) sequence shards with scatter 1 / gather 2 become (B, H/cp, S, D) head
    shards over the whole sequence (contiguous layout), and back with the dims swapped."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim: int, gather_dim: int):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _exchange(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _exchange(grad, ctx.group, gather_dim, scatter_dim), None, None, None


def _exchange(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    size = dist.get_world_size(group)
    inputs = [c.contiguous() for c in x.chunk(size, dim=scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(size)]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


def a2a_attention(q, k, v, group, mask: AttentionMask = AttentionMask(),
                  doc: torch.Tensor | None = None, scale: float | None = None):
    """DeepSpeed-Ulysses attention over contiguous sequence shards.

    q (B, H, S/cp, D), k/v (B, KH, S/cp, D) with H and KH divisible by cp (the caller replicates
    kv heads where they are not); `doc` (B, S/cp) document ids. Returns out (B, H, S/cp, D).
    """
    size = dist.get_world_size(group)
    for name, heads in (("heads", q.shape[1]), ("kv heads", k.shape[1])):
        if heads % size:
            raise ValueError(f"a2a attention splits {name} over cp: {heads} {name} do not divide "
                             f"by cp={size}; use cp_algo=ring")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qh, kh, vh = (_Exchange.apply(t, group, 1, 2) for t in (q, k, v))  # heads split
    length = qh.shape[2]
    pos = torch.arange(length, device=q.device)
    full_doc = None
    if doc is not None:
        pieces = [torch.empty_like(doc) for _ in range(size)]
        dist.all_gather(pieces, doc.contiguous(), group=group)
        full_doc = torch.cat(pieces, dim=1)
    # one block over the whole sequence: autograd differentiates it
    out, _ = _block_forward(qh, kh, vh, mask.visible(pos, pos, full_doc, full_doc), scale)
    return _Exchange.apply(out, group, 2, 1)  # back to sequence shards


# --- the graph's op (core.ops.ring_attention) -------------------------------------------------

def _ring_op(q, k, v, group: str, seq_len: int, balanced: bool, is_causal: bool, scale: float,
             attn_mask=None, *, group_size: int = 0):
    process_group = _resolve_process_group(group)
    layout = SequenceLayout(seq_len, process_group.size(), balanced)
    return _ring_forward(q, k, v, None, layout, AttentionMask(causal=is_causal), scale,
                         process_group, attn_mask)


def _ring_setup(ctx, inputs, keyword_only_inputs, output) -> None:
    q, k, v, group, seq_len, balanced, is_causal, scale, attn_mask = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *(() if attn_mask is None else (attn_mask,)))
    ctx.group, ctx.scale = group, scale
    ctx.layout_args, ctx.mask = (seq_len, balanced), AttentionMask(causal=is_causal)


def _ring_op_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, *whole = ctx.saved_tensors
    process_group = _resolve_process_group(ctx.group)
    layout = SequenceLayout(ctx.layout_args[0], process_group.size(), ctx.layout_args[1])
    grads = _ring_backward(q, k, v, out, lse, None, grad_out.contiguous(), layout, ctx.mask,
                           ctx.scale, process_group, whole[0] if whole else None)
    return *grads, None, None, None, None, None, None


torch.library.impl(ops.ring_attention._name, "CompositeExplicitAutograd")(_ring_op)
torch.library.register_autograd(ops.ring_attention._name, _ring_op_backward,
                                setup_context=_ring_setup)


# --- whole sequences for the caller ----------------------------------------------------------

def gather_sequence(x: torch.Tensor, dim: int, layout: SequenceLayout, group: str) -> torch.Tensor:
    """The whole sequence of a value whose `dim` holds this cp rank's tokens, in sequence order
    (`group`: the cp group's name). Backward keeps this rank's tokens of the gradient."""
    gathered = ops.all_gather(x, group, dim, group_size=layout.cp)
    if not layout.balanced:
        return gathered
    pieces = gathered.split(layout.chunk, dim)  # rank r's chunks at 2r, 2r+1
    where = {c: 2 * r + i for r in range(layout.cp) for i, c in enumerate(layout.chunk_ids(r))}
    return torch.cat([pieces[where[c]] for c in range(layout.chunks)], dim)
