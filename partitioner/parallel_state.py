"""Megatron-Core's `parallel_state` getters, answered from our rank layout.

Code written against `megatron.core.parallel_state` asks for the rank, world size and process
group of each parallel dimension: `get_tensor_model_parallel_rank()`,
`get_pipeline_model_parallel_world_size()`, `get_context_parallel_group()`,
`get_data_parallel_group(with_context_parallel=True)`, `get_expert_model_parallel_rank()`, ...
This module answers those calls under the same names. It computes nothing itself: every rank
list comes from `core.layout.RankLayout` (the dense tp-cp-dp-pp and expert etp-ep-edp-pp
generators the passes use, read from the plan's `order` exactly as Megatron-Core's
RankGenerator reads it) and every group from the `runtime.mesh.Mesh` that runs the model.

The state is process-global, as in Megatron: it describes the most recent `install(pm)` of a
ParallelModel (what `parallelize` returned) or the most recent `initialize_model_parallel(...)`.
With several parallel models in one process, the getters report the last one installed.

    pm = parallelize(model, "tp=2,pp=2", example_inputs=(ids,))
    parallel_state.install(pm)        # collective: every rank, right after parallelize
    parallel_state.get_tensor_model_parallel_rank()

`ModelParallelState.of_rank(plan, rank)` gives the same answers for any rank without a process
group (pure arithmetic), which is how tests compare the layout with Megatron's rank order.
"""

from __future__ import annotations

import itertools

import torch.distributed as dist

from core.plan import Plan
from core.schedules import placement
from runtime.mesh import Mesh, process_group

_LAYOUT_DIMS = ("tp", "cp", "dp", "pp", "etp", "ep", "edp")
"""Dimensions that the Mesh holds directly (dense tp-cp-dp-pp, expert etp-ep-edp-pp)."""
_COMBINED_DIMS = {"dp-cp": ("cp", "dp")}
"""Megatron's combined groups: name -> the dense dimensions that vary inside one group."""

_MEGATRON_TOKENS = ("tp", "pp", "dp", "ep", "cp")
"""RankGenerator appends the dimensions an `order` leaves out, in this order (size 1 only)."""


class ModelParallelState:
    """One rank's place in every parallel dimension, and (when live) its process groups.

    Dimensions: "tp", "pp", "cp", "dp", "ep" (expert-model-parallel), "etp"
    (expert-tensor-parallel), "edp" (expert-data-parallel) and "dp-cp" (data x context, the
    group Megatron reduces gradients over). Rank lists follow Megatron's order inside a group.
    """

    def __init__(self, mesh: Mesh, vpp: int | None = None, *, live: bool = True) -> None:
        self.mesh = mesh
        self.vpp = vpp
        """Virtual pipeline stages per rank, None without interleaving (Megatron's convention)."""
        self.vp_rank: int | None = 0 if vpp is not None else None
        """Megatron's mutable virtual-pipeline rank (set while building each model chunk)."""
        self.live = live
        self._groups: dict[str, object] = {}
        self._singleton = None

    @classmethod
    def of_rank(cls, plan: Plan, rank: int, world_size: int | None = None) -> "ModelParallelState":
        """The state of `rank` under `plan`, with no process group (pure arithmetic)."""
        if plan.dp is None:
            plan = plan.resolve(world_size if world_size is not None else plan.model_parallel)
        return cls(Mesh(plan, rank, live=False), plan.vpp if plan.vpp > 1 else None, live=False)

    @property
    def rank(self) -> int:
        return self.mesh.rank

    def holds_stage(self, stage: int, ignore_virtual: bool = True,
                    vp_stage: int | None = None) -> bool:
        """Whether this rank holds pipeline stage `stage` (with ignore_virtual=False: as its
        virtual stage `vp_stage`, default the current `vp_rank`). Stages lie on ranks as the
        plan's schedule places them (core.schedules.placement): rank s % pp, or zb-v's V, where
        rank 0 holds the first and the last stage."""
        pp, vpp = self.world_size("pp"), self.vpp or 1
        where = placement(self.mesh.plan.schedule, pp, vpp)
        mine = [s for s, rank in enumerate(where) if rank == self.rank_in("pp")]
        if stage not in mine:
            return False
        if ignore_virtual or self.vpp is None:
            return True
        return mine.index(stage) == (vp_stage if vp_stage is not None else self.vp_rank)

    def ranks(self, dim: str) -> list[int]:
        """The global ranks of this rank's group along `dim`, in Megatron's order."""
        if dim in _COMBINED_DIMS:
            return _combined_ranks(self.mesh.dense, _COMBINED_DIMS[dim], self.rank)
        if dim not in _LAYOUT_DIMS:
            raise ValueError(f"unknown parallel dimension {dim!r}; known: "
                             f"{', '.join(_LAYOUT_DIMS + tuple(_COMBINED_DIMS))}")
        return self.mesh.ranks(dim)

    def world_size(self, dim: str) -> int:
        return len(self.ranks(dim))

    def rank_in(self, dim: str) -> int:
        return self.ranks(dim).index(self.rank)

    def group(self, dim: str):
        """This rank's process group along `dim`; a group of one rank where the size is 1
        (never None, which torch.distributed would read as the whole world)."""
        if not self.live:
            raise RuntimeError("this ModelParallelState was built without process groups "
                               "(ModelParallelState.of_rank); use the module getters after "
                               "install(pm) or initialize_model_parallel(...)")
        if self.world_size(dim) == 1:
            return self._singleton_group()
        if dim in _COMBINED_DIMS:
            inner = [d for d in _COMBINED_DIMS[dim] if self.world_size(d) > 1]
            if len(inner) == 1:  # the combined group is that one dimension's group
                return self.mesh.group(inner[0])
            return self._groups[dim]
        return self.mesh.group(dim)

    def create_combined_groups(self) -> None:
        """Collective (every rank, same order): the combined groups no Mesh dimension equals."""
        for dim, inner in _COMBINED_DIMS.items():
            if sum(self.world_size(d) > 1 for d in inner) < 2:
                continue
            for ranks in _partitions(lambda r: _combined_ranks(self.mesh.dense, inner, r),
                                     self.mesh.world_size):
                group = process_group(ranks)
                if self.rank in ranks:
                    self._groups[dim] = group

    def _singleton_group(self):
        if self._singleton is None:
            # Only this rank takes part, so only this rank needs to call (no collective).
            self._singleton = dist.new_group([self.rank], use_local_synchronization=True)
        return self._singleton

    def __repr__(self) -> str:
        dims = ", ".join(f"{d}={self.rank_in(d)}/{self.world_size(d)}"
                         for d in _LAYOUT_DIMS + tuple(_COMBINED_DIMS))
        return f"ModelParallelState(rank={self.rank}, {dims})"


