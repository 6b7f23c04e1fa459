"""Collectives in three layers: primitives on a process group, conjugate autograd Functions, and
the public wrappers that graphs call by mesh-dimension name.

The wrappers are what passes insert into graphs: `all_reduce(x, "tp")` names its mesh dimension,
and the runtime resolves it through the mesh bound with `bind_mesh` while a ParallelModel runs.
A dimension of size 1 has no group and every collective on it is the identity. Each primitive
returns a new tensor it owns (never the result of a collective on a temporary that is then
dropped: Megatron's `_reduce` loses its result for non-contiguous inputs).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from contextvars import ContextVar

import torch
import torch.distributed as dist

_ACTIVE_MESH: ContextVar = ContextVar("partitioner_active_mesh", default=None)
_GATHERED: ContextVar = ContextVar("partitioner_gathered_for_region", default=None)


@contextlib.contextmanager
def bind_mesh(mesh):
    """Resolve mesh-dimension names in collectives to `mesh`'s groups inside this block."""
    token = _ACTIVE_MESH.set(mesh)
    try:
        yield mesh
    finally:
        _ACTIVE_MESH.reset(token)


def active_mesh():
    """The mesh bound by the innermost `bind_mesh`, or None."""
    return _ACTIVE_MESH.get()


def group_of(dim: str):
    """(process group or None, group size) of the bound mesh's dimension `dim`."""
    mesh = _ACTIVE_MESH.get()
    if mesh is None:
        raise RuntimeError(
            f"collective on mesh dimension {dim!r} outside a ParallelModel: no mesh is bound "
            f"(use runtime.collectives.bind_mesh(mesh))")
    return mesh.group(dim), mesh.size(dim)


# --- primitives: a tensor and a group in, a fresh tensor out -------------------------------

def all_gather_into(out: torch.Tensor, x: torch.Tensor, group, async_op: bool = False):
    """`out` (size * x's dim 0) <- every rank's `x`, stacked along dim 0."""
    with warnings.catch_warnings():  # renamed to all_gather_single in torch 2.13; 2.11 lacks it
        warnings.simplefilter("ignore", FutureWarning)
        return dist.all_gather_into_tensor(out, x, group=group, async_op=async_op)


