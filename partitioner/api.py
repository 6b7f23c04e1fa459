"""The public face: `parallelize(model, plan, ...) -> ParallelModel`.

Phases, in a straight line: resolve the plan for the world -> capture the model at the
microbatch shape -> compile this rank's program (passes + lowering, pure) -> build the process
groups -> materialize this rank's local tensors -> bind them into the program. Every check on
the plan and the model runs before the first collective, so a bad input fails the same way on
every rank instead of hanging.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils import _pytree as pytree

from partitioner.capture import Captured, capture, input_key
from partitioner.loss_trace import (LossPath, choose_loss_path, find_sharded_logits,
                                    local_logits_graph, output_leaves)
from core.placement import ParamLayout, unshard
from core.plan import Plan, PlanError, coerce_plan
from partitioner.lower import RankProgram, Stage, compile_rank
from passes import PassContext
from passes.lowering.collectives import lower_collectives
from passes.sequence_parallel import SequenceNotDivisible
from runtime.data_parallel import GradReducer, ZeroShards
from runtime.mesh import Mesh, RankLayout, default_device
from core.schedules import Action, schedule, timeline
from runtime.pipeline import PipelineRunner

log = logging.getLogger(__name__)

LossFn = Callable[[object, object], object]


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
    batch, seq = _batch_size(example_inputs, {}), example_inputs[0].shape[-1]
    # context and expert parallelism have no passes yet: the search must not pick them
    fields = auto_plan(TransformerShape.from_gpt_config(config), world_size, _hardware_name(),
                       global_batch=batch, seq=seq, fixed={"cp": 1, "ep": 1, "etp": 1})
    fields = {k: v for k, v in fields.items() if k not in ("dp", "etp")}  # etp follows tp
    return coerce_plan(fields)


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
                    f"`python -m cost_model.calibrate` or pass a Plan")


# --- batches ---------------------------------------------------------------------------------

def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    return None


def split_batch(tree, parts: int, batch: int) -> list:
    """`tree` split into `parts` equal pieces along dim 0 of every tensor whose dim 0 is the
    batch; other leaves are shared by every piece."""
    leaves, spec = pytree.tree_flatten(tree)
    pieces = [[] for _ in range(parts)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == batch:
            for piece, chunk in zip(pieces, leaf.chunk(parts, dim=0), strict=True):
                piece.append(chunk)
        else:
            for piece in pieces:
                piece.append(leaf)
    return [pytree.tree_unflatten(piece, spec) for piece in pieces]


def first_microbatch(plan: Plan, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The (args, kwargs) of one microbatch of the global example batch: the shape `step`
    runs and so the shape to capture. Raises PlanError when the batch does not split."""
    batch = _batch_size(args, kwargs)
    if batch is None:
        return args, kwargs
    chunks = plan.degree("dp") * plan.microbatches
    if batch % chunks:
        raise PlanError(f"the example batch of {batch} does not split into dp*microbatches="
                        f"{plan.degree('dp')}*{plan.microbatches}={chunks} equal parts; "
                        f"use a global batch that is a multiple of {chunks}")
    return split_batch((args, kwargs), chunks, batch)[0]


def _input_leaves(args: tuple, kwargs: dict) -> list:
    """The call's flat input leaves, in the order of the captured graph's placeholders."""
    return pytree.tree_leaves((tuple(args), dict(kwargs)))


def _on_device(tree, device):
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tree)


@dataclass(frozen=True)
class _LossRoute:
    """What `step` runs for one program and target shape: its stages and the loss path."""

    stages: list
    """The program's stages, the last one possibly returning local logits shards."""
    path: LossPath | None = None
    """The loss path chosen at the first step; None on ranks without the last stage or
    without vocab-parallel logits (the user's loss_fn runs as is)."""


# --- local tensors -----------------------------------------------------------------------------

