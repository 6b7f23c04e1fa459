"""The pass pipeline, as one ordered list that `partitioner dump --passes` prints.

batch statistics -> causal-mask fold -> tp -> sp -> cp -> ep -> dropout -> mixed precision -> pp
split -> recompute -> kernels -> device -> async tp (sp's collectives fused with their linears)
-> collectives (each collective's process group fixed) -> lowering (the stages cut apart). Each
entry is a pure `(GraphModule, PassContext) -> GraphModule` with the condition under which a
plan needs it. A pass writes its result record into `gm.meta` under the key its entry names
(core.meta): a value with `summary() -> str`, or a str (`Record`); the passes after
it read that record instead of re-deriving it from the graph, and `run_passes` logs one
`PassOutcome` per entry in `gm.meta["passes.log"]` (with the pass's wall time). Passes mark the
graph modules they rewrite (`passes.recompile`) and `run_passes` regenerates the code of those
in its result once, at the end.

A failing pass is named with the passes that ran before it, the way torch.fx's PassManager
does; a `PassError` (every broken rule and its fix) and a `NotImplementedError` pass through as
they are. A strategy whose pass has not landed would be listed with no function: plans
asking for it are refused by `Plan.refuse_pending` before any pass runs.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Protocol

from torch import fx

from core import meta
from core.plan import Plan
from core.precision import compute_dtype
from passes import Pass, PassContext, PassError, deferred_recompile, recompile_stale
from passes.async_tp import async_tensor_parallel
from passes.batch_statistics import batch_statistics
from passes.causal_mask import fold_causal_masks
from passes.context_parallel import context_parallel
from passes.expert_parallel import expert_parallel
from passes.device import retarget_device
from passes.dropout import dropout
from passes.kernels import use_kernels
from passes.lowering.collectives import lower_collectives
from passes.lowering.stages import lower_stages
from passes.mixed_precision import keep_fp32
from passes.pipeline_split import pipeline_split
from passes.recompute import recompute
from passes.sequence_parallel import sequence_parallel
from passes.tensor_parallel import tensor_parallel


class Record(Protocol):
    """What a pass leaves in `gm.meta` for the passes after it and for `dump --passes`."""

    def summary(self) -> str:
        """One line: what the pass did (e.g. "14 params sharded, 5 regions, 9 collectives")."""


@dataclass(frozen=True)
class PassEntry:
    name: str
    run: Pass | None
    """The pass; None while its strategy has not landed."""
    applies: Callable[[Plan], bool]
    """Whether a plan needs this pass."""
    when: str
    """`applies` in words, for the printed pipeline."""
    record: str | None = None
    """The `gm.meta` key (core.meta) the pass writes its record under."""


@dataclass(frozen=True)
class PassOutcome:
    """What one registry entry did for one rank's program."""

    name: str
    status: str
    """"ran", "skipped" (the plan does not need it) or "not landed"."""
    summary: str
    seconds: float = 0.0
    """Wall time the pass took (0 when it did not run)."""

    def __str__(self) -> str:
        took = f"{self.seconds * 1e3:7.1f} ms" if self.status == "ran" else " " * 10
        return f"{self.name:<18} {self.status:<10} {took}  {self.summary}"


# --- adapters for passes that leave only node metadata ---------------------------------------
# recompute and kernels mark the nodes they rewrite (meta.RECOMPUTE, meta.KERNEL); until
# they write their own records, these adapters read those marks into one.

@dataclass(frozen=True)
class RecomputeRecord:
    mode: str
    regions: int
    """Attention calls recomputed (selective) or checkpointed blocks (full)."""

    def summary(self) -> str:
        what = "attention cores recomputed in backward" if self.mode == "selective" else \
            "blocks checkpointed, only their inputs kept"
        return f"{self.mode}: {self.regions} {what}"


@dataclass(frozen=True)
class KernelsRecord:
    kernels: tuple[tuple[str, int], ...]
    """(runtime kernel, nodes pointed at it), most used first."""

    def summary(self) -> str:
        total = sum(count for _, count in self.kernels)
        uses = ", ".join(f"{name} x{count}" for name, count in self.kernels)
        return f"{total} ops pointed at runtime kernels" + (f": {uses}" if uses else "")


