"""partitioner: parallelize an ordinary PyTorch model by compiling its captured graph.

    from partitioner import parallelize, Plan
    pm = parallelize(model, Plan(tp=2, pp=2), example_inputs=(ids,))
"""

from core.plan import Plan, PlanError

__all__ = ["Plan", "PlanError", "parallelize", "ParallelModel"]


def __getattr__(name: str):
    # The API pulls in torch, the passes and the runtime; import it on first use so that
    # `partitioner plan` (the cost model alone) starts without them.
    if name in ("parallelize", "ParallelModel"):
        from partitioner import api

        return getattr(api, name)
    raise AttributeError(f"module 'partitioner' has no attribute {name!r}")
