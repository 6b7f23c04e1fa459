"""Ring and all-to-all attention against one device's attention: the block merge alone, then
forward and every gradient on real gloo ranks (cp=2 and cp=4, every mask, GQA)."""

import math

import pytest
import torch
import torch.distributed as dist

from core.sequence_layout import SequenceLayout
from ranks import on_ranks
from runtime.context_parallel import (AttentionMask, _block_forward, a2a_attention, merge_blocks,
                                      ring_attention)


def _reference(q, k, v, mask: AttentionMask, doc=None):
    """Single-device attention with the explicit mask (float64)."""
    pos = torch.arange(q.shape[2])
    visible = mask.visible(pos, pos, doc, doc)
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def test_merging_random_blocks_equals_full_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, dtype=torch.float64) for _ in range(3))
    mask = AttentionMask(causal=True)
    pos = torch.arange(10)
    out = lse = None
    for keys in (slice(0, 3), slice(3, 7), slice(7, 10)):  # uneven blocks, any order
        o, l = _block_forward(q, k[:, :, keys], v[:, :, keys],
                              mask.visible(pos, pos[keys]), 1 / math.sqrt(8))
        out, lse = (o, l) if out is None else merge_blocks(out, lse, o, l)
    assert torch.allclose(out, _reference(q, k, v, mask), atol=1e-12)


CASES = [  # (name, cp, layout balanced, mask, heads, kv heads, documents?)
    ("causal balanced", None, True, AttentionMask(causal=True), 4, 4, False),
    ("causal contiguous", None, False, AttentionMask(causal=True), 4, 2, False),
    ("bidirectional", None, False, AttentionMask(causal=False), 4, 4, False),
    ("sliding window", None, True, AttentionMask(causal=True, window=5), 4, 4, False),
    ("packed documents", None, True, AttentionMask(causal=True), 4, 1, True),
    ("bidirectional window", None, False, AttentionMask(causal=False, window=3), 2, 2, False),
]


def _documents(batch: int, length: int) -> torch.Tensor:
    """Per-token document ids: rows packed with documents of different lengths."""
    cuts = [[0, 5, 11, length], [0, 9, length]]
    doc = torch.zeros(batch, length, dtype=torch.int64)
    for row, bounds in enumerate(cuts[:batch]):
        for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
            doc[row, a:b] = i
    return doc


def _cp_worker(algo: str):
    cp, me = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD
    errors = {}
    for name, _, balanced, mask, heads, kv_heads, documents in CASES:
        if algo == "a2a" and (balanced or heads % cp or kv_heads % cp):
            continue
        torch.manual_seed(1)
        length = 8 * cp
        q = torch.randn(2, heads, length, 8, dtype=torch.float64, requires_grad=True)
        k = torch.randn(2, kv_heads, length, 8, dtype=torch.float64, requires_grad=True)
        v = torch.randn(2, kv_heads, length, 8, dtype=torch.float64, requires_grad=True)
        grad = torch.randn(2, heads, length, 8, dtype=torch.float64)
        doc = _documents(2, length) if documents else None
        expected = _reference(q, k, v, mask, doc)
        expected.backward(grad)
        layout = SequenceLayout(length, cp, balanced)
        local = [layout.shard(t.detach(), 2, me).requires_grad_() for t in (q, k, v)]
        local_doc = None if doc is None else layout.shard(doc, 1, me)
        if algo == "ring":
            out, _ = ring_attention(*local, layout, group, mask, local_doc)
        else:
            out = a2a_attention(*local, group, mask, local_doc)
        out.backward(layout.shard(grad, 2, me))
        gathered = []
        for t in (out.detach(), *(x.grad for x in local)):
            pieces = [torch.empty_like(t) for _ in range(cp)]
            dist.all_gather(pieces, t.contiguous())
            gathered.append(layout.unshard(pieces, 2))
        errors[name] = max((a - b).abs().max().item() for a, b in zip(
            gathered, (expected, q.grad, k.grad, v.grad), strict=True))
    return errors


@pytest.mark.parametrize("algo, cp", [("ring", 2), ("ring", 4), ("a2a", 2)])
def test_cp_attention_equals_one_device(algo, cp):
    results = on_ranks(cp, _cp_worker, algo, timeout=300)
    for errors in results:
        assert errors and all(err < 1e-12 for err in errors.values()), errors
