"""fx rewrite passes: each a function `(GraphModule, PassContext) -> GraphModule`.

`passes.registry` holds the whole pipeline as one ordered list and runs it. Passes are pure
functions of the graph, the plan and this rank's coordinates: nothing here touches a process
group. This module holds what every pass shares: its context, its error and `recompile`.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable

import torch
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
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """The device this rank runs on: factory ops of the captured graph are moved to it."""
    capture_batch: Callable[[int], fx.GraphModule] | None = None
    """The same model captured with the batch of its inputs `k` times larger (the shape of k
    dp ranks' shares together): how passes/batch_statistics tells which dims and constants
    of the graph count the batch's tokens. None where no model is at hand."""


class PassError(ValueError):
    """A pass could not apply; the message lists every broken rule and the fix."""


Pass = Callable[[fx.GraphModule, PassContext], fx.GraphModule]


_stale: ContextVar[set | None] = ContextVar("stale_graph_modules", default=None)


def recompile(gm: fx.GraphModule) -> None:
    """Regenerate `gm`'s Python code after a pass rewrote its graph.

    Inside `deferred_recompile` (the registry runs every pass in one) this only marks `gm`:
    code generation walks the whole graph, costs about what a pass does, and only the last
    pass's result is ever run. A pass called on its own recompiles at once."""
    stale = _stale.get()
    if stale is None:
        gm.recompile()
    else:
        stale.add(gm)


@contextlib.contextmanager
def deferred_recompile(stale: set | None = None):
    """Passes run inside mark the graph modules they rewrite instead of recompiling them;
    yields the set of marked modules (`stale`, or a new set), which the caller recompiles
    once at the end (those still part of its result: a graph a later pass replaced is never
    run)."""
    stale = set() if stale is None else stale
    token = _stale.set(stale)
    try:
        yield stale
    finally:
        _stale.reset(token)


def recompile_stale(root: fx.GraphModule, stale: set) -> None:
    """Regenerate the code of each graph module under `root` (itself included) that is in
    `stale`, once: fx's `recompile` regenerates a graph module's graph-module children with
    it, so a stale module under a stale parent is done by the parent's."""
    done: set = set()
    for module in root.modules():  # parents before their children
        if module in stale and module not in done:
            module.recompile()
            done.update(_recompiled_with(module))


def _recompiled_with(gm: fx.GraphModule):
    yield gm
    for child in gm.children():
        if isinstance(child, fx.GraphModule):
            yield from _recompiled_with(child)
