"""The public face: `parallelize(model, plan, ...) -> ParallelModel`.

Phases, in a straight line: resolve the plan for the world -> capture the model at the
microbatch shape -> compile this rank's program (the pass registry, pure) -> build the process
groups -> materialize this rank's local tensors -> bind them into the program. Every check on
the plan and the model runs before the first collective, so a bad input fails the same way on
every rank instead of hanging.

`ParallelModel` composes three parts: the executor (partitioner/executor.py: programs per input
shape, forward calls, pipelined steps), the local state (partitioner/state.py: shards, gradient
reduction, norms, state dicts) and the loss route (partitioner/loss_route.py).
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from core.plan import Plan, PlanError, coerce_plan
from core.schedules import schedule, timeline
from partitioner import checkpoint, parallel_state
from partitioner.batches import batch_size, first_microbatch
from partitioner.executor import Executor, Programs
from partitioner.loss_route import LossFn, LossRouter
from partitioner.precision import check_model as check_precision
from partitioner.report.program import explain
from partitioner.state import LocalState
from runtime.expert_parallel import RECEIVED
from runtime.failure import watch_failures
from runtime.mesh import Mesh, default_device


def parallelize(model: nn.Module, plan: "Plan | str | dict", example_inputs: tuple = (),
                example_kwargs: dict | None = None, loss_fn: LossFn | None = None, *,
                device: torch.device | str | None = None) -> "ParallelModel":
    """Compile `model` for this rank under `plan` ("auto" asks the cost model for one).

    Must run on every rank of an initialized torch.distributed world (torchrun, or
    `runtime.spawn` for CPU ranks). `example_inputs`/`example_kwargs` are one global batch,
    the same on every rank.
    """
    if not dist.is_initialized():
        raise RuntimeError("parallelize needs torch.distributed to be initialized: launch with "
                           "torchrun, or use runtime.spawn(world_size, fn) for CPU ranks")
    world_size = dist.get_world_size()
    if isinstance(plan, str) and plan.strip() == "auto":
        plan = _auto_plan(model, world_size, example_inputs)
    plan = coerce_plan(plan).resolve(world_size)
    plan.refuse_pending()
    return ParallelModel(model, plan, tuple(example_inputs), dict(example_kwargs or {}),
                         loss_fn, device=device)


def _auto_plan(model: nn.Module, world_size: int, example_inputs: tuple) -> Plan:
    from cost_model.search import auto_plan
    from cost_model import TransformerShape

    config = getattr(model, "config", None)
    if config is None:
        raise PlanError("plan='auto' needs a transformer shape: the model has no `.config`; "
                        "pass a Plan instead")
    batch, seq = batch_size(example_inputs, {}), example_inputs[0].shape[-1]
    shape = TransformerShape.from_gpt_config(config)
    # Experts whole on their ranks (etp=1) is the expert parallelism that has landed for any
    # tp; a pick that still asks for something pending is searched again without ep.
    plan = None
    for fixed in ({"etp": 1}, {"ep": 1}):
        fields = auto_plan(shape, world_size, _hardware_name(), global_batch=batch, seq=seq,
                           fixed=fixed)
        plan = coerce_plan({k: v for k, v in fields.items() if k != "dp"})
        if not plan.pending():
            break
    return plan


def _hardware_name() -> str:
    """This rank's device as a cost-model profile name ('H100', 'A100-80G', ..., 'cpu')."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name()
    for known in ("H200", "H800", "H100"):
        if known in name:
            return known
    if "A100" in name:
        memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        return "A100-80G" if memory_gib > 50 else "A100-40G"
    raise PlanError(f"plan='auto' has no cost profile for {name!r}; write one with "
                    f"`python tools/calibrate.py` or pass a Plan")