def _combined_ranks(layout, dims: tuple[str, ...], rank: int) -> list[int]:
    """The ranks sharing every coordinate of `rank` except `dims`, from the layout's own
    arithmetic. Inside a group Megatron numbers ranks with the earlier `order` dimension
    fastest; strides grow along `order`, so that numbering is ascending global rank."""
    base = layout.coords(rank)
    points = itertools.product(*(range(layout.size(d)) for d in dims))
    return sorted(layout.rank_of({**base, **dict(zip(dims, point, strict=True))})
                  for point in points)


def _partitions(group_of, world_size: int) -> list[list[int]]:
    """Every group once, ordered by its first rank (Megatron's `get_ranks` order)."""
    seen: set[int] = set()
    groups = []
    for rank in range(world_size):
        if rank not in seen:
            group = group_of(rank)
            seen.update(group)
            groups.append(group)
    return groups


_STATE: ModelParallelState | None = None


def _state() -> ModelParallelState:
    if _STATE is None:
        raise RuntimeError("model parallel state is not initialized: call "
                           "parallel_state.install(pm) after parallelize, or "
                           "parallel_state.initialize_model_parallel(...)")
    return _STATE


def current() -> ModelParallelState:
    """The installed state (most recent install or initialize_model_parallel)."""
    return _state()


# --- installing ------------------------------------------------------------------------------

