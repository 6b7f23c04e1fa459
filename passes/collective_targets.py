"""The collective ops the sharding passes insert, named in one place.

The passes put these callables into the graph as call targets (they never call them); the
runtime implements them. This is the one import of the runtime left under passes/: when the ops
are declared in core (torch.library schemas with the same argument order), this import is the
line that changes.
"""

from runtime.collectives import (all_gather, all_reduce, copy_to_region, gather_for_region,
                                 reduce_scatter, scatter)

KINDS = {all_gather: "all_gather", all_reduce: "all_reduce", copy_to_region: "copy_to_region",
         gather_for_region: "gather_for_region", reduce_scatter: "reduce_scatter",
         scatter: "scatter"}
"""Target -> the name the passes' records give its kind."""
