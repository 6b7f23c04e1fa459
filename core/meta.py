"""Names of the metadata keys the passes write, in one place (namespaced by the writer).

Node keys live in `node.meta`, graph keys in `gm.meta`. A pass reads what an earlier pass
recorded through these names, never by matching the graph's shape.
"""

VAL = "val"
"""node: the FakeTensor capture recorded (torch.export's own key)."""
NN_MODULE_STACK = "nn_module_stack"
"""node: the module path the node came from (torch.export's own key)."""

TP_PLACEMENT = "tp.placement"
"""node: how the value is laid over the tp group after the TP/SP passes."""
COLLECTIVE = "collective"
"""node: the collective an inserted node performs, where its target does not say."""
PP_STAGE = "pp.stage"
"""node: the pipeline stage (virtual stage index) a computing node runs in."""
RECOMPUTE = "recompute.region"
"""node: the recompute region a node belongs to ("selective", "full", "sp"). Not torch's own
"recompute" key, which AOTAutograd reads as a CheckpointPolicy when the graph is compiled."""
CP_DIM = "cp.dim"
"""node: the dim of a value holding this cp rank's tokens (an int), or its flattened
(batch*seq) rows (passes.context_parallel.shard.Rows), as the cp pass sharded it."""
DROPOUT = "dropout"
"""node: the dropout a `partitioner.dropout_mask` node draws for (the captured node's name)."""
KERNEL = "kernel"
"""node: the runtime kernel the kernels pass pointed the node at."""

LAYOUTS = "partitioner.layouts"
"""graph: canonical name -> core.placement.ParamLayout, for every parameter and buffer."""
PASS_LOG = "passes.log"
"""graph: what the pass registry ran, in order (a tuple of passes.registry.PassOutcome)."""

# Each pass's result record (graph keys): a value with `summary() -> str` (or a str) that the
# passes after it read and `dump --passes` prints.
CAUSAL_MASK_RECORD = "causal_mask.record"
STATISTICS_RECORD = "statistics.record"
"""graph: the reductions over the batch's tokens made whole over dp (BatchStatisticsRecord)."""
TP_RECORD = "tp.record"
"""graph: what the tensor-parallel pass split and inserted (TensorParallelRecord)."""
SP_RECORD = "sp.record"
"""graph: what the sequence-parallel pass split and inserted (SequenceParallelRecord)."""
ASYNC_TP_RECORD = "async_tp.record"
"""graph: the collectives async TP fused with their linears (AsyncTensorParallelRecord)."""
CP_RECORD = "cp.record"
"""graph: what the context-parallel pass sharded, replaced and gathered (ContextParallelRecord)."""
EP_RECORD = "ep.record"
"""graph: the MoE layers the expert-parallel pass found and dispatched (ExpertParallelRecord)."""
MIXED_PRECISION_RECORD = "mixed_precision.record"
"""graph: the ops the mixed-precision pass keeps in fp32 (MixedPrecisionRecord)."""
DROPOUT_RECORD = "dropout.record"
"""graph: the dropouts put on the plan's counter generator (passes.dropout.DropoutRecord)."""
PP_SPLIT_RECORD = "pp.split"
"""graph: the pipeline split's segments and the stage cut it chose."""
RECOMPUTE_RECORD = "recompute.record"
KERNELS_RECORD = "kernels.record"
DEVICE_RECORD = "device.record"
PIPELINE_RECORD = "lowering.pipeline"
"""graph: the lowered pipeline (who makes and who reads each value crossing a stage)."""
LOWERED_COLLECTIVES = "lowering.collectives"
"""graph: passes.lowering.collectives.LoweredCollectives, the groups fixed in the collectives."""