def install(source) -> ModelParallelState:
    """Make the getters describe `source`: a ParallelModel (anything with `.mesh` and `.plan`)
    or a live Mesh. Collective when the plan needs a combined group (dp and cp both > 1):
    call it on every rank. Installing the mesh already installed does nothing."""
    global _STATE
    mesh = getattr(source, "mesh", source)
    if not isinstance(mesh, Mesh):
        raise TypeError(f"install needs a ParallelModel or a Mesh, not {type(source).__name__}")
    if _STATE is not None and _STATE.mesh is mesh:
        return _STATE
    state = ModelParallelState(mesh, mesh.plan.vpp if mesh.plan.vpp > 1 else None)
    state.create_combined_groups()
    _STATE = state
    return state


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    context_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int | None = None,
    order: str = "tp-cp-ep-dp-pp",
    **transport_options,
) -> None:
    """Megatron-Core's `initialize_model_parallel`: groups for these sizes over the whole world
    (collective). `expert_tensor_parallel_size` None means the tensor-parallel size, as in
    Megatron. Transport tuning arguments Megatron accepts (`use_sharp`,
    `nccl_communicator_config_path`, `distributed_timeout_minutes`,
    `create_gloo_process_groups`, ...) are accepted and have no effect here.

    Replaces whatever state was installed before (a later `install(pm)` replaces this one).
    """
    unknown = set(transport_options) - _TRANSPORT_OPTIONS
    if unknown:
        raise TypeError(f"initialize_model_parallel got unexpected arguments {sorted(unknown)}")
    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel needs torch.distributed to be initialized")
    world = dist.get_world_size()
    tp, pp, cp = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    if world % (tp * pp * cp):
        raise RuntimeError(f"world size {world} is not divisible by tp*pp*cp={tp}*{pp}*{cp}="
                           f"{tp * pp * cp}; launch a multiple of {tp * pp * cp} ranks")
    if virtual_pipeline_model_parallel_size is not None and pp == 1:
        raise RuntimeError("virtual_pipeline_model_parallel_size needs "
                           "pipeline_model_parallel_size > 1 (the interleaved schedule)")
    sizes = {"tp": tp, "pp": pp, "cp": cp, "ep": expert_model_parallel_size,
             "dp": world // (tp * pp * cp)}
    plan = Plan(tp=tp, pp=pp, cp=cp, ep=expert_model_parallel_size,
                etp=expert_tensor_parallel_size or tp,
                order=_full_order(order, sizes)).resolve(world)
    global _STATE
    state = ModelParallelState(Mesh(plan), virtual_pipeline_model_parallel_size)
    state.create_combined_groups()
    _STATE = state


_TRANSPORT_OPTIONS = {
    "pipeline_model_parallel_comm_backend", "use_sharp", "hierarchical_context_parallel_sizes",
    "num_distributed_optimizer_instances", "nccl_communicator_config_path",
    "distributed_timeout_minutes", "get_embedding_ranks", "get_position_embedding_ranks",
    "create_gloo_process_groups", "high_priority_stream_groups", "sharp_enabled_group",
    "create_all_gather_group",
}


def _full_order(order: str, sizes: dict[str, int]) -> str:
    """`order` with the dimensions it leaves out appended, as RankGenerator does (only
    dimensions of size 1 may be left out)."""
    tokens = order.lower().split("-")
    for name in _MEGATRON_TOKENS:
        if name not in tokens:
            if sizes[name] != 1:
                raise RuntimeError(f"the size of {name} is {sizes[name]}, but order={order!r} "
                                   f"does not place it")
            tokens.append(name)
    return "-".join(tokens)


def model_parallel_is_initialized() -> bool:
    """True once install(pm) or initialize_model_parallel(...) ran in this process."""
    return _STATE is not None


is_initialized = model_parallel_is_initialized


def destroy_model_parallel() -> None:
    """Forget the installed state (the groups stay with the Mesh that owns them)."""
    global _STATE
    _STATE = None


# --- the getters, one triple per dimension ------------------------------------------------------

_NOTE = ("Reports the most recent parallelize installed with install(pm), or the most recent "
         "initialize_model_parallel, whichever came last (several parallel models in one "
         "process: the last one).")


def _getters(dim: str, label: str):
    def get_group(check_initialized: bool = True):
        return _state().group(dim)

    def get_rank() -> int:
        return _state().rank_in(dim)

    def get_world_size() -> int:
        return _state().world_size(dim)

    get_group.__doc__ = f"This rank's {label} process group ({dim}). {_NOTE}"
    get_rank.__doc__ = f"This rank's index in its {label} group ({dim}). {_NOTE}"
    get_world_size.__doc__ = f"The size of the {label} group ({dim}). {_NOTE}"
    return get_group, get_rank, get_world_size


(get_tensor_model_parallel_group, get_tensor_model_parallel_rank,
 get_tensor_model_parallel_world_size) = _getters("tp", "tensor-model-parallel")
(get_pipeline_model_parallel_group, get_pipeline_model_parallel_rank,
 get_pipeline_model_parallel_world_size) = _getters("pp", "pipeline-model-parallel")
(get_context_parallel_group, get_context_parallel_rank,
 get_context_parallel_world_size) = _getters("cp", "context-parallel")
(get_expert_model_parallel_group, get_expert_model_parallel_rank,
 get_expert_model_parallel_world_size) = _getters("ep", "expert-model-parallel")
(get_expert_tensor_parallel_group, get_expert_tensor_parallel_rank,
 get_expert_tensor_parallel_world_size) = _getters("etp", "expert-tensor-parallel")
(get_expert_data_parallel_group, get_expert_data_parallel_rank,
 get_expert_data_parallel_world_size) = _getters("edp", "expert-data-parallel")


def _noted(fn):
    fn.__doc__ = f"{fn.__doc__.rstrip()} {_NOTE}"
    return fn


def _dp(with_context_parallel: bool, partial_data_parallel: bool = False) -> str:
    if partial_data_parallel:
        raise NotImplementedError("partial data parallelism (Megatron's "
                                  "num_distributed_optimizer_instances > 1) has no counterpart "
                                  "here: ZeRO-1 shards over the whole dp group")
    return "dp-cp" if with_context_parallel else "dp"


@_noted
def get_data_parallel_group(with_context_parallel: bool = False,
                            partial_data_parallel: bool = False):
    """This rank's data-parallel group; with_context_parallel=True: data x context parallel
    (the group gradients are reduced over)."""
    return _state().group(_dp(with_context_parallel, partial_data_parallel))


@_noted
def get_data_parallel_rank(with_context_parallel: bool = False,
                           partial_data_parallel: bool = False) -> int:
    """This rank's index in its data-parallel (or data x context parallel) group."""
    return _state().rank_in(_dp(with_context_parallel, partial_data_parallel))


@_noted
def get_data_parallel_world_size(with_context_parallel: bool = False,
                                 partial_data_parallel: bool = False) -> int:
    """The size of the data-parallel (or data x context parallel) group."""
    return _state().world_size(_dp(with_context_parallel, partial_data_parallel))


@_noted
def get_data_parallel_src_rank(with_context_parallel: bool = False) -> int:
    """The global rank of the first rank of this rank's data-parallel group."""
    return _state().ranks(_dp(with_context_parallel))[0]


@_noted
def get_tensor_model_parallel_src_rank() -> int:
    """The global rank of the first rank of this rank's tensor-parallel group."""
    return _state().ranks("tp")[0]


@_noted
def get_context_parallel_global_ranks(check_initialized: bool = True) -> list[int]:
    """The global ranks of this rank's context-parallel group."""
    return _state().ranks("cp")


@_noted
def get_pipeline_model_parallel_first_rank() -> int:
    """The global rank of the first stage of this rank's pipeline."""
    return _state().ranks("pp")[0]


@_noted
def get_pipeline_model_parallel_last_rank() -> int:
    """The global rank of the last stage of this rank's pipeline."""
    return _state().ranks("pp")[-1]


@_noted
def get_pipeline_model_parallel_next_rank() -> int:
    """The global rank after this one in its pipeline (wrapping around)."""
    ranks = _state().ranks("pp")
    return ranks[(ranks.index(_state().rank) + 1) % len(ranks)]


@_noted
def get_pipeline_model_parallel_prev_rank() -> int:
    """The global rank before this one in its pipeline (wrapping around)."""
    ranks = _state().ranks("pp")
    return ranks[(ranks.index(_state().rank) - 1) % len(ranks)]


@_noted
def get_virtual_pipeline_model_parallel_world_size() -> int | None:
    """Virtual pipeline stages per rank, None without interleaving."""
    return _state().vpp


@_noted
def get_virtual_pipeline_model_parallel_rank() -> int | None:
    """The virtual stage being built (Megatron's mutable counter)."""
    return _state().vp_rank


def set_virtual_pipeline_model_parallel_rank(rank: int) -> None:
    """Set the virtual stage being built (Megatron's mutable counter)."""
    _state().vp_rank = rank


@_noted
def is_pipeline_first_stage(ignore_virtual: bool = True, vp_stage: int | None = None) -> bool:
    """True on the first pipeline stage (with ignore_virtual=False: and virtual stage 0)."""
    return _state().holds_stage(0, ignore_virtual, vp_stage)


@_noted
def is_pipeline_last_stage(ignore_virtual: bool = True, vp_stage: int | None = None) -> bool:
    """True on the last pipeline stage (with ignore_virtual=False: and the last virtual
    stage)."""
    state = _state()
    return state.holds_stage(state.world_size("pp") * (state.vpp or 1) - 1, ignore_virtual,
                             vp_stage)


def megatron_rank_groups(plan: Plan) -> dict[str, list[list[int]]]:
    """Every group of every dimension, as Megatron's `RankGenerator.get_ranks(token)` lists
    them, from the layout of a resolved plan (no process group): {"tp": [[0, 1], ...], ...}."""
    states = [ModelParallelState.of_rank(plan, rank) for rank in range(plan.world_size)]
    return {dim: _partitions(lambda rank: states[rank].ranks(dim), plan.world_size)
            for dim in _LAYOUT_DIMS + tuple(_COMBINED_DIMS)}
