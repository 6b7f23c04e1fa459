"""Sequence parallelism (Korthikanti et al. 2022; Megatron-Core's `sequence_parallel=True`).

Runs after tensor_parallel. Between tensor-parallel regions the activations (residual stream,
norms, dropout) are the same on every tp rank; SP keeps them split along the sequence instead,
so each rank computes and stores 1/tp of them:

- a row region's `all_reduce(y, "tp")` becomes `reduce_scatter(y, "tp", seq)` (so does the
  vocab-parallel embedding's);
- a column region's `copy_to_region(x, "tp")` becomes `gather_for_region(x, "tp", seq)`
  (all-gather forward, reduce-scatter backward);
- the *sequence zone* is every node connected to those collectives through token-wise ops
  (elementwise, reductions and norms over features, dropout, views that keep or flatten the
  token dims); its values take their local shapes. Embedding lookups stay whole on purpose: on
  sequence shards their table's gradient would be partial and need an all-reduce of the whole
  table (vocab x hidden) per microbatch, where scattering their output costs an all-gather of
  one activation gradient (Megatron scatters the embedding output too);
- where the zone reads a value that spans the sequence from outside (a replicated embedding's
  output, anything computed off the zone) `scatter` keeps this rank's slice; where a zone value
  leaves it (a replicated LM head, the graph output, any op that mixes tokens) `all_gather`
  restores it;
- tensors the zone reads that broadcast over the sequence and carry gradients (norm weights,
  biases) are read through `copy_to_region(., "tp")`: each rank's gradient covers only its
  tokens and the all-reduce in backward sums them (Megatron's all-reduce of sequence-parallel
  parameter gradients, done per use).

A zone value is split along one tensor dim (`SeqSplit`): the sequence dim of a (batch, seq, ...)
tensor, or the flattened batch*seq dim of a (batch*seq, ...) tensor (Hugging Face Conv1D views
its input as (-1, hidden)). Flattened values keep the sequence split: collectives on them view
to (batch, seq, ...) first, so both forms hold the same tokens.

The pass reads the tensor-parallel pass's record for the regions' entries and exits, and
writes its own (`SequenceParallelRecord`). Where each job lives: `zone` (the token-wise rules
and the flood), `rewrite` (local shapes and boundary collectives), `record`.
"""

from __future__ import annotations

import logging

from torch import fx

from core.meta import SP_RECORD, TP_RECORD
from passes import PassContext, PassError, recompile
from passes.propagation import tensor_shape
from passes.sequence_parallel.record import SequenceParallelRecord
from passes.sequence_parallel.rewrite import Rewriter
from passes.sequence_parallel.zone import boundary_split, find_zone, tokens_of
from passes.tensor_parallel.record import LOOKUP_SUM, REGION_ENTRY, REGION_EXIT

__all__ = ["SequenceNotDivisible", "SequenceParallelRecord", "sequence_parallel"]

log = logging.getLogger(__name__)


class SequenceNotDivisible(PassError):
    """The sequence length is not a multiple of tp (sp cannot split it); raised unless the
    program is forward-only, where the pass steps aside and records why."""


# --- the pass -------------------------------------------------------------------------------

def sequence_parallel(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Split the activations between tensor-parallel regions along the sequence (see above)."""
    tp = ctx.plan.tp
    graph = gm.graph
    reduce_nodes, copies = _tensor_parallel_boundaries(gm)
    if not reduce_nodes and not copies:
        raise PassError(f"sequence_parallel (sp=on, tp={tp}): the graph has no tensor-parallel "
                        f"region to run between; fix: sp=off")
    tokens = tokens_of(graph, reduce_nodes)
    if tokens is None:
        raise PassError(f"sequence_parallel (sp=on, tp={tp}): cannot tell the (batch, seq) of "
                        f"the model's tokens from its inputs; fix: sp=off")
    if tokens.seq % tp:
        error = SequenceNotDivisible(
            f"sequence_parallel splits the sequence over tp: sequence length {tokens.seq} is not "
            f"divisible by tp={tp}; fix: a sequence length that is a multiple of {tp}, or sp=off")
        if not ctx.forward_only:
            raise error
        # A forward-only program (evaluation, generation) runs the tensor-parallel graph as
        # is: the same parameters and numbers, only the activations stay whole.
        log.warning("rank coordinates %s: %s; this forward runs without sp", ctx.coords, error)
        gm.meta[SP_RECORD] = SequenceParallelRecord(tp, tokens.batch, tokens.seq, (), (), (),
                                                    stepped_aside=str(error))
        return gm
    reduces = {}
    for node in reduce_nodes:
        split = boundary_split(node, tokens)
        if split is None:  # a reduction with no token dims (rare): it stays an all-reduce
            log.info("sequence_parallel: %s %s keeps its all-reduce", node.name, tensor_shape(node))
        else:
            reduces[node] = split
    zone, reads = find_zone(graph, reduces, copies, tokens)
    gm.meta[SP_RECORD] = Rewriter(gm, tp, tokens, zone).run(reads, copies)
    graph.lint()
    recompile(gm)
    return gm


def _tensor_parallel_boundaries(gm: fx.GraphModule) -> tuple[list[fx.Node], list[fx.Node]]:
    """From the tensor-parallel pass's record, in graph order: the all-reduces that close its
    regions (and sum its vocab-parallel lookups), and the copies that open them."""
    record = gm.meta.get(TP_RECORD)
    if record is None:
        raise PassError(f"sequence_parallel runs after tensor_parallel and reads its record "
                        f"gm.meta[{TP_RECORD!r}], which this graph lacks")
    order = {node.name: (i, node) for i, node in enumerate(gm.graph.nodes)}

    def nodes(*roles: str) -> list[fx.Node]:
        return [order[name][1] for name in sorted((c.node for c in record.inserted(*roles)),
                                                  key=lambda name: order[name][0])]

    return nodes(REGION_EXIT, LOOKUP_SUM), nodes(REGION_ENTRY)