def reduce_scatter_into(out: torch.Tensor, x: torch.Tensor, group, async_op: bool = False):
    """`out` <- the sum over ranks of chunk `rank` of `x` along dim 0."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return dist.reduce_scatter_tensor(out, x, group=group, async_op=async_op)


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=op, group=group)
    return out


def _all_gather(x: torch.Tensor, group, size: int, dim: int) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty((size * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    all_gather_into(out, x, group)
    if dim == 0:
        return out
    return torch.cat(out.chunk(size, dim=0), dim=dim)


def _reduce_scatter(x: torch.Tensor, group, size: int, dim: int) -> torch.Tensor:
    if x.shape[dim] % size:
        raise ValueError(f"reduce_scatter: dim {dim} of shape {tuple(x.shape)} is not "
                         f"divisible by the group size {size}")
    inp = torch.cat(x.chunk(size, dim=dim), dim=0).contiguous() if dim != 0 else x.contiguous()
    out = torch.empty((inp.shape[0] // size,) + tuple(inp.shape[1:]), dtype=x.dtype,
                      device=x.device)
    reduce_scatter_into(out, inp, group)  # chunk i of `dim` went to rank i
    return out


def _split(x: torch.Tensor, group, size: int, dim: int) -> torch.Tensor:
    if x.shape[dim] % size:
        raise ValueError(f"split: dim {dim} of shape {tuple(x.shape)} is not divisible by "
                         f"the group size {size}")
    index = dist.get_group_rank(group, dist.get_rank())
    return x.chunk(size, dim=dim)[index].contiguous()


def _all_to_all(x: torch.Tensor, group, size: int, scatter_dim: int, gather_dim: int):
    inputs = [chunk.contiguous() for chunk in x.chunk(size, dim=scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(size)]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


# --- conjugate autograd pairs ----------------------------------------------------------------

class _CopyToRegion(torch.autograd.Function):
    """f: identity forward, all-reduce backward (enters a column-parallel region)."""

    @staticmethod
    def forward(ctx, x, dim):
        ctx.group, _ = group_of(dim)  # backward runs outside bind_mesh (loss.backward())
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    """g: all-reduce forward, identity backward (leaves a row-parallel region)."""

    @staticmethod
    def forward(ctx, x, dim):
        group, _ = group_of(dim)
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromRegion(torch.autograd.Function):
    """All-gather along `tensor_dim` forward, keep our slice backward."""

    @staticmethod
    def forward(ctx, x, dim, tensor_dim):
        ctx.tensor_dim = tensor_dim
        group, size = group_of(dim)
        ctx.group, ctx.size = group, size  # backward runs outside bind_mesh
        return _all_gather(x, group, size, tensor_dim)

    @staticmethod
    def backward(ctx, grad):
        group, size = ctx.group, ctx.size
        return _split(grad, group, size, ctx.tensor_dim), None, None


class _ScatterToRegion(torch.autograd.Function):
    """Keep our slice along `tensor_dim` forward, all-gather backward."""

    @staticmethod
    def forward(ctx, x, dim, tensor_dim):
        ctx.tensor_dim = tensor_dim
        group, size = group_of(dim)
        ctx.group, ctx.size = group, size  # backward runs outside bind_mesh
        return _split(x, group, size, tensor_dim)

    @staticmethod
    def backward(ctx, grad):
        group, size = ctx.group, ctx.size
        return _all_gather(grad, group, size, ctx.tensor_dim), None, None


class _ReduceScatterToRegion(torch.autograd.Function):
    """Reduce-scatter along `tensor_dim` forward, all-gather backward (SP after a row region)."""

    @staticmethod
    def forward(ctx, x, dim, tensor_dim):
        ctx.tensor_dim = tensor_dim
        group, size = group_of(dim)
        ctx.group, ctx.size = group, size  # backward runs outside bind_mesh
        return _reduce_scatter(x, group, size, tensor_dim)

    @staticmethod
    def backward(ctx, grad):
        group, size = ctx.group, ctx.size
        return _all_gather(grad, group, size, ctx.tensor_dim), None, None


class _AllGatherToRegion(torch.autograd.Function):
    """All-gather along `tensor_dim` forward, reduce-scatter backward (SP before a column region)."""

    @staticmethod
    def forward(ctx, x, dim, tensor_dim):
        ctx.tensor_dim = tensor_dim
        group, size = group_of(dim)
        ctx.group, ctx.size = group, size  # backward runs outside bind_mesh
        out = _all_gather(x, group, size, tensor_dim)
        registry = _GATHERED.get()
        if registry is not None:  # inside save_gathered_as_shards: saved as the shard
            key = out.untyped_storage().data_ptr()
            registry[key] = (weakref.ref(out, lambda _: registry.pop(key, None)),
                             _ShardSave(x.detach(), group, size, tensor_dim))
        return out

    @staticmethod
    def backward(ctx, grad):
        group, size = ctx.group, ctx.size
        return _reduce_scatter(grad, group, size, ctx.tensor_dim), None, None


class _ShardSave:
    """A gathered tensor as autograd keeps it: this rank's shard, gathered again the first time
    backward reads it (and shared by every op that saved it, like q, k and v's linears)."""

    def __init__(self, shard: torch.Tensor, group, size: int, dim: int) -> None:
        self.shard, self.group, self.size, self.dim = shard, group, size, dim
        self._outer = None  # (unpack, packed shard) once an enclosing hook has packed it
        self._full: torch.Tensor | None = None

    def pack(self, outer) -> None:
        if outer is not None and self._outer is None:  # e.g. save_on_cpu around the model
            self._outer, self.shard = (outer[1], outer[0](self.shard)), None

    def full(self) -> torch.Tensor:
        if self._full is None:
            shard = self.shard if self._outer is None else self._outer[0](self._outer[1])
            self._full = _all_gather(shard, self.group, self.size, self.dim)
        return self._full


class _Saved:
    """What the hooks keep: a view of a _ShardSave's tensor, or an enclosing hook's package."""

    def __init__(self, save=None, view=None, outer=None) -> None:
        self.save, self.view, self.outer = save, view, outer


def _enclosing_hooks():
    """The saved-tensor hooks active around ours (they would be shadowed, so we chain them)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


def _pack(registry: dict, outer, tensor: torch.Tensor):
    entry = registry.get(tensor.untyped_storage().data_ptr())
    if entry is not None and entry[0]() is not None:
        save = entry[1]
        save.pack(outer)
        return _Saved(save, (tensor.size(), tensor.stride(), tensor.storage_offset()))
    return tensor if outer is None else _Saved(outer=(outer[1], outer[0](tensor)))


def _unpack(packed):
    if not isinstance(packed, _Saved):
        return packed
    if packed.save is not None:
        return packed.save.full().as_strided(*packed.view)
    unpack, value = packed.outer
    return unpack(value)


@contextlib.contextmanager
def save_gathered_as_shards():
    """While active, what `gather_for_region` gathers is saved for backward as this rank's
    sequence shard and all-gathered again in backward (Megatron's sequence-parallel linears keep
    their local input): the column linears' inputs cost 1/tp of the activation memory.

    The gathered value is found by its storage, so views of it (linear's 2-d reshape) count
    too; a registry entry dies with the gathered tensor, so a reused address never matches.
    Saved-tensor hooks active around this block still see every tensor (the shard, for ours).
    """
    registry: dict = {}
    outer = _enclosing_hooks()
    token = _GATHERED.set(registry)
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: _pack(registry, outer, t),
                                                      _unpack):
            yield
    finally:
        _GATHERED.reset(token)


class _AllToAll(torch.autograd.Function):
    """All-to-all forward; backward is the same exchange with the dimensions swapped."""

    @staticmethod
    def forward(ctx, x, dim, scatter_dim, gather_dim):
        ctx.scatter_dim, ctx.gather_dim = scatter_dim, gather_dim
        group, size = group_of(dim)
        ctx.group, ctx.size = group, size  # backward runs outside bind_mesh
        return _all_to_all(x, group, size, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        group, size = ctx.group, ctx.size
        return _all_to_all(grad, group, size, ctx.gather_dim, ctx.scatter_dim), None, None, None


# --- public wrappers: what graphs call -------------------------------------------------------

def _bypass(dim: str) -> bool:
    return group_of(dim)[1] == 1


def copy_to_region(x: torch.Tensor, dim: str) -> torch.Tensor:
    """Forward: identity. Backward: all-reduce over `dim`."""
    return x if _bypass(dim) else _CopyToRegion.apply(x, dim)


def all_reduce(x: torch.Tensor, dim: str) -> torch.Tensor:
    """Forward: sum over `dim`. Backward: identity (the conjugate of copy_to_region)."""
    return x if _bypass(dim) else _ReduceFromRegion.apply(x, dim)


def all_gather(x: torch.Tensor, dim: str, tensor_dim: int) -> torch.Tensor:
    """Forward: concatenate every rank's `x` along `tensor_dim`. Backward: keep our slice."""
    return x if _bypass(dim) else _GatherFromRegion.apply(x, dim, tensor_dim)


def scatter(x: torch.Tensor, dim: str, tensor_dim: int) -> torch.Tensor:
    """Forward: keep our slice along `tensor_dim`. Backward: all-gather."""
    return x if _bypass(dim) else _ScatterToRegion.apply(x, dim, tensor_dim)


def reduce_scatter(x: torch.Tensor, dim: str, tensor_dim: int) -> torch.Tensor:
    """Forward: sum over `dim` and keep our slice of `tensor_dim`. Backward: all-gather."""
    return x if _bypass(dim) else _ReduceScatterToRegion.apply(x, dim, tensor_dim)


def gather_for_region(x: torch.Tensor, dim: str, tensor_dim: int) -> torch.Tensor:
    """Forward: all-gather along `tensor_dim`. Backward: reduce-scatter (SP -> TP region)."""
    return x if _bypass(dim) else _AllGatherToRegion.apply(x, dim, tensor_dim)


def all_to_all(x: torch.Tensor, dim: str, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Forward: split `scatter_dim` over ranks, concatenate received along `gather_dim`.
    Backward: the same exchange with the two dimensions swapped."""
    return x if _bypass(dim) else _AllToAll.apply(x, dim, scatter_dim, gather_dim)


# Graph nodes whose target is one of these are inserted collectives; the value is the name
# reports use (DESIGN.md's `collective` field).
COLLECTIVE_KINDS = {
    copy_to_region: None,  # no communication forward
    all_reduce: "all_reduce",
    all_gather: "all_gather",
    scatter: None,
    reduce_scatter: "reduce_scatter",
    gather_for_region: "all_gather",
    all_to_all: "all_to_all",
}
