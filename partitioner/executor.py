"""The executor: compiles a program per input shape and runs it for `__call__` and `step`.

`Programs` compiles and caches this rank's program for each input shape (pure, before any
collective for the first one). `Executor` runs them: one stage as a plain call, several stages
through `runtime.pipeline.PipelineRunner` with the plan's schedule, microbatches and the loss
route; gradients are reduced by the state afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils import _pytree as pytree

from core import meta
from core.dropout import DropoutKey, drawing
from core.plan import Plan
from core.schedules import Action, schedule
from partitioner.batches import batch_size, input_leaves, on_device, split_batch, tile_batch
from partitioner.capture import Captured, input_key
from partitioner.compiler import compile_rank
from partitioner.loss_route import LossRouter, microbatch_loss
from partitioner.precision import capture_cast
from partitioner.state import LocalState
from passes.lowering.program import RankProgram
from runtime.compiled import CompiledGraphs
from runtime.context_parallel import gather_sequence
from runtime.failure import FailureWatch
from runtime.mesh import Mesh
from runtime.mixed_precision import DynamicLossScale
from runtime.pipeline import PipelineRunner

log = logging.getLogger("partitioner.api")


class Programs:
    """This rank's compiled programs, one per input shape; later shapes keep the first
    program's pipeline cut, so every parameter stays on its stage."""

    def __init__(self, model: nn.Module, plan: Plan, rank: int, device: torch.device) -> None:
        self._model_ref = [model]  # a list so nn.Module owners do not register it
        self.model_is_meta = any(p.is_meta for p in model.parameters())
        self.plan = plan
        self.rank = rank
        self.device = device
        self.first: RankProgram | None = None
        self.training: dict[tuple, RankProgram] = {}
        """Input key -> the plan's program (serves step and forward calls)."""
        self.forward_only: dict[tuple, RankProgram] = {}
        """Input key -> a forward-only program sp or cp stepped aside in (a sequence it cannot
        split: evaluation, generation); same parameters, same numbers."""
        self.group_names: dict[str, str] | None = None
        """This rank's process groups by mesh dim, once they exist: later programs are
        compiled with their collectives lowered onto them."""
        self.on_compile: Callable[[RankProgram], None] | None = None
        """Called with each program compiled after the first (binds the local tensors)."""

    def get(self, args: tuple, kwargs: dict, forward_only: bool = False) -> RankProgram:
        """The program for these input shapes, compiled at first use. For a forward-only call
        the passes may step aside where this shape cannot take the plan's split (sp on a
        sequence tp does not divide, with a warning); `step` keeps the plan and its error.
        Under dp a forward call holds the whole batch on every rank, so a training program
        that reduces statistics over dp does not serve it."""
        key = input_key(args, kwargs)
        program = (self.forward_only.get(key) if forward_only else None) or \
            self.training.get(key)
        if program is not None and not (forward_only and _makes_statistics_whole(program)):
            return program
        model = self._model_ref[0]
        capture_device = "meta" if self.model_is_meta else None

        def capture_at(call: tuple) -> Captured:
            return capture_cast(model, self.plan, *(on_device(call, capture_device)
                                                    if capture_device else call))

        captured = capture_at((args, kwargs))
        starts = (self.first.pipeline.stage_starts
                  if self.first is not None and self.first.pipeline else None)
        # Binding (LocalState.bind: the first program, then each through `on_compile`) lowers
        # the collectives onto this rank's groups and generates the code, once for both.
        bound = self.first is None or self.on_compile is not None
        program = compile_rank(captured, self.plan, self.rank, self.device, starts,
                               forward_only=forward_only, group_names=self.group_names,
                               capture_batch=lambda times: capture_at(
                                   tile_batch((args, kwargs), times)).gm,
                               reuse_graph=not captured.shared, generate_code=not bound)
        records = [program.stages[0].gm.meta.get(key) for key in (meta.SP_RECORD,
                                                                    meta.CP_RECORD)]
        statistics = program.stages[0].gm.meta.get(meta.STATISTICS_RECORD)
        if self.first is None:
            self.first = program
        elif self.on_compile is not None:
            self.on_compile(program)  # before it is kept: binding refuses moved layouts
        if any(r is not None and r.stepped_aside for r in records) or (
                statistics is not None and statistics.whole_batch_only):  # forward calls only
            self.forward_only[key] = program
        else:
            self.training[key] = program
        return program

    def explain_lines(self) -> list[str]:
        """The input shapes this rank has programs for: one line each, with what runs it."""
        lines = ["programs on this rank, by captured input shapes (step captures one "
                 "microbatch of this rank's share; a new shape is captured at its first call):"]
        for use, programs in (("step and forward", self.training),
                              ("forward only", self.forward_only)):
            lines += [f"  {_describe_key(key)}: {use}" for key in programs]
        return lines


