"""Constant causal masks folded into SDPA's is_causal; other masks kept; numbers unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core import meta
from partitioner.capture import capture
from passes.causal_mask import fold_causal_masks

aten = torch.ops.aten


def _sdpa_calls(gm):
    return [n for n in gm.graph.nodes if n.target is aten.scaled_dot_product_attention.default]


class _Masked(nn.Module):
    """Attention with a mask built in forward from the sequence length, like HF models."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(8, 24)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.proj(x).view(b, s, 3, 2, 4).permute(2, 0, 3, 1, 4)
        pos = torch.arange(s)
        if self.kind == "causal":
            mask = pos[None, :] <= pos[:, None]
        elif self.kind == "window":  # causal but only the last 2 keys: not foldable
            mask = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < 2)
        elif self.kind == "float causal":
            mask = torch.zeros(s, s).masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        else:  # "input": the mask comes from the batch (padding)
            mask = (x[..., :1] > -10).transpose(1, 2)[:, None]
        mask = mask.expand(b, 1, s, s) if mask.dim() == 2 else mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("kind, folds", [("causal", True), ("float causal", True),
                                         ("window", False), ("input", False)])
def test_only_constant_causal_masks_fold_and_results_do_not_change(kind, folds):
    torch.manual_seed(0)
    model, x = _Masked(kind).double(), torch.randn(2, 6, 8, dtype=torch.float64)
    gm = capture(model, (x,)).gm
    for name, param in model.named_parameters():  # the capture holds meta tensors
        owner, _, leaf = name.rpartition(".")
        gm.get_submodule(owner)._parameters[leaf] = param
    before = len(gm.graph.nodes)
    gm = fold_causal_masks(gm)
    (call,) = _sdpa_calls(gm)
    assert bool(call.kwargs.get("is_causal")) is folds
    assert (len(call.args) <= 3 and "attn_mask" not in call.kwargs) is folds
    assert (len(gm.graph.nodes) < before) is folds  # the mask's ops went away
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-12)


def test_hugging_face_masks_fold():
    pytest.importorskip("transformers")
    from model_zoo import hf_gpt2, hf_llama

    for factory in (hf_llama, hf_gpt2):
        model, (ids,) = factory()
        gm = fold_causal_masks(capture(model, (ids,)).gm)
        calls = _sdpa_calls(gm)
        assert calls and all(c.kwargs.get("is_causal") and len(c.args) == 3 for c in calls)
        assert not any(n.target is aten.cumsum.default for n in gm.graph.nodes)


def test_the_record_counts_folded_and_kept_masks():
    folded = fold_causal_masks(capture(_Masked("causal"), (torch.randn(2, 6, 8),)).gm)
    record = folded.meta[meta.CAUSAL_MASK_RECORD]
    assert (record.attention_calls, record.folded_calls, record.folded_masks,
            record.kept_masks) == (1, 1, 1, 0)
    kept = fold_causal_masks(capture(_Masked("window"), (torch.randn(2, 6, 8),)).gm)
    assert kept.meta[meta.CAUSAL_MASK_RECORD].summary().endswith("1 mask(s) kept")
