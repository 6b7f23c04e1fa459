"""fx rewrite passes: each a function `(GraphModule, PassContext) -> GraphModule`.

`run_passes` applies them in the fixed order of DESIGN.md (tp -> sp -> cp -> ep -> pp_split),
after folding constant causal masks into SDPA (passes.causal_mask), and
names the failing pass, the passes that ran before it and the node, the way torch.fx's
PassManager does. Passes are pure functions of the graph, the plan and this rank's coordinates:
nothing here touches a process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import fx

from core.plan import Plan


@dataclass(frozen=True)
class PassContext:
    plan: Plan
    """The resolved plan (dp filled in)."""
    coords: dict
    """This rank's coordinate along every mesh dimension, e.g. {"tp": 0, "dp": 1, "pp": 0}."""
    stage_starts: tuple[str, ...] | None = None
    """The segment each pipeline stage starts with, from an earlier program of the same model:
    every input shape must put each parameter on the same stage, so later programs reuse the
    first program's cut instead of choosing one from their own costs."""
    forward_only: bool = False
    """The program serves forward calls only (`ParallelModel.__call__`), never `step`: a pass
    whose split this input shape cannot take for training may step aside for it (sp on a
    length tp does not divide) and say so in its record, instead of raising."""
    group_names: dict[str, str] | None = None
    """Mesh dimension -> the c10d name of this rank's process group along it (dimensions of
    size > 1), given by the runtime when it lowers its own program; None (dump, reports)
    leaves collectives naming their mesh dimension."""


class PassError(ValueError):
    """A pass could not apply; the message lists every broken rule and the fix."""


Pass = Callable[[fx.GraphModule, PassContext], fx.GraphModule]


def pass_pipeline(plan: Plan) -> list[tuple[str, Pass]]:
    """The passes this plan needs, in order (a strategy not built yet is refused before, by
    `Plan.refuse_pending`)."""
    from passes.causal_mask import fold_causal_masks

    passes: list[tuple[str, Pass]] = [("causal_mask", fold_causal_masks)]
    if plan.tp > 1:
        from passes.tensor_parallel import tensor_parallel  # imports runtime op names

        passes.append(("tensor_parallel", tensor_parallel))
        if plan.sp:
            from passes.sequence_parallel import sequence_parallel

            passes.append(("sequence_parallel", sequence_parallel))
    if plan.stages > 1:
        from passes.pipeline_split import pipeline_split  # reads the cost model

        passes.append(("pipeline_split", pipeline_split))
    if plan.recompute != "none":
        from passes.recompute import recompute

        passes.append(("recompute", recompute))
    return passes


def run_passes(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    ctx.plan.refuse_pending()
    done: list[str] = []
    for name, fn in pass_pipeline(ctx.plan):
        try:
            gm = fn(gm, ctx)
        except (PassError, NotImplementedError):
            raise
        except Exception as error:  # noqa: BLE001 - re-raised with the pass named
            after = f" after {', '.join(done)}" if done else ""
            raise PassError(f"An error occurred when running the {name!r} pass{after}: "
                            f"{type(error).__name__}: {error}") from error
        done.append(name)
    return gm
