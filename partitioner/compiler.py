"""Compile one rank: a captured graph + a resolved plan + a rank -> that rank's program.

A straight line: copy the captured graph, seed the parameter layouts (everything replicated,
with the capture's tied names), run the pass registry (passes.registry), read the program off
the result (passes.lowering.program.RankProgram). Pure: no process group and no memory (the
graph holds meta tensors), so `dump` builds every rank's program in one process and the
runtime builds only its own.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable

import torch
from torch import fx, nn

from core import meta
from core.layout import RankLayout, rank_coords
from core.placement import ParamLayout
from core.plan import Plan
from partitioner.batches import first_microbatch, tile_batch
from partitioner.capture import Captured
from partitioner.precision import capture_cast
from passes import PassContext
from passes.lowering.program import RankProgram
from passes.registry import run_passes


def layouts_from_capture(captured: Captured) -> dict[str, ParamLayout]:
    """Every parameter and buffer replicated: the layout before any sharding pass."""
    aliases: dict[str, list[str]] = {}
    for alias, target in captured.aliases.items():
        aliases.setdefault(target, []).append(alias)
    layouts = {}
    for name, (shape, dtype, requires_grad) in captured.params.items():
        layouts[name] = ParamLayout(name, tuple(shape), dtype, requires_grad,
                                    aliases=tuple(aliases.get(name, ())))
    for name, (shape, dtype, persistent) in captured.buffers.items():
        layouts[name] = ParamLayout(name, tuple(shape), dtype, False,
                                    aliases=tuple(aliases.get(name, ())), is_buffer=True,
                                    persistent=persistent)
    return layouts


def compile_rank(captured: Captured, plan: Plan, rank: int, device: torch.device | str = "cpu",
                 stage_starts: tuple[str, ...] | None = None, *, forward_only: bool = False,
                 group_names: dict[str, str] | None = None,
                 capture_batch: Callable[[int], fx.GraphModule] | None = None,
                 reuse_graph: bool = False, generate_code: bool = True) -> RankProgram:
    """Run the pass registry for one rank and read its program (pure, no groups).

    `stage_starts` (an earlier program's `pipeline.stage_starts`) fixes the pipeline cut, so
    every input shape of one model keeps each parameter on the same stage. `forward_only`,
    `group_names` and `capture_batch` (the model captured at k times the batch) go to the
    passes through `PassContext`. `reuse_graph`: the caller never uses `captured` again, so
    the passes rewrite its graph module itself instead of a copy (copying the nodes and their
    metadata, and generating the copy's code, cost about what all the passes do).
    `generate_code=False`: the caller rewrites the stages further before they run (the
    runtime lowers its first program's collectives onto process groups made after it) and
    calls `program.generate_code()` then; the program lists what is stale in `stale`. Only
    this rank's stages are regenerated (another pp rank's are never run here).
    """
    coords = rank_coords(plan, rank)
    if reuse_graph and captured.shared:
        raise ValueError("reuse_graph=True on a shared capture (shared_captures): other "
                         "programs compile the same graph; compile a copy")
    if reuse_graph:
        gm = captured.gm
    else:
        with warnings.catch_warnings():  # torch's pytree spec deprecation, raised by deepcopy
            warnings.simplefilter("ignore", FutureWarning)
            gm = copy.deepcopy(captured.gm)
    # The graph alone cannot tell a tied alias from an unused parameter: the capture can.
    gm.meta[meta.LAYOUTS] = layouts_from_capture(captured)
    ctx = PassContext(plan=plan, coords=coords, stage_starts=stage_starts,
                      forward_only=forward_only, group_names=group_names,
                      device=torch.device(device), capture_batch=capture_batch)
    stale: set = set()
    gm = run_passes(gm, ctx, stale=stale)
    program = RankProgram.read(gm, plan, rank, coords)
    program.stale = {module for stage in program.stages for module in stage.gm.modules()
                     if module in stale}
    if generate_code:
        program.generate_code()
    return program


def rank_programs(model: nn.Module, plan: Plan, example_inputs: tuple,
                  example_kwargs: dict | None = None, ranks=None) -> list[RankProgram]:
    """Every rank's program, in one process with no process group (the CLI's `dump`).

    The example inputs are one global batch; each rank's program is compiled at the
    microbatch shape it would run in `step`.
    """
    inputs = first_microbatch(plan, tuple(example_inputs), dict(example_kwargs or {}))
    captured = capture_cast(model, plan, *inputs)
    world = RankLayout.dense(plan).world_size
    return [compile_rank(captured, plan, rank, "meta",
                         capture_batch=lambda times: capture_cast(
                             model, plan, *tile_batch(inputs, times)).gm)
            for rank in (range(world) if ranks is None else ranks)]
