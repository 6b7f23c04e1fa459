"""Context parallelism, graph level (every rank's program built on the meta device): where the
sequence is sharded, how attention is replaced, and the errors for what cp cannot do exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core import ops
from core.meta import CP_RECORD
from core.plan import NotLanded, Plan
from core.sequence_layout import SequenceLayout
from model_zoo import capture_once
from partitioner.capture import capture
from partitioner.compiler import compile_rank
from passes import PassError

aten = torch.ops.aten


def _program(captured, plan: str, world: int, rank: int = 0, **kwargs):
    return compile_rank(captured, Plan.parse(plan).resolve(world), rank, "meta", **kwargs)


def _graph_nodes(program):
    return [n for stage in program.stages for n in stage.gm.graph.nodes]


def _record(program):
    return program.stages[-1].gm.meta[CP_RECORD]


@pytest.mark.parametrize("factory", ["tiny", "tiny_llama"])
def test_ring_runs_every_layer_on_the_balanced_layout(factory):
    captured = capture_once(factory, batch=2, seq=16)
    for rank in range(2):
        program = _program(captured, "cp=2", 2, rank)
        record = _record(program)
        assert record.layout == SequenceLayout(16, 2, balanced=True)
        assert record.gathered == ()  # nothing reads the whole sequence
        assert len(record.attention) == 2 and record.outputs == (1,)
        nodes = _graph_nodes(program)
        assert not [n for n in nodes if n.target is aten.scaled_dot_product_attention.default]
        rings = [n for n in nodes if n.target is ops.ring_attention]
        assert len(rings) == 2 and all(n.args[4:7] == (16, True, True) for n in rings)
        # the token ids are sliced to this rank's chunks (rank r: chunks r and 3 - r of 4)
        (ids,) = [n for n in nodes if n.op == "placeholder"]
        starts = sorted(u.args[2] for u in ids.users if u.target is aten.slice.Tensor)
        assert starts == [4 * c for c in sorted(record.layout.chunk_ids(rank))]
        (output,) = [n for n in nodes if n.op == "output"]
        logits = output.args[0][0]
        assert tuple(logits.meta["val"].shape) == (2, 8, 512)


def test_positions_follow_the_layout():
    """RoPE tables (computed from arange over the whole sequence) and learned positions are
    taken at the global positions of the rank's tokens, by the same slices as the tokens."""
    for factory in ("tiny", "tiny_llama"):
        program = _program(capture_once(factory, batch=2, seq=16), "cp=2", 2, rank=1)
        nodes = _graph_nodes(program)
        sliced = {n.args[0].target for n in nodes if n.target is aten.slice.Tensor
                  and n.args[0].op == "call_function"}
        if factory == "tiny":  # wpe(arange(S)): the positions enter before the lookup
            assert aten.arange.start_step in sliced or aten.arange.default in sliced
        else:  # cos/sin tables enter where they meet q and k
            assert sliced & {aten.cat.default, aten._to_copy.default, aten.to.dtype}


def test_a2a_switches_heads_and_sequence_around_attention():
    program = _program(capture_once("tiny_llama", batch=2, seq=16), "cp=2,cp_algo=a2a", 2)
    record = _record(program)
    assert record.layout == SequenceLayout(16, 2, balanced=False)
    nodes = _graph_nodes(program)
    exchanges = [n for n in nodes if n.target is ops.all_to_all]
    assert len(exchanges) == 4 * 2  # q, k, v to head shards, the output back, per layer
    for sdpa in (n for n in nodes if n.target is aten.scaled_dot_product_attention.default):
        assert tuple(sdpa.meta["val"].shape) == (2, 2, 16, 16)  # half the heads, whole sequence


def test_tp_sp_cp_compose():
    program = _program(capture_once("tiny_llama", batch=2, seq=16), "tp=2,sp=on,cp=2", 4, rank=3)
    record = _record(program)
    assert record.gathered == () and len(record.attention) == 2
    rings = [n for n in _graph_nodes(program) if n.target is ops.ring_attention]
    assert all(tuple(n.args[0].meta["val"].shape) == (2, 2, 8, 16) for n in rings)


@pytest.mark.parametrize("plan, world", [("cp=2", 2), ("tp=2,cp=2", 4), ("tp=2,sp=on,cp=2", 4)])
def test_flattened_rows_keep_their_shards(plan, world):
    """Hugging Face GPT-2's Conv1D views (batch, seq, hidden) as (batch*seq, hidden) rows for
    addmm and back: the rows keep each batch row's tokens, nothing is gathered."""
    from model_zoo import hf_gpt2

    pytest.importorskip("transformers")
    model, (ids,) = hf_gpt2(batch=2, seq=16)
    program = _program(capture(model, (ids,)), plan, world)
    record = _record(program)
    assert record.gathered == () and len(record.attention) == 2
    rows = [n for n in _graph_nodes(program) if n.target is aten.addmm.default]
    assert rows and all(n.meta["val"].shape[0] == 2 * 8 for n in rows)


