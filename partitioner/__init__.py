"""partitioner: parallelize an ordinary PyTorch model by compiling its captured graph.

    from partitioner import parallelize, Plan
    pm = parallelize(model, Plan(tp=2, pp=2), example_inputs=(ids,))
"""

from partitioner.plan import Plan, PlanError

__all__ = ["Plan", "PlanError", "parallelize", "ParallelModel"]


def __getattr__(name: str):
    # The API pulls in passes and the runtime; import it on first use so that
    # `partitioner.plan` stays importable from passes without a cycle.
    if name in ("parallelize", "ParallelModel"):
        from partitioner import api

        return getattr(api, name)
    raise AttributeError(f"module 'partitioner' has no attribute {name!r}")
