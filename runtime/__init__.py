"""Runtime: process groups, collectives, data/pipeline parallel execution, kernels.

`runtime.spawn(world_size, fn, *args)` runs `fn` on local gloo ranks (tests, demo, benchmarks).
Kernels live in `runtime.kernels`; Triton is imported only where a kernel runs.
"""

from runtime.launch import RankError, RankPool, spawn
# What the ops of core.ops do (collectives, kernel dispatch, checkpointed attention), registered
# with torch.library by importing these: every program the passes build runs once the runtime
# is imported, whichever of its parts the caller imported.
from runtime import collectives as _collectives, recompute as _recompute  # noqa: F401, E402
from runtime import context_parallel as _context_parallel  # noqa: F401, E402
from runtime import dropout as _dropout  # noqa: F401, E402
from runtime import async_tp as _async_tp  # noqa: F401, E402
from runtime import expert_parallel as _expert_parallel  # noqa: F401, E402

__all__ = ["RankError", "RankPool", "spawn"]
