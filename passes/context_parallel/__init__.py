"""Context parallelism: each cp rank runs the model on its share of the sequence.

Runs after tensor and sequence parallelism, on their graph. Every cp rank receives the whole
(dp share of the) batch, and the graph takes this rank's tokens itself, where the sequence
first meets a parameter: the token ids before the embedding lookup, the positions before a
learned position table, a sequence-long input before a linear layer. The tokens follow
`core.sequence_layout.SequenceLayout`: with ring attention over causal masks, the
load-balanced layout (2*cp chunks, rank i holding chunks i and 2cp-1-i); otherwise contiguous
chunks. From there the sharding is propagated through the graph with the shared table
(`passes.propagation`), and:

- a whole-sequence value that meets a sharded one (RoPE tables, masks, position embeddings
  computed from `arange`) takes this rank's tokens by the same layout (a local slice: each rank
  uses the global positions of the tokens it holds, whatever the model computes from them);
- `scaled_dot_product_attention` becomes ring attention (`core.ops.ring_attention`: K/V blocks
  around the ring, blocks merged by their log-sum-exp, masks from global positions) or, with
  `cp_algo=a2a`, all-to-all to head shards over the whole sequence and back (DeepSpeed-Ulysses);
- an op that cannot run on shards (one that slices, shifts or reduces over the sequence: a
  Hugging Face label shift, a loss the model computes itself) reads the sequence gathered whole
  in layout order: exact, and said in the record, but nothing after it is saved by cp.

Gradients follow one convention: a sharded value's gradient is this rank's; a whole value's
gradient is partial over cp (the ranks' gradients sum to it). So taking a rank's tokens is a
slice (backward pads with zeros), gathering is an all-gather whose backward reduce-scatters,
and parameter gradients are summed over dp x cp by the runtime; a loss read whole on every cp
rank is weighted 1/cp by the executor (`ContextParallelRecord.outputs` says which outputs hold
this rank's tokens, so the executor can shard targets and unshard `__call__`'s outputs).
"""

from __future__ import annotations

import dataclasses

from torch import fx

from core import meta
from core.divisibility import nearest_multiples
from core.fx_utils import tensor_of
from core.sequence_layout import SequenceLayout
from passes import PassContext, PassError, recompile
from passes.context_parallel.attention import SDPA, is_causal, mask_of
from passes.context_parallel.record import ContextParallelRecord
from passes.context_parallel.shard import Sharder

__all__ = ["ContextParallelRecord", "context_parallel"]


def context_parallel(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    plan = ctx.plan
    graph = gm.graph
    seq = _sequence_length(graph)
    attention = [n for n in graph.nodes if n.target is SDPA]
    balanced = plan.cp_algo == "ring" and bool(attention) and all(map(is_causal, attention))
    chunks = 2 * plan.cp if balanced else plan.cp
    multiple = chunks * (plan.tp if plan.sp else 1)
    length = seq
    if seq is not None and seq % multiple:
        # Padded tokens at the end are seen by no real token under a causal mask, and the
        # executor drops their outputs and gives them ignored targets (Megatron's get_padding)
        if plan.cp_pad and attention and all(is_causal(n) or mask_of(n) is not None
                                             for n in attention):
            length = -(-seq // multiple) * multiple
    if seq is None or length % multiple:
        why = _length_message(seq, plan, chunks, multiple, balanced, bool(attention))
        if not ctx.forward_only:
            raise PassError(why)
        gm.meta[meta.CP_RECORD] = ContextParallelRecord(plan.cp, ctx.coords["cp"],
                                                        plan.cp_algo, None, stepped_aside=why)
        return gm
    layout = SequenceLayout(length, plan.cp, balanced)
    record = Sharder(gm, layout, seq, ctx.coords["cp"], plan.cp_algo).run()
    if record.attention and plan.cp_algo == "ring":
        record = dataclasses.replace(record, blocks=(
            "torch's fused flash kernel for blocks without a mask tensor, explicit scores for "
            "masked ones" if ctx.device.type != "cuda" else
            "plain torch (explicit scores): the Triton flash-attention kernel is not wired "
            "into the ring yet"))
    gm.meta[meta.CP_RECORD] = record
    graph.lint()
    recompile(gm)
    return gm


def _sequence_length(graph: fx.Graph) -> int | None:
    """Dim 1 of the model's first tensor input with two or more dims (the contract: inputs are
    (batch, sequence, ...))."""
    for node in graph.find_nodes(op="placeholder"):
        val = tensor_of(node)
        if val is not None and val.dim() >= 2:
            return int(val.shape[1])
    return None


def _length_message(seq, plan, chunks: int, multiple: int, balanced: bool,
                    attention: bool) -> str:
    if seq is None:
        return ("cp splits the sequence, dim 1 of the model's first tensor input, and the "
                "model has no input with two or more dims")
    why = (f"2*cp={chunks} chunks (ring attention over a causal mask uses the load-balanced "
           f"layout)" if balanced else f"cp={plan.cp} chunks")
    if multiple != chunks:
        why += f", each split again over tp={plan.tp} by sp"
    below, above = nearest_multiples(seq, multiple)
    lengths = " or ".join(str(n) for n in (below, above) if n > 0)
    if not plan.cp_pad:
        padding = "cp_pad=off forbids padding it"
    elif attention:
        padding = ("padding it is exact only for causal or masked attention (padded keys "
                   "masked out), and this model attends to every token unmasked")
    else:
        padding = "padding it is exact only for causal or masked attention"
    return (f"sequence length {seq} does not split into {why}: it must be a multiple of "
            f"{multiple}, and {padding}. Use a sequence length of {lengths}, or change cp")