class ParallelModel(nn.Module):
    """One rank's share of a parallelized model; see DESIGN.md, "Semantics"."""

    def __init__(self, model: nn.Module, plan: Plan, example_inputs: tuple, example_kwargs: dict,
                 loss_fn: LossFn | None, device=None) -> None:
        super().__init__()
        self.plan = plan
        self.device = torch.device(device) if device is not None else default_device()
        self.rank = dist.get_rank()

        # 1-3: everything that can reject the inputs runs before the first collective.
        check_precision(model, plan)
        programs = Programs(model, plan, self.rank, self.device)
        self.program = programs.get(*first_microbatch(plan, example_inputs, example_kwargs))

        # 4: process groups (collective); Megatron-style getters describe them from now on.
        self.mesh = Mesh(plan, self.rank)
        programs.group_names = self.mesh.group_names()
        parallel_state.install(self.mesh)
        # A failure on this rank from now on ends every rank (runtime/failure.py).
        self.failures = watch_failures()
        # 5-6: this rank's tensors, bound into the program (and every later one).
        self.state = LocalState(self.program, self.mesh, model, programs.model_is_meta,
                                self.device, zero=bool(plan.zero))
        self.store = self.state.store  # registered: the local tensors are this module's
        programs.on_compile = self.state.bind
        self.losses = LossRouter(loss_fn, self.mesh, self.state, self.rank, self.device)
        self.executor = Executor(plan, self.mesh, self.device, programs, self.state,
                                 self.losses, self.failures)
        self.last_expert_rows: list[list[int]] = []
        """Rows this rank's experts received in the last step, one list per dispatch (ep)."""

    def forward(self, *args, **kwargs):
        """The model's own output for any batch >= 1, on every rank (differentiable)."""
        return self.executor.forward(args, kwargs, training=self.training)

    def step(self, *args, target=None, **kwargs) -> torch.Tensor:
        """Forward and backward over the global batch; returns its loss on every rank.

        Gradients equal the single-device gradients of that loss and accumulate into `.grad`
        of `parameters()` as `loss.backward()` would.
        """
        RECEIVED.take()  # forward calls since the last step are not this step's
        loss = self.executor.step(args, kwargs, target, lambda: list(self.parameters()),
                                  training=self.training)
        self.last_expert_rows = RECEIVED.take()
        return loss

    @property
    def dropout_step(self) -> int:
        """The dropout generator's step counter: `step` and forward calls in training mode
        draw their masks with it (those of `check.DropoutReference` at the same step), then
        move it on by one. Settable, e.g. to resume a run from a checkpoint."""
        return self.executor.dropout_step

    @dropout_step.setter
    def dropout_step(self, value: int) -> None:
        self.executor.dropout_step = int(value)

    @property
    def loss_fn(self) -> LossFn | None:
        """The user's loss_fn (step chooses its vocab-parallel rewrite per program)."""
        return self.losses.loss_fn

    @loss_fn.setter
    def loss_fn(self, loss_fn: LossFn | None) -> None:
        self.losses.loss_fn = loss_fn

    @property
    def loss_scale(self) -> float | None:
        """fp16 with loss_scale=dynamic: the current loss scale; None otherwise."""
        scaler = self.executor.loss_scale
        return None if scaler is None else scaler.scale

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last `step` overflowed under loss scaling: its gradients were left None
        (so `opt.step()` changes nothing) and the scale was lowered."""
        return self.executor.last_step_skipped

    @property
    def last_pipeline_stats(self) -> dict[str, float]:
        """busy_s / wall_s of this rank's last pipelined step (the measured bubble)."""
        return self.executor.last_pipeline_stats

    # --- parameters and state ----------------------------------------------------------------
    def parameters(self, recurse: bool = True):
        """Each local tensor once; with zero=1 this rank's flat 1/dp shards."""
        yield from self.state.parameters()

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate=True):
        yield from self.state.named_parameters(prefix=prefix, recurse=recurse)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Scale gradients so their global norm (every shard, replicas once) is <= max_norm."""
        return self.state.clip_grad_norm_(max_norm, norm_type)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: every parameter and persistent buffer, full, keyed as model.state_dict()."""
        return self.state.full_state_dict()

    def full_grad_dict(self) -> dict[str, torch.Tensor]:
        """Collective: every parameter's full gradient, keyed as model.named_parameters()."""
        return self.state.full_grad_dict()

    def load_full_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True):
        """Fill local shards from full tensors (model.state_dict() as is, tied names included)."""
        self.state.load_full_state_dict(state_dict, strict)

    def save(self, path: str, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Collective: a sharded checkpoint (DCP) of the model and optimizer at `path`, which
        any plan loads (partitioner/checkpoint.py); it keeps `dropout_step` too."""
        checkpoint.save(self.state, path, optimizer, dropout_step=self.dropout_step)

    def load(self, path: str, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Collective: read a checkpoint saved by `save` under any plan, or a file written by
        `torch.save(model.state_dict())` (model state only)."""
        if os.path.isfile(path):
            if optimizer is not None:
                raise checkpoint.CheckpointError(
                    f"{path} is a plain state dict (torch.save): it holds no optimizer state; "
                    f"load it without optimizer=")
            self.load_full_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            step = checkpoint.load(self.state, path, optimizer)
            if step is not None:
                self.dropout_step = step

    def init_weights(self, fn: Callable[[str, torch.Tensor], None]) -> None:
        """`fn(name, full_tensor)` fills each full-size parameter/buffer in place; this rank
        keeps its shard. Ranks draw the same numbers if `fn` is deterministic (seeded)."""
        self.state.init_weights(fn)

    # --- reports ---------------------------------------------------------------------------
    def explain(self) -> str:
        """Per node: placement, inserted collectives, stage (this rank's training program);
        then the loss path `step` chose (vocab-parallel cross-entropy or gathered logits),
        the input shapes this rank has captured programs for, the rows this rank's experts
        received in the last step (ep) and, under compile=on, each graph's compile time or why
        it runs eagerly."""
        lines = [explain(self.program), *self.losses.explain_lines(self.program),
                 *self.executor.programs.explain_lines(), *self.executor.compile_lines()]
        if self.last_expert_rows:
            lines.append("rows this rank's experts received in the last step, per dispatch "
                         "(MoE layers in order, microbatch by microbatch):")
            lines += [f"  {index}: {rows} (total {sum(rows)})"
                      for index, rows in enumerate(self.last_expert_rows, 1)]
        return "\n".join(lines)

    def timeline(self) -> str:
        """Which pp rank runs which microbatch of which stage when (unit-time model)."""
        plan = self.plan
        return timeline(schedule(plan.schedule, plan.pp, plan.microbatches, plan.vpp))

    def extra_repr(self) -> str:
        return f"plan={self.plan}, rank={self.rank}"