def _set_tensor(root: nn.Module, name: str, tensor: torch.Tensor, is_buffer: bool) -> None:
    """root.<name> = tensor, creating empty container modules along the path if needed."""
    *path, leaf = name.split(".")
    owner = root
    for part in path:
        child = owner._modules.get(part)
        if child is None:
            child = nn.Module()
            owner._modules[part] = child
        owner = child
    for table in (owner._parameters, owner._buffers):
        table.pop(leaf, None)
    if is_buffer:
        owner._buffers[leaf] = tensor
    else:
        owner._parameters[leaf] = tensor


class ParallelModel(nn.Module):
    """One rank's share of a parallelized model; see DESIGN.md, "Semantics"."""

    def __init__(self, model: nn.Module, plan: Plan, example_inputs: tuple, example_kwargs: dict,
                 loss_fn: LossFn | None, device=None) -> None:
        super().__init__()
        self.plan = plan
        self.loss_fn = loss_fn
        self.device = torch.device(device) if device is not None else default_device()
        self.rank = dist.get_rank()
        self._model_ref = [model]  # a list so nn.Module does not register it as a submodule
        self._model_is_meta = any(p.is_meta for p in model.parameters())
        self._programs: dict[tuple, RankProgram] = {}
        self._forward_programs: dict[tuple, RankProgram] = {}
        """Input key -> a forward-only program compiled without sp (sequence sp cannot split)."""
        self._loss_routes: dict[tuple, _LossRoute] = {}
        """(microbatch input key, target key) -> how step computes that loss."""
        self._local_logits_stages: dict[tuple, list] = {}
        """Microbatch input key -> the program's stages returning local logits shards."""
        self.last_pipeline_stats: dict[str, float] = {}
        """busy_s / wall_s of this rank's last pipelined step (the measured bubble)."""

        # 1-3: everything that can reject the inputs runs before the first collective.
        self.program = self._program_for(*first_microbatch(plan, example_inputs, example_kwargs))

        # 4: process groups (collective).
        self.mesh = Mesh(plan, self.rank)
        # 5-6: this rank's tensors, bound into the program.
        self.store = nn.Module()
        self._materialize(model)
        self._bind(self.program)
        # Data parallelism over the parameters this rank holds.
        params = list(self.store.parameters())
        dp_group = self.mesh.group("dp")
        self.zero = (ZeroShards(params, dp_group, self.mesh.coord("dp"), self.mesh.size("dp"))
                     if plan.zero else None)
        self.reducer = None if plan.zero else GradReducer(params, dp_group)

    # --- programs ------------------------------------------------------------------------
    def _program_for(self, args: tuple, kwargs: dict, forward_only: bool = False) -> RankProgram:
        """The program for these input shapes, compiled at first use. A forward-only call whose
        sequence sp cannot split (evaluation, generation) runs without sp: same parameters,
        same numbers; `step` keeps the plan and its error."""
        key = input_key(args, kwargs)
        program = self._programs.get(key) or (self._forward_programs.get(key)
                                              if forward_only else None)
        if program is None:
            model = self._model_ref[0]
            capture_device = "meta" if self._model_is_meta else None
            captured: Captured = capture(model, *(_on_device((args, kwargs), capture_device)
                                                  if capture_device else (args, kwargs)))
            first = getattr(self, "program", None)  # later shapes keep the first one's cut
            starts = first.pipeline.stage_starts if first and first.pipeline else None
            try:
                program = compile_rank(captured, self.plan, self.rank, self.device, starts)
                self._programs[key] = program
            except SequenceNotDivisible as error:
                if not forward_only:
                    raise
                log.warning("rank %d: %s; this forward runs without sp", self.rank, error)
                program = compile_rank(captured, dataclasses.replace(self.plan, sp=False),
                                       self.rank, self.device, starts)
                self._forward_programs[key] = program
            if hasattr(self, "store"):
                self._bind(program)
        return program

    def _materialize(self, model: nn.Module) -> None:
        sizes, coords = self.program.sizes, self.program.coords
        for name, layout in self.program.layouts.items():
            if self._model_is_meta:
                local = torch.empty(layout.local_shape(sizes), dtype=layout.dtype,
                                    device=self.device)
            else:
                full = (model.get_buffer(name) if layout.is_buffer else model.get_parameter(name))
                local = layout.shard(full.detach().to(self.device), coords, sizes)
            tensor = local if layout.is_buffer else nn.Parameter(
                local, requires_grad=layout.requires_grad)
            _set_tensor(self.store, name, tensor, layout.is_buffer)

    def _local(self, name: str) -> torch.Tensor:
        layout = self.program.layouts[name]
        return self.store.get_buffer(name) if layout.is_buffer else self.store.get_parameter(name)

    def _bind(self, program: RankProgram) -> None:
        # The collectives get this rank's process groups (the first program is compiled before
        # the groups exist, so that a bad input fails before the first collective).
        lowering = PassContext(plan=self.plan, coords=program.coords,
                               group_names=self.mesh.group_names())
        for stage in program.stages:
            lower_collectives(stage.gm, lowering)
            self._bind_graph(stage.gm, program)

    def _bind_graph(self, gm, program: RankProgram) -> None:
        for node in gm.graph.find_nodes(op="get_attr"):
            if node.target in program.layouts:
                _set_tensor(gm, node.target, self._local(node.target),
                            program.layouts[node.target].is_buffer)

    # --- running -------------------------------------------------------------------------
    def _run(self, gm, args: tuple, kwargs: dict):
        return gm(*args, **kwargs)

    def forward(self, *args, **kwargs):
        """The model's own output for any batch >= 1, on every rank (differentiable)."""
        args, kwargs = _on_device((args, kwargs), self.device)
        if self.zero is not None:
            self.zero.gather()
        program = self._program_for(args, kwargs, forward_only=True)
        if program.pipeline is not None:
            return self._pipeline_forward(program, args, kwargs)
        return self._run(program.stages[0].gm, args, kwargs)

    def step(self, *args, target=None, **kwargs) -> torch.Tensor:
        """Forward and backward over the global batch; returns its loss on every rank.

        Gradients equal the single-device gradients of that loss and accumulate into `.grad`
        of `parameters()` as `loss.backward()` would.
        """
        args, kwargs, target = _on_device((args, kwargs, target), self.device)
        plan = self.plan
        dp, micro = plan.degree("dp"), plan.microbatches
        batch = _batch_size(args, kwargs)
        if batch is None or batch % (dp * micro):
            raise ValueError(f"step needs a global batch divisible by dp*microbatches={dp}*"
                             f"{micro}={dp * micro}; got batch {batch}")
        ours = split_batch((args, kwargs, target), dp, batch)[self.mesh.coord("dp")]
        microbatches = split_batch(ours, micro, batch // dp)
        if self.zero is not None:
            self.zero.gather()
        visible = list(self.parameters())
        stashed = [p.grad for p in visible]
        for p in visible:
            p.grad = None

        zeros = torch.zeros(3, dtype=torch.float64, device=self.device)
        totals = {"summary": zeros}  # [loss, tokens, token-weighted?] summed over microbatches

        program = self._program_for(*microbatches[0][:2])
        route = self._loss_route(program, microbatches[0])
        loss_fn = self.loss_fn
        if route.path is not None and route.path.vocab_parallel:
            loss_fn = route.path.loss

        def scaled_loss(index: int, output) -> torch.Tensor:
            loss, tokens = self._loss(output, microbatches[index][2], loss_fn)
            scale = 1.0 if tokens is not None else 1.0 / (dp * micro)
            row = torch.stack([loss.detach().double() * scale,
                               torch.as_tensor(0 if tokens is None else tokens,
                                               device=self.device).double(),
                               torch.tensor(float(tokens is not None), dtype=torch.float64,
                                            device=self.device)])
            totals["summary"] = totals["summary"] + row
            return loss * scale

        if program.pipeline is None:
            for index, (mb_args, mb_kwargs, _) in enumerate(microbatches):
                output = self._run(route.stages[0].gm, mb_args, mb_kwargs)
                loss = scaled_loss(index, output)
                if index == len(microbatches) - 1 and self.reducer is not None:
                    self.reducer.arm()  # reduce buckets as backward fills them
                loss.backward()
        else:
            actions = schedule(plan.schedule, plan.pp, micro, plan.vpp)[self.mesh.coord("pp")]
            leaves = [_input_leaves(a, k) for a, k, _ in microbatches]
            runner = self._runner(program, route.stages)
            start = time.perf_counter()
            runner.run(
                actions, leaves, loss_of=lambda index, outputs: scaled_loss(
                    index, self._rebuild_output(program, outputs)),
                backward_of=lambda loss: loss.backward())
            self.last_pipeline_stats = {"busy_s": runner.busy_s,
                                        "wall_s": time.perf_counter() - start}
        self._reduce_gradients(program)

        summary = totals["summary"]
        for dim in ("pp", "dp"):  # only last stages hold losses; every dp rank its own share
            if self.mesh.group(dim) is not None:
                dist.all_reduce(summary, group=self.mesh.group(dim))
        loss = summary[0]
        if summary[2] > 0:  # token-weighted: divide by the tokens of the whole global batch
            count = summary[1]
            if count <= 0:
                raise ValueError("loss_fn reported no tokens in the whole batch")
            loss = loss / count
            for p in visible:
                if p.grad is not None:
                    p.grad.div_(count.to(p.grad.dtype))
        for p, old in zip(visible, stashed, strict=True):
            if old is not None:
                p.grad = old if p.grad is None else p.grad.add_(old)
        return loss.to(self._output_dtype(program))

    # --- the loss path -----------------------------------------------------------------------
    def _loss_route(self, program: RankProgram, microbatch: tuple) -> _LossRoute:
        """The stages and loss of `step` for this program and target shape, chosen at the first
        step: vocab-parallel cross-entropy when the last stage returns vocab-parallel logits and
        loss_fn is a cross-entropy of them, else the gathered logits and loss_fn as is."""
        args, kwargs, target = microbatch
        key = (input_key(args, kwargs), input_key((target,), {}))
        route = self._loss_routes.get(key)
        if route is None:
            route = self._choose_loss_route(program, target, key[0])
            self._loss_routes[key] = route
        return route

    def _choose_loss_route(self, program: RankProgram, target, program_key) -> _LossRoute:
        last = program.stages[-1]
        if program.pipeline is not None and last.index != program.pipeline.num_stages - 1:
            return _LossRoute(program.stages)  # another pp rank computes the loss
        sharded = find_sharded_logits(last.gm)
        if not sharded:
            return _LossRoute(program.stages)
        out_spec = (program.pipeline.out_spec if program.pipeline is not None
                    else last.gm.graph._codegen.pytree_info.out_spec)
        path = choose_loss_path(self.loss_fn, out_spec, output_leaves(last.gm), sharded, target,
                                self.device)
        # Every rank of the group must agree (the loss runs collectives over it): a decision
        # that differed on one rank (a rank-dependent loss_fn) would hang the step.
        agreed = torch.tensor([int(path.vocab_parallel)], device=self.device)
        dims = {name: dim for dim, name in self.mesh.group_names().items()}  # lowered: names
        for name in sorted({item.mesh_dim for item in sharded}):
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self.mesh.group(dims[name]))
        if path.vocab_parallel and not agreed.item():
            path = LossPath(None, "another rank of the vocabulary's group could not take the "
                                  "vocab-parallel path")
        log.info("rank %d: step loss path: %s", self.rank, path)
        if not path.vocab_parallel:
            return _LossRoute(program.stages, path)
        stages = self._local_logits_stages.get(program_key)
        if stages is None:  # one variant per program, whatever the target shapes
            variant = local_logits_graph(last.gm, sharded)
            self._bind_graph(variant, program)
            stages = program.stages[:-1] + [Stage(last.index, variant, last.inputs,
                                                  last.outputs)]
            self._local_logits_stages[program_key] = stages
        return _LossRoute(stages, path)

    def _reduce_gradients(self, program: RankProgram) -> None:
        """Sum the gradients of parameters tied across pipeline ranks, then over dp."""
        if program.pipeline is not None and self.mesh.group("pp") is not None:
            for name in self._tied_across_pp(program):
                layout = program.all_layouts[name]
                if name in program.layouts:
                    local = self._local(name)
                    buffer = local.grad if local.grad is not None else torch.zeros_like(local)
                else:
                    buffer = torch.zeros(layout.local_shape(program.sizes), dtype=layout.dtype,
                                         device=self.device)
                dist.all_reduce(buffer, group=self.mesh.group("pp"))
                if name in program.layouts:
                    self._local(name).grad = buffer
        if self.zero is not None:
            self.zero.reduce_grads()
        else:
            self.reducer.finish()

    @staticmethod
    def _tied_across_pp(program: RankProgram) -> list[str]:
        return [name for name, layout in program.all_layouts.items()
                if not layout.is_buffer and layout.requires_grad
                and len(program.pipeline.holders(name)) > 1]

    def _output_dtype(self, program: RankProgram) -> torch.dtype:
        metas = (program.pipeline.output_meta if program.pipeline is not None else
                 [(None, n.meta["val"].dtype) for n in program.stages[0].gm.graph.nodes
                  if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)])
        for meta in metas:
            if meta is not None and meta[1].is_floating_point:
                return meta[1]
        return torch.float32

    # --- pipelines ---------------------------------------------------------------------------
    def _runner(self, program: RankProgram, stages: list | None = None) -> PipelineRunner:
        return PipelineRunner(program.pipeline, stages or program.stages, self.mesh.group("pp"),
                              self.mesh.ranks("pp"), self._run_stage, self.device)

    def _run_stage(self, stage, inputs: list[torch.Tensor]):
        return stage.gm(*inputs)

    @staticmethod
    def _rebuild_output(program: RankProgram, outputs) -> object:
        return pytree.tree_unflatten(list(outputs), program.pipeline.out_spec)

    def _pipeline_forward(self, program: RankProgram, args: tuple, kwargs: dict):
        """Forward only, one microbatch; the last stage's output broadcast over pp."""
        pipeline = program.pipeline
        actions = [Action("F", 0, stage.index) for stage in program.stages]
        with torch.no_grad():
            results = self._runner(program).run(
                actions, [_input_leaves(args, kwargs)], None, None)
        last_rank = self.mesh.ranks("pp")[pipeline.rank_of(pipeline.num_stages - 1)]
        leaves = []
        for index, meta in enumerate(pipeline.output_meta):
            if meta is None:
                leaves.append(pipeline.output_names[index])
                continue
            if results:
                tensor = results[0][index].contiguous()
            else:
                tensor = torch.empty(meta[0], dtype=meta[1], device=self.device)
            dist.broadcast(tensor, src=last_rank, group=self.mesh.group("pp"))
            leaves.append(tensor)
        return pytree.tree_unflatten(leaves, pipeline.out_spec)

    def _loss(self, output, target, loss_fn: LossFn | None = None):
        """(loss, tokens or None) of one microbatch, per the loss_fn contract (`loss_fn`: the
        user's, or its vocab-parallel rewrite)."""
        if loss_fn is not None:
            result = loss_fn(output, target)
        elif isinstance(output, torch.Tensor) and output.dim() == 0:
            result = output
        elif getattr(output, "loss", None) is not None:
            result = output.loss
        elif isinstance(output, dict) and "loss" in output:
            result = output["loss"]
        else:
            raise ValueError("step needs loss_fn(output, target) -> loss: the model's output "
                             f"({type(output).__name__} {tuple(getattr(output, 'shape', ()))}) "
                             f"is not a scalar loss; pass loss_fn to parallelize")
        if isinstance(result, (tuple, list)):
            loss_sum, tokens = result
            return loss_sum, tokens
        if not isinstance(result, torch.Tensor) or result.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar tensor or (loss_sum, token_count); "
                             f"got {type(result).__name__} {getattr(result, 'shape', '')}")
        return result, None

    # --- parameters ------------------------------------------------------------------------
    def parameters(self, recurse: bool = True):
        """Each local tensor once; with zero=1 this rank's flat 1/dp shards."""
        if self.zero is not None:
            yield from self.zero.shard_parameters()
        else:
            yield from self.store.parameters()

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate=True):
        if self.zero is not None:
            for dtype, shard in self.zero.shards.items():
                yield f"{prefix}zero_shard.{str(dtype).removeprefix('torch.')}", shard
        else:
            yield from self.store.named_parameters(prefix=prefix, recurse=recurse)

    def _replicas(self, layout: ParamLayout) -> int:
        """How many ranks hold exactly the same values as this rank's piece of `layout`."""
        distinct = math.prod(self.program.sizes[dim] for dim, _ in layout.placements.splits())
        holders = (len(self.program.pipeline.holders(layout.name))
                   if self.program.pipeline is not None else self.mesh.size("pp"))
        return self.mesh.world_size // self.mesh.size("pp") * holders // distinct

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Scale gradients so their global norm (every shard, replicas once) is <= max_norm."""
        norm_type = float(norm_type)
        replicas = {id(self._local(name)): self._replicas(layout)
                    for name, layout in self.program.layouts.items() if not layout.is_buffer}
        if self.zero is not None:
            # Each element's master copy lives on one dp rank of the replicas.
            pieces = [(grad, replicas[id(p)] // self.mesh.size("dp"))
                      for p, grad in self.zero.owned_pieces()]
        else:
            pieces = [(p.grad, replicas[id(p)]) for p in self.parameters() if p.grad is not None]
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        if norm_type == math.inf:
            for grad, _ in pieces:
                total = torch.maximum(total, grad.abs().max().double())
            dist.all_reduce(total, op=dist.ReduceOp.MAX)
        else:
            for grad, copies in pieces:
                total += grad.double().abs().pow(norm_type).sum() / copies
            dist.all_reduce(total)
            total = total.pow(1.0 / norm_type)
        coef = max_norm / (total + 1e-6)
        if coef < 1:
            for grad in grads:
                grad.mul_(coef.to(grad.dtype))
        return total

    # --- state dicts -----------------------------------------------------------------------
    def _gather_full(self, layout: ParamLayout, local: torch.Tensor) -> torch.Tensor:
        full = local
        for mesh_dim, placement in reversed(list(layout.placements.splits())):
            group, size = self.mesh.group(mesh_dim), self.mesh.size(mesh_dim)
            pieces = [torch.empty_like(full) for _ in range(size)]
            dist.all_gather(pieces, full.contiguous(), group=group)
            full = unshard(pieces, placement, layout.full_shape[placement.dim])
        return full

    def _full_from_owner(self, layout: ParamLayout, local: torch.Tensor | None):
        """The full tensor on every rank: gathered over its shards on the pipeline rank that
        holds it, then broadcast over pp (without pipelining every rank holds everything)."""
        pipeline = self.program.pipeline
        if pipeline is None:
            return self._gather_full(layout, local)
        owner = pipeline.holders(layout.name)[0]
        if self.mesh.coord("pp") == owner:
            full = self._gather_full(layout, local).contiguous()
        else:
            full = torch.empty(layout.full_shape, dtype=layout.dtype, device=self.device)
        if self.mesh.group("pp") is not None:
            dist.broadcast(full, src=self.mesh.ranks("pp")[owner], group=self.mesh.group("pp"))
        return full

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: every parameter and persistent buffer, full, keyed as model.state_dict()."""
        if self.zero is not None:
            self.zero.gather()
        out = {}
        for name, layout in self.program.all_layouts.items():
            if layout.is_buffer and not layout.persistent:
                continue
            local = self._local(name) if name in self.program.layouts else None
            full = self._full_from_owner(layout, local).detach().clone()
            for key in (name, *layout.aliases):
                out[key] = full
        return out

    @torch.no_grad()
    def full_grad_dict(self) -> dict[str, torch.Tensor]:
        """Collective: every parameter's full gradient, keyed as model.named_parameters()."""
        zero_grads = self.zero.full_grads() if self.zero is not None else None
        out = {}
        for name, layout in self.program.all_layouts.items():
            if layout.is_buffer or not layout.requires_grad:
                continue
            grad = None
            if name in self.program.layouts:
                local = self._local(name)
                grad = zero_grads[id(local)] if zero_grads is not None else local.grad
                if grad is None:
                    grad = torch.zeros_like(local)
            out[name] = self._full_from_owner(layout, grad)
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True):
        """Fill local shards from full tensors (model.state_dict() as is, tied names included)."""
        missing, used = [], set()
        for name, layout in self.program.all_layouts.items():
            key = next((k for k in (name, *layout.aliases) if k in state_dict), None)
            if key is None:
                if layout.persistent:
                    missing.append(name)
                continue
            used.update(k for k in (name, *layout.aliases) if k in state_dict)
            if name not in self.program.layouts:
                continue  # another pipeline rank holds it
            full = state_dict[key]
            if tuple(full.shape) != layout.full_shape:
                raise ValueError(f"state dict entry {key!r} has shape {tuple(full.shape)}, "
                                 f"the model expects {layout.full_shape}")
            self._local(name).copy_(layout.shard(full.to(self.device), self.program.coords,
                                                 self.program.sizes))
        unexpected = sorted(set(state_dict) - used)
        if strict and (missing or unexpected):
            raise KeyError(f"load_full_state_dict: missing keys {missing}, unexpected keys "
                           f"{unexpected}")
        if self.zero is not None:
            self.zero.refresh_shards()

    @torch.no_grad()
    def init_weights(self, fn: Callable[[str, torch.Tensor], None]) -> None:
        """`fn(name, full_tensor)` fills each full-size parameter/buffer in place; this rank
        keeps its shard. Ranks draw the same numbers if `fn` is deterministic (seeded)."""
        for name, layout in self.program.layouts.items():
            full = torch.zeros(layout.full_shape, dtype=layout.dtype, device=self.device)
            fn(name, full)
            self._local(name).copy_(layout.shard(full, self.program.coords, self.program.sizes))
        if self.zero is not None:
            self.zero.refresh_shards()

    # --- reports ---------------------------------------------------------------------------
    def explain(self) -> str:
        """Per node: placement, inserted collectives, stage (this rank's training program);
        then the loss path `step` chose (vocab-parallel cross-entropy or gathered logits)."""
        text = self.program.explain()
        paths = list(dict.fromkeys(str(route.path) for route in self._loss_routes.values()
                                   if route.path is not None))
        if not self._loss_routes and self._holds_last_stage() and \
                find_sharded_logits(self.program.stages[-1].gm):
            paths = ["chosen at the first step (vocab-parallel cross-entropy if loss_fn is a "
                     "cross-entropy of the logits, else gathered logits)"]
        return "\n".join([text] + [f"step loss path: {path}" for path in paths])

    def _holds_last_stage(self) -> bool:
        pipeline = self.program.pipeline
        return pipeline is None or self.program.stages[-1].index == pipeline.num_stages - 1

    def timeline(self) -> str:
        """Which pp rank runs which microbatch of which stage when (unit-time model)."""
        plan = self.plan
        return timeline(schedule(plan.schedule, plan.pp, plan.microbatches, plan.vpp))

    def extra_repr(self) -> str:
        return f"plan={self.plan}, rank={self.rank}"


def rank_programs(model: nn.Module, plan: Plan, example_inputs: tuple,
                  example_kwargs: dict | None = None, ranks=None) -> list[RankProgram]:
    """Every rank's program, in one process with no process group (the CLI's `dump`).

    The example inputs are one global batch; each rank's program is compiled at the
    microbatch shape it would run in `step`.
    """
    captured = capture(model, *first_microbatch(plan, tuple(example_inputs),
                                                dict(example_kwargs or {})))
    world = RankLayout.dense(plan).world_size
    return [compile_rank(captured, plan, rank, "meta")
            for rank in (range(world) if ranks is None else ranks)]