def test_a_loss_the_model_computes_reads_the_sequence_whole_and_says_so():
    """Given labels=, a Hugging Face causal LM shifts them (a slice of the sequence) and takes
    the mean cross-entropy over every token: those ops read the sequence gathered whole."""
    from model_zoo import hf_llama

    pytest.importorskip("transformers")
    model, (ids,) = hf_llama(batch=2, seq=16)
    captured = capture(model, (), {"input_ids": ids, "labels": ids})
    record = _record(_program(captured, "cp=2", 2))
    assert record.gathered and "gathered" in record.summary()
    assert record.outputs.count(None) == 1  # the loss is whole; the logits hold our tokens


# --- bad input: a clear error before any collective --------------------------------------------

def test_a_length_that_does_not_split_is_padded_under_causal_attention():
    captured = capture_once("tiny", batch=2, seq=18)
    for rank in range(2):
        program = _program(captured, "cp=2", 2, rank)
        record = _record(program)
        assert (record.layout.length, record.padding, record.length) == (20, 2, 18)
        assert "padded from 18 by 2" in record.summary()
        (output,) = [n for n in _graph_nodes(program) if n.op == "output"]
        assert tuple(output.args[0][0].meta["val"].shape) == (2, 10, 512)


def test_length_not_divisible_names_the_lengths_that_work():
    with pytest.raises(PassError, match=r"sequence length 18 does not split into 2\*cp=4 "
                                        r"chunks.*multiple of 4, and cp_pad=off forbids "
                                        r"padding it.*16 or 20"):
        _program(capture_once("tiny", batch=2, seq=18), "cp=2,cp_pad=off", 2)
    with pytest.raises(PassError, match=r"each split again over tp=2 by sp.*multiple of 8"):
        _program(capture_once("tiny", batch=2, seq=12), "tp=2,sp=on,cp=2,cp_pad=off", 4)
    bidirectional = capture(_MaskedAttention(causal=False),
                            (torch.zeros(2, 17, dtype=torch.long),))
    with pytest.raises(PassError, match=r"exact only for causal or masked attention.*16 or 18"):
        _program(bidirectional, "cp=2", 2)


def test_forward_only_programs_step_aside_for_such_lengths():
    program = _program(capture_once("tiny", batch=2, seq=18), "cp=2,cp_pad=off", 2,
                       forward_only=True)
    record = _record(program)
    assert record.stepped_aside and "18" in record.stepped_aside
    assert not record.sharded_outputs


def test_a2a_heads_not_divisible_suggests_ring():
    with pytest.raises(PassError, match=r"4 heads .*do not divide by cp=8; use cp_algo=ring"):
        _program(capture_once("tiny_llama", batch=1, seq=16), "cp=8,cp_algo=a2a", 8)


class _MaskedAttention(nn.Module):
    """One attention layer whose mask is a tensor (what ring attention cannot prove)."""

    def __init__(self, dropout: float = 0.0, causal: bool = True):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.qkv = nn.Linear(16, 48)
        self.dropout, self.causal = dropout, causal

    def forward(self, ids):
        x = self.embed(ids)
        q, k, v = (t.view(ids.shape[0], ids.shape[1], 2, 8).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, -1))
        if self.dropout or not self.causal:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout,
                                                  is_causal=self.causal)
        near = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril().triu(-3)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=near)


def test_an_explicit_mask_goes_whole_to_ring_attention():
    captured = capture(_MaskedAttention(), (torch.zeros(2, 16, dtype=torch.long),))
    program = _program(captured, "cp=2", 2)
    (ring,) = [n for n in _graph_nodes(program) if n.target is ops.ring_attention]
    assert tuple(ring.args[8].meta["val"].shape) == (16, 16)  # indexed per block at run time
    assert _record(program).layout.balanced is False  # no is_causal: contiguous chunks


def test_a_mask_per_head_is_refused():
    class PerHead(_MaskedAttention):
        def forward(self, ids):
            x = self.embed(ids)
            q, k, v = (t.view(ids.shape[0], ids.shape[1], 2, 8).transpose(1, 2)
                       for t in self.qkv(x).chunk(3, -1))
            mask = torch.ones(2, ids.shape[1], ids.shape[1], dtype=torch.bool).tril().triu(-3)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    captured = capture(PerHead(), (torch.zeros(2, 16, dtype=torch.long),))
    with pytest.raises(PassError, match=r"\(2, 16, 16\).*Broadcast the mask over the heads"):
        _program(captured, "cp=2", 2)


def test_attention_dropout_is_refused():
    captured = capture(_MaskedAttention(dropout=0.1).train(),
                       (torch.zeros(2, 16, dtype=torch.long),))
    with pytest.raises(PassError, match="dropout_p=0.1"):
        _program(captured, "cp=2", 2)


def test_hybrid_is_refused_until_it_lands():
    with pytest.raises(NotLanded, match="cp_algo=ring or cp_algo=a2a"):
        Plan.parse("cp=4,cp_algo=hybrid,cp_a2a=2").resolve(4).refuse_pending()
