"""One rank's parameter and optimizer state: its local tensors and what is collective on them.

`LocalState` materializes this rank's shards (or empty tensors for a meta model), binds them
into every program's stage graphs, reduces gradients after a step (tied across pipeline ranks,
then over dp, bucketed or ZeRO-1), and answers the collective questions about them: the global
gradient norm, full state and gradient dicts, loading full tensors.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
from torch import fx, nn

from core import meta
from core.layout import RankLayout
from core.placement import ParamLayout, unshard
from core.plan import PlanError
from core.precision import compute_dtype, reduce_dtype
from passes import PassContext, deferred_recompile
from passes.lowering.collectives import lower_collectives
from passes.lowering.program import RankProgram
from runtime.data_parallel import GradReducer, ZeroGroup, ZeroShards
from runtime.mixed_precision import ComputeCopies
from runtime.mesh import GRADIENTS, Mesh


def set_tensor(root: nn.Module, name: str, tensor: torch.Tensor, is_buffer: bool) -> None:
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


class LocalState:
    """This rank's tensors (`store`, an nn.Module keyed by canonical names) and their
    gradient reduction; `program` is the first program, whose layouts every later one shares."""

    def __init__(self, program: RankProgram, mesh: Mesh, model: nn.Module, model_is_meta: bool,
                 device: torch.device, zero: bool) -> None:
        self.program = program
        self.mesh = mesh
        self.device = device
        self.store = nn.Module()
        self.compute: ComputeCopies | None = None
        self._materialize(model, model_is_meta)
        self.bind(program)
        dense, expert = [], []
        for name, layout in program.layouts.items():
            if not layout.is_buffer:
                (expert if _is_expert(layout) else dense).append(self.local(name))
        group = mesh.group(GRADIENTS)  # dp, or dp x cp
        # An expert's gradient already holds every token of its ep group (the dispatch's
        # backward brought them); the ranks holding the same experts are the edp group.
        self.zero = ZeroShards([
            ZeroGroup("dense", dense, group, mesh.coord(GRADIENTS), mesh.size(GRADIENTS)),
            ZeroGroup("expert", expert, mesh.group("edp"), mesh.coord("edp"), mesh.size("edp")),
        ]) if zero else None
        reduce_in = reduce_dtype(program.plan) if compute_dtype(program.plan) else None
        if self.zero is not None:
            self.zero.reduce_dtype = reduce_in
        self.reducer = None if zero else GradReducer(dense, group, reduce_dtype=reduce_in)
        self.expert_reducer = (GradReducer(expert, mesh.group("edp"), reduce_dtype=reduce_in)
                               if expert and not zero else None)
        # Mixed precision: the graphs read param_dtype copies of the main weights (the store).
        cast = compute_dtype(program.plan)
        self.compute = None if cast is None else ComputeCopies(
            {name: self.local(name) for name, layout in program.layouts.items()
             if not layout.is_buffer and layout.dtype.is_floating_point}, cast)
        if self.compute is not None:
            for stage in program.stages:  # bound to the main weights above: the copies now
                self.bind_graph(stage.gm, program)

    def _materialize(self, model: nn.Module, model_is_meta: bool) -> None:
        sizes, coords = self.program.sizes, self.program.coords
        for name, layout in self.program.layouts.items():
            if model_is_meta:
                local = torch.empty(layout.local_shape(sizes), dtype=layout.dtype,
                                    device=self.device)
            else:
                full = (model.get_buffer(name) if layout.is_buffer else model.get_parameter(name))
                local = layout.shard(full.detach().to(self.device), coords, sizes)
            tensor = local if layout.is_buffer else nn.Parameter(
                local, requires_grad=layout.requires_grad)
            set_tensor(self.store, name, tensor, layout.is_buffer)

    def local(self, name: str) -> torch.Tensor:
        layout = self.program.layouts[name]
        return self.store.get_buffer(name) if layout.is_buffer else self.store.get_parameter(name)

    def bind(self, program: RankProgram) -> None:
        """Point every stage graph of `program` at this rank's tensors, its collectives at this
        rank's process groups (the first program is compiled before the groups exist, so that
        bad input fails before any collective; it is lowered here)."""
        moved = [f"{name}: {self.program.layouts[name]} -> {layout}"
                 for name, layout in program.layouts.items()
                 if name in self.program.layouts
                 and layout.placements != self.program.layouts[name].placements]
        if moved:
            raise PlanError(
                f"a call with these input shapes compiles to other splits of "
                f"{len(moved)} parameters than the first program ({'; '.join(moved[:3])}"
                f"{'; ...' if len(moved) > 3 else ''}): this rank holds the first program's "
                f"pieces, so the new program would compute with the wrong ones. Call the "
                f"model with inputs of the kind the first call had (both with or both without "
                f"labels, for a model that computes its loss when given them), or parallelize "
                f"a second model for the other use")
        lowering = PassContext(plan=program.plan, coords=program.coords,
                               group_names=self.mesh.group_names())
        with deferred_recompile(program.stale):  # with the passes' rewrites: one codegen
            for stage in program.stages:
                if meta.LOWERED_COLLECTIVES not in stage.gm.meta:
                    lower_collectives(stage.gm, lowering)
                self.bind_graph(stage.gm, program)
        program.generate_code()

    def bind_graph(self, gm: fx.GraphModule, program: RankProgram) -> None:
        copies = self.compute.copies if self.compute is not None else {}
        for node in gm.graph.find_nodes(op="get_attr"):
            if node.target in copies:  # a non-leaf (its grad goes to the main weight)
                set_tensor(gm, node.target, copies[node.target], is_buffer=True)
            elif node.target in program.layouts:
                set_tensor(gm, node.target, self.local(node.target),
                           program.layouts[node.target].is_buffer)

    def gather(self) -> None:
        """Before a forward: ZeRO-1's updated shards all-gathered into the full local tensors;
        under mixed precision the compute copies refreshed if the optimizer changed the
        main weights (their `_version`)."""
        if self.zero is not None:
            self.zero.gather()
        if self.compute is not None:
            self.compute.refresh(list(self.parameters()))

    # --- parameters ------------------------------------------------------------------------
    def parameters(self):
        """Each local tensor once; with zero=1 this rank's flat 1/dp shards."""
        if self.zero is not None:
            yield from self.zero.shard_parameters()
        else:
            yield from self.store.parameters()

    def named_parameters(self, prefix: str = "", recurse: bool = True):
        if self.zero is not None:
            for key, shard in self.zero.shards.items():
                yield f"{prefix}zero_shard.{key}", shard
        else:
            yield from self.store.named_parameters(prefix=prefix, recurse=recurse)

    # --- gradients -------------------------------------------------------------------------
    def reduce_gradients(self, program: RankProgram) -> None:
        """Sum the gradients of parameters tied across pipeline ranks, then over dp."""
        if program.pipeline is not None and self.mesh.group("pp") is not None:
            for name in _tied_across_pp(program):
                layout = program.all_layouts[name]
                if name in program.layouts:
                    local = self.local(name)
                    buffer = local.grad if local.grad is not None else torch.zeros_like(local)
                else:
                    buffer = torch.zeros(layout.local_shape(program.sizes), dtype=layout.dtype,
                                         device=self.device)
                dist.all_reduce(buffer, group=self.mesh.group("pp"))
                if name in program.layouts:
                    self.local(name).grad = buffer
        if self.zero is not None:
            self.zero.reduce_grads()
        else:
            self.reducer.finish()
        if self.expert_reducer is not None:
            self.expert_reducer.finish()

    def arm_reducer(self) -> None:
        """Bucketed dp all-reduce: reduce buckets as the next backward fills them."""
        for reducer in (self.reducer, self.expert_reducer):
            if reducer is not None:
                reducer.arm()

    def _replicas(self, layout: ParamLayout) -> int:
        """How many ranks hold exactly the same values as this rank's piece of `layout`: the
        copies within a pipeline rank's dense dims, times the pp ranks holding it."""
        rank_layout = (RankLayout.expert if _is_expert(layout) else RankLayout.dense)
        within = tuple(dim for dim, _ in rank_layout(self.program.plan).sizes if dim != "pp")
        holders = (len(self.program.pipeline.holders(layout.name))
                   if self.program.pipeline is not None else self.mesh.size("pp"))
        return layout.replicas(self.program.sizes, within) * holders

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Scale gradients so their global norm (every shard, replicas once) is <= max_norm."""
        norm_type = float(norm_type)
        replicas = {id(self.local(name)): self._replicas(layout)
                    for name, layout in self.program.layouts.items() if not layout.is_buffer}
        if self.zero is not None:
            # Each element's master copy lives on one rank of the group its state is split over.
            pieces = [(grad, replicas[id(p)] // size)
                      for p, grad, size in self.zero.owned_pieces()]
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

    # --- full tensors ----------------------------------------------------------------------
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
        holds it, broadcast from the coordinate holding it along each `Held` dim (an expert
        of a ModuleList: its ep rank), then over pp (without pipelining every rank holds
        everything)."""
        pipeline = self.program.pipeline
        held = list(layout.placements.held())
        if pipeline is None and not held:
            return self._gather_full(layout, local)
        owner = pipeline.holders(layout.name)[0] if pipeline is not None else None
        if owner in (None, self.mesh.coord("pp")) and local is not None:
            full = self._gather_full(layout, local).contiguous()
        else:
            full = torch.empty(layout.full_shape, dtype=layout.dtype, device=self.device)
        for dim, holder in held:
            if self.mesh.group(dim) is not None:
                dist.broadcast(full, src=self.mesh.ranks(dim)[holder.index],
                               group=self.mesh.group(dim))
        if owner is not None and self.mesh.group("pp") is not None:
            dist.broadcast(full, src=self.mesh.ranks("pp")[owner], group=self.mesh.group("pp"))
        return full

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: every parameter and persistent buffer, full, keyed as model.state_dict()."""
        self.gather()
        out = {}
        for name, layout in self.program.all_layouts.items():
            if layout.is_buffer and not layout.persistent:
                continue
            local = self.local(name) if name in self.program.layouts else None
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
                local = self.local(name)
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
            self.local(name).copy_(layout.shard(full.to(self.device), self.program.coords,
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
            self.local(name).copy_(layout.shard(full, self.program.coords, self.program.sizes))
        if self.zero is not None:
            self.zero.refresh_shards()


def _is_expert(layout: ParamLayout) -> bool:
    """Split or held over ep: an expert weight, laid over the expert ranks (etp x ep x edp)."""
    return any(dim == "ep" for dim, _ in (*layout.placements.splits(),
                                          *layout.placements.held()))


def _tied_across_pp(program: RankProgram) -> list[str]:
    return [name for name, layout in program.all_layouts.items()
            if not layout.is_buffer and layout.requires_grad
            and len(program.pipeline.holders(name)) > 1]