def _recompute(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    gm = recompute(gm, ctx)
    mode = ctx.plan.recompute
    regions = sum(node.meta.get(meta.RECOMPUTE) == mode for node in gm.graph.nodes)
    gm.meta[meta.RECOMPUTE_RECORD] = RecomputeRecord(mode, regions)
    return gm


def _kernels(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    gm = use_kernels(gm, compiled=ctx.plan.compile)
    used = Counter(node.meta[meta.KERNEL] for module in gm.modules()
                   if isinstance(module, fx.GraphModule)
                   for node in module.graph.nodes if meta.KERNEL in node.meta)
    gm.meta[meta.KERNELS_RECORD] = KernelsRecord(tuple(used.most_common()))
    return gm


def _always(plan: Plan) -> bool:
    return True


PIPELINE: tuple[PassEntry, ...] = (
    PassEntry("batch_statistics", batch_statistics, lambda plan: (plan.dp or 1) > 1,
              "dp > 1", meta.STATISTICS_RECORD),
    PassEntry("causal_mask", fold_causal_masks, _always, "always",
              meta.CAUSAL_MASK_RECORD),
    PassEntry("tensor_parallel", tensor_parallel, lambda plan: plan.tp > 1, "tp > 1",
              meta.TP_RECORD),
    PassEntry("sequence_parallel", sequence_parallel, lambda plan: plan.sp, "sp=on",
              meta.SP_RECORD),
    PassEntry("context_parallel", context_parallel, lambda plan: plan.cp > 1, "cp > 1",
              meta.CP_RECORD),
    PassEntry("expert_parallel", expert_parallel, lambda plan: plan.ep > 1, "ep > 1",
              meta.EP_RECORD),
    PassEntry("dropout", dropout, _always, "always", meta.DROPOUT_RECORD),
    PassEntry("mixed_precision", keep_fp32, lambda plan: compute_dtype(plan) is not None,
              "param_dtype=bf16|fp16", meta.MIXED_PRECISION_RECORD),
    PassEntry("pipeline_split", pipeline_split, lambda plan: plan.stages > 1, "pp*vpp > 1",
              meta.PP_SPLIT_RECORD),
    PassEntry("recompute", _recompute, lambda plan: plan.recompute != "none",
              "recompute != none", meta.RECOMPUTE_RECORD),
    PassEntry("kernels", _kernels, _always, "always", meta.KERNELS_RECORD),
    PassEntry("device", retarget_device, _always, "always", meta.DEVICE_RECORD),
    PassEntry("async_tp", async_tensor_parallel, lambda plan: plan.async_tp, "async_tp=on",
              meta.ASYNC_TP_RECORD),
    PassEntry("collectives", lower_collectives, _always,
              "always; fixes process groups when the runtime gives them (dump keeps mesh dims)",
              meta.LOWERED_COLLECTIVES),
    PassEntry("lowering", lower_stages, lambda plan: plan.stages > 1, "pp*vpp > 1",
              meta.PIPELINE_RECORD),
)
"""The whole pipeline, in order."""


def planned(plan: Plan) -> list[PassEntry]:
    """The entries `plan` runs, in order."""
    return [entry for entry in PIPELINE if entry.run is not None and entry.applies(plan)]


def summarize(record: Record | str | None) -> str:
    """A record's one line (a `Record`, a str, or nothing recorded)."""
    if record is None:
        return "(no record)"
    if isinstance(record, str):
        return record
    return record.summary()


def run_passes(gm: fx.GraphModule, ctx: PassContext, *,
               stale: set | None = None) -> fx.GraphModule:
    """Every entry the plan needs, in order; one PassOutcome per entry in gm.meta.

    `stale`: the caller generates the code itself, after rewriting the result further (the
    runtime lowers its first program onto process groups made after it): the graph modules
    the passes rewrote are added to this set instead of recompiled."""
    ctx.plan.refuse_pending()
    with deferred_recompile(stale) as marked:
        gm = _run_entries(gm, ctx)
    if stale is None:
        recompile_stale(gm, marked)  # once, each graph module of the result a pass rewrote
    return gm


def _run_entries(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    outcomes: list[PassOutcome] = []
    done: list[str] = []
    for entry in PIPELINE:
        if entry.run is None:
            outcomes.append(PassOutcome(entry.name, "not landed", f"({entry.when} is refused "
                                                                  f"by the plan until it lands)"))
            continue
        if not entry.applies(ctx.plan):
            outcomes.append(PassOutcome(entry.name, "skipped", f"(runs when {entry.when})"))
            continue
        start = time.perf_counter()
        try:
            gm = entry.run(gm, ctx)
        except (PassError, NotImplementedError):
            raise
        except Exception as error:  # noqa: BLE001 - re-raised with the pass named
            after = f" after {', '.join(done)}" if done else ""
            raise PassError(f"An error occurred when running the {entry.name!r} pass{after}: "
                            f"{type(error).__name__}: {error}") from error
        done.append(entry.name)
        record = gm.meta.get(entry.record) if entry.record else None
        outcomes.append(PassOutcome(entry.name, "ran", summarize(record),
                                    time.perf_counter() - start))
    gm.meta[meta.PASS_LOG] = tuple(outcomes)
    return gm
