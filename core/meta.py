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
RECOMPUTE = "recompute"
"""node: the recompute region a node belongs to."""
KERNEL = "kernel"
"""node: the runtime kernel the kernels pass pointed the node at."""

LAYOUTS = "partitioner.layouts"
"""graph: canonical name -> core.placement.ParamLayout, for every parameter and buffer."""
PP_SEGMENTS = "pp.segments"
"""graph: the pipeline split's segment names in graph order."""
PP_CUT = "pp.cut"
"""graph: the stage cut the pipeline split chose."""
LOWERED_COLLECTIVES = "lowering.collectives"
"""graph: passes.lowering.collectives.LoweredCollectives, the groups fixed in the collectives."""