def _describe_key(key: tuple) -> str:
    """`input_key`'s tensor leaves as `(4, 16) int64`, other leaves by value."""
    _, leaves = key
    return ", ".join(f"{tuple(leaf[1])} {str(leaf[2]).removeprefix('torch.')}"
                     if leaf[0] == "T" else repr(leaf[1]) for leaf in leaves)


def _makes_statistics_whole(program: RankProgram) -> bool:
    record = program.stages[0].gm.meta.get(meta.STATISTICS_RECORD)
    return record is not None and bool(record.statistics)


class Executor:
    """Runs this rank's programs for forward calls and training steps."""

    def __init__(self, plan: Plan, mesh: Mesh, device: torch.device, programs: Programs,
                 state: LocalState, losses: LossRouter, failures: FailureWatch) -> None:
        self.plan = plan
        self.failures = failures
        """Reports a failure while graphs run (after which peers may wait in a collective);
        checks that fail alike on every rank before any collective are not reported."""
        self.mesh = mesh
        self.device = device
        self.programs = programs
        self.state = state
        self.losses = losses
        self.last_pipeline_stats: dict[str, float] = {}
        """busy_s / wall_s of this rank's last pipelined step (the measured bubble)."""
        self.loss_scale = DynamicLossScale() if plan.loss_scale == "dynamic" else None
        """fp16's dynamic loss scale (None without loss_scale)."""
        self.last_step_skipped = False
        """Whether the last step overflowed under loss scaling (its gradients left None)."""
        self.last_action_s: dict[Action, float] = {}
        """Compute seconds of each of this rank's actions in its last pipelined step."""
        self.dropout_step = 0
        """The dropout generator's step counter (core/dropout.py): each step and each forward
        call in training mode draws its masks with it, then moves it on by one."""
        self.compiled = CompiledGraphs() if plan.compile else None
        """compile=on: every stage graph run through inductor at its first call."""
        self.eager_reason: str | None = None
        """compile=on, yet every graph runs eagerly: why (logged once)."""
        if plan.compile and plan.schedule in ("zb-h1", "zb-v") and plan.stages > 1:
            self.compiled, self.eager_reason = None, (
                f"schedule={plan.schedule} runs each backward as an input-gradient step and a "
                f"weight-gradient step, which one compiled backward does not give")
            log.warning("compile=on: every graph runs eagerly: %s", self.eager_reason)

    @contextlib.contextmanager
    def _running(self):
        """A failure while graphs run ends every rank (peers may wait in a collective)."""
        with self.failures.scope():
            yield

    def _run(self, gm, args: tuple, kwargs: dict):
        with self._running():
            if self.compiled is not None:
                return self.compiled(gm, lambda: _graph_name(0, args, kwargs), *args, **kwargs)
            return gm(*args, **kwargs)

    def _run_stage(self, stage, inputs: list[torch.Tensor]):
        with self._running():
            if self.compiled is not None:
                return self.compiled(
                    stage.gm, lambda: _graph_name(stage.index, inputs, {}), *inputs)
            return stage.gm(*inputs)

    def _runner(self, program: RankProgram, stages: list | None = None,
                keys: list[DropoutKey] | None = None) -> PipelineRunner:
        return PipelineRunner(program.pipeline, stages or program.stages, self.mesh.group("pp"),
                              self.mesh.ranks("pp"), self._run_stage, self.device,
                              forward_context=None if keys is None else
                              lambda microbatch: drawing(keys[microbatch]))

    def _dropout_keys(self, training: bool, first_samples: list[int]) -> list[DropoutKey]:
        """One key per microbatch of this call (its first sample in the global batch); a call in
        training mode uses the step counter and moves it on."""
        step = self.dropout_step
        if training:
            self.dropout_step += 1
        return [DropoutKey(step, first, training) for first in first_samples]

    def compile_lines(self) -> list[str]:
        """compile=on: each graph compiled so far, its compile time or why it runs eagerly."""
        if self.eager_reason is not None:
            return [f"compile=on: every graph runs eagerly: {self.eager_reason}"]
        if self.compiled is None:
            return []
        records = self.compiled.records()
        total = sum(record.compile_s for record in records)
        lines = [f"compile=on: {len(records)} graph(s) run so far, {total:.1f}s compiling"
                 + ("" if records else " (each graph compiles at its first call)")]
        return lines + [f"  {record.summary()}" for record in records]

    # --- forward ---------------------------------------------------------------------------
    def forward(self, args: tuple, kwargs: dict, training: bool = True):
        """The model's own output for any batch >= 1, on every rank (differentiable);
        dropout draws masks only when `training`."""
        args, kwargs = on_device((args, kwargs), self.device)
        self.state.gather()
        program = self.programs.get(args, kwargs, forward_only=True)
        (key,) = self._dropout_keys(training, [0])  # the whole batch on every rank
        if program.pipeline is not None:
            output = self._pipeline_forward(program, args, kwargs, key)
        else:
            with drawing(key):
                output = self._run(program.stages[0].gm, args, kwargs)
        return self._whole_sequences(program, output)

    def _whole_sequences(self, program: RankProgram, output):
        """Outputs holding this cp rank's tokens, gathered to the whole sequence."""
        record = program.stages[-1].gm.meta.get(meta.CP_RECORD)
        if record is None or not record.sharded_outputs:
            return output
        leaves, spec = pytree.tree_flatten(output)
        group = self.mesh.group_names()["cp"]
        leaves = [leaf if dim is None else
                  gather_sequence(leaf, dim, record.layout, group).narrow(dim, 0, record.length)
                  for leaf, dim in zip(leaves, record.outputs, strict=True)]
        return pytree.tree_unflatten(leaves, spec)

    def _pipeline_forward(self, program: RankProgram, args: tuple, kwargs: dict,
                          key: DropoutKey):
        """Forward only, one microbatch; the last stage's output broadcast over pp."""
        pipeline = program.pipeline
        actions = [Action("F", 0, stage.index) for stage in program.stages]
        with torch.no_grad():
            results = self._runner(program, keys=[key]).run(
                actions, [input_leaves(args, kwargs)], None)
        last_rank = self.mesh.ranks("pp")[pipeline.rank_of(pipeline.num_stages - 1)]
        leaves = []
        for index, shape_dtype in enumerate(pipeline.output_meta):
            if shape_dtype is None:
                leaves.append(pipeline.output_names[index])
                continue
            if results:
                tensor = results[0][index].contiguous()
            else:
                tensor = torch.empty(shape_dtype[0], dtype=shape_dtype[1], device=self.device)
            dist.broadcast(tensor, src=last_rank, group=self.mesh.group("pp"))
            leaves.append(tensor)
        return pytree.tree_unflatten(leaves, pipeline.out_spec)

    # --- step ------------------------------------------------------------------------------
    def step(self, args: tuple, kwargs: dict, target,
             parameters: Callable[[], list], training: bool = True) -> torch.Tensor:
        """Forward and backward over the global batch; returns its loss on every rank.

        Gradients equal the single-device gradients of that loss and accumulate into `.grad`
        of `parameters()` (the tensors the user sees) as `loss.backward()` would.
        """
        args, kwargs, target = on_device((args, kwargs, target), self.device)
        plan = self.plan
        dp, micro = plan.degree("dp"), plan.microbatches
        batch = batch_size(args, kwargs)
        if batch is None or batch % (dp * micro):
            raise ValueError(f"step needs a global batch divisible by dp*microbatches={dp}*"
                             f"{micro}={dp * micro}; got batch {batch}")
        ours = split_batch((args, kwargs, target), dp, batch)[self.mesh.coord("dp")]
        microbatches = split_batch(ours, micro, batch // dp)
        # each microbatch's masks are its rows' of the global batch's (core/dropout.py)
        keys = self._dropout_keys(training, [self.mesh.coord("dp") * (batch // dp)
                                             + index * (batch // (dp * micro))
                                             for index in range(micro)])
        self.state.gather()
        visible = parameters()
        stashed = [p.grad for p in visible]
        for p in visible:
            p.grad = None

        zeros = torch.zeros(3, dtype=torch.float64, device=self.device)
        totals = {"summary": zeros}  # [loss, tokens, token-weighted?] summed over microbatches

        program = self.programs.get(*microbatches[0][:2])
        cp = self.mesh.size("cp")
        record = program.stages[-1].gm.meta.get(meta.CP_RECORD)
        ignored = False
        if record is not None and record.sharded_outputs:
            # the outputs hold this rank's tokens: so do the targets
            microbatches = [(a, k, _our_tokens(t, record)) for a, k, t in microbatches]
            ignored = record.padding > 0 or any(
                bool((leaf == IGNORE_INDEX).any()) for leaf in pytree.tree_leaves(target)
                if isinstance(leaf, torch.Tensor) and not leaf.is_floating_point())
        route = self.losses.route(program, microbatches[0])
        loss_fn = route.loss_fn(self.losses.loss_fn)

        def scaled_loss(index: int, output) -> torch.Tensor:
            loss, tokens = microbatch_loss(output, microbatches[index][2], loss_fn)
            if tokens is None and ignored and loss_fn is not None:
                raise ValueError(
                    f"under cp={cp} each rank's loss_fn sees its own tokens, and a mean over "
                    f"them is exact only when every rank counts the same tokens: the targets "
                    f"hold ignored labels ({IGNORE_INDEX}, or padding: "
                    f"{record.padding} tokens were added so that the sequence splits). Return (loss_sum, token_count) from "
                    f"loss_fn (e.g. partitioner.check.lm_loss_sum) so the loss is weighted by "
                    f"the tokens of the whole batch")
            # a mean over this cp rank's tokens (equal counts), or a loss read whole on every
            # cp rank (its gradient partial over cp): either way 1/cp of it per rank
            scale = 1.0 if tokens is not None else 1.0 / (dp * micro * cp)
            row = torch.stack([loss.detach().double() * scale,
                               torch.as_tensor(0 if tokens is None else tokens,
                                               device=self.device).double(),
                               torch.tensor(float(tokens is not None), dtype=torch.float64,
                                            device=self.device)])
            totals["summary"] = totals["summary"] + row
            if self.loss_scale is not None:  # fp16: gradients scaled up, unscaled after
                scale = scale * self.loss_scale.scale
            return loss * scale

        if program.pipeline is None:
            for index, (mb_args, mb_kwargs, _) in enumerate(microbatches):
                with drawing(keys[index]):
                    output = self._run(route.stages[0].gm, mb_args, mb_kwargs)
                loss = scaled_loss(index, output)
                if index == len(microbatches) - 1:
                    self.state.arm_reducer()  # reduce buckets as backward fills them
                loss.backward()
        else:
            actions = schedule(plan.schedule, plan.pp, micro, plan.vpp)[self.mesh.coord("pp")]
            leaves = [input_leaves(a, k) for a, k, _ in microbatches]
            runner = self._runner(program, route.stages, keys)
            start = time.perf_counter()
            runner.run(
                actions, leaves, loss_of=lambda index, outputs: scaled_loss(
                    index, pytree.tree_unflatten(list(outputs), program.pipeline.out_spec)))
            self.last_pipeline_stats = {"busy_s": runner.busy_s,
                                        "wall_s": time.perf_counter() - start}
            self.last_action_s = dict(runner.action_s)
        self.state.reduce_gradients(program)

        summary = totals["summary"]
        for dim in ("pp", "dp", "cp"):  # only last stages hold losses; dp, cp ranks a share
            if self.mesh.group(dim) is not None:
                dist.all_reduce(summary, group=self.mesh.group(dim))
        loss = summary[0]
        divisor = 1.0
        if summary[2] > 0:  # token-weighted: divide by the tokens of the whole global batch
            count = summary[1]
            if count <= 0:
                raise ValueError("loss_fn reported no tokens in the whole batch")
            loss = loss / count
            divisor = count
        if self.loss_scale is not None:
            divisor = divisor * self.loss_scale.scale
            if self._skip_on_overflow(visible):
                return loss.to(_output_dtype(program))
        if summary[2] > 0 or self.loss_scale is not None:
            divisor = torch.as_tensor(divisor, device=self.device)
            for p in visible:
                if p.grad is not None:
                    p.grad.div_(divisor.to(p.grad.dtype))
        for p, old in zip(visible, stashed, strict=True):
            if old is not None:
                p.grad = old if p.grad is None else p.grad.add_(old)
        return loss.to(_output_dtype(program))


    def _skip_on_overflow(self, visible: list) -> bool:
        """fp16 loss scaling: an inf or NaN in any rank's reduced gradients skips this step
        (every gradient left None, so the user's opt.step() changes nothing) and lowers the
        scale; True when skipped (collective over the world)."""
        scaler = self.loss_scale
        overflow = scaler.overflowed([p.grad for p in visible if p.grad is not None],
                                     self.device)
        old_scale = scaler.scale
        scaler.update(overflow)
        self.last_step_skipped = overflow
        if overflow:
            for p in visible:
                p.grad = None
            log.warning("step skipped: gradients overflowed at loss scale %g; the scale is now "
                        "%g", old_scale, scaler.scale)
        return overflow


def _graph_name(stage: int, args, kwargs) -> str:
    """A stage graph as compile reports name it: its stage and its input shapes."""
    shapes = [tuple(leaf.shape) for leaf in pytree.tree_leaves((args, kwargs))
              if isinstance(leaf, torch.Tensor)]
    return f"stage {stage} {' '.join('x'.join(map(str, s)) or 'scalar' for s in shapes)}"


IGNORE_INDEX = -100
"""The ignored label of torch's cross_entropy and of Hugging Face models."""


def _our_tokens(target, record):
    """This cp rank's tokens of every target tensor whose dim 1 is the sequence (padded
    tokens, when the sequence was padded to split, get ignored labels)."""
    layout = record.layout

    def shard(leaf):
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 2 and leaf.shape[1] == record.length:
            if record.padding:
                ends = [0, 0] * (leaf.dim() - 2) + [0, record.padding]
                fill = 0 if leaf.is_floating_point() else IGNORE_INDEX
                leaf = torch.nn.functional.pad(leaf, ends, value=fill)
            return layout.shard(leaf, 1, record.rank)
        return leaf
    return pytree.tree_map(shard, target)


def _output_dtype(program: RankProgram) -> torch.dtype:
    """The dtype `step` returns its loss in: the model output's floating dtype."""
    metas = (program.pipeline.output_meta if program.pipeline is not None else
             [(None, n.meta["val"].dtype) for n in program.stages[0].gm.graph.nodes
              if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)])
    for shape_dtype in metas:
        if shape_dtype is not None and shape_dtype[1].is_floating_point:
            return shape_dtype[1]
    return torch.float32
