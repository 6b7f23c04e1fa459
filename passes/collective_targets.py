"""The collective ops the sharding passes insert, named in one place.

The passes put these callables into the graph as call targets (they never call them); the
runtime implements them. This is the one import of the runtime left under passes/: when the ops
are declared in core (torch.library schemas with the same argument order), this import is the
line that changes.
"""

from runtime.collectives import (all_gather, all_reduce, copy_to_region,  # noqa: F401
                                 gather_for_region, reduce_scatter, scatter)
