"""Runtime: process groups, collectives, data/pipeline parallel execution, kernels.

`runtime.spawn(world_size, fn, *args)` runs `fn` on local gloo ranks (tests, demo, benchmarks).
Kernels live in `runtime.kernels` and are imported only where used.
"""

from runtime.launch import RankError, spawn

__all__ = ["RankError", "spawn"]
