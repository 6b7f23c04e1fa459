"""Sharded checkpoints with torch.distributed.checkpoint (DCP) that any plan can read.

DCP reshards rectangular chunks of tensors saved under stable names. Our shards are not all
rectangles of the model's tensors, so the checkpoint stores what is:
- every parameter and persistent buffer under the model's own name at its unpadded full shape:
  a tensor split by plain shards as a DTensor over the plan's device mesh (each rank writes its
  chunk, the vocabulary padding cut off), a replicated one as a plain tensor (DCP writes one
  copy of replicas);
- a fused projection (q|k|v, gate|up: `StridedShard`) as its separate row blocks, `name#0`,
  `name#1`, ...: each block is a plain shard of its own;
- optimizer state keyed by parameter name, `optim/<name>/<key>` (ZeRO-1's flat shards
  gathered back into per-parameter tensors first), and the optimizer's hyperparameters.
Loading asks DCP for this rank's pieces under the loading plan: a plain shard is read in place,
anything else (a fused projection read by another split, blocks read whole) through one full
tensor that this rank then shards. A save writes to `<path>.partial` and renames it to `path`
when every rank is done, so an interrupted save never leaves a checkpoint at `path`.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate as DReplicate
from torch.distributed.tensor import Shard as DShard

from core.layout import RankLayout
from core.placement import ParamLayout, Shard, StridedShard

if TYPE_CHECKING:
    from partitioner.state import LocalState

log = logging.getLogger(__name__)

BLOCK = "#"
"""`name#i`: row block i of a fused projection."""
OPTIM = "optim/"
GROUPS = "optim/param_groups"
DROPOUT_STEP = "partitioner/dropout_step"
"""The dropout generator's step counter (`ParallelModel.dropout_step`), so a resumed run
draws the masks the uninterrupted one would."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read into this model (missing, interrupted, mismatched)."""


# --- saving ------------------------------------------------------------------------------------

def save(state: "LocalState", path: str, optimizer: torch.optim.Optimizer | None = None,
         dropout_step: int = 0) -> None:
    """Collective: write this model's (and optimizer's) state and the dropout step counter to
    the directory `path`."""
    state.gather()
    mesh = _device_mesh(state)
    entries: dict[str, object] = {DROPOUT_STEP: torch.tensor(dropout_step)}
    for name, layout in state.program.layouts.items():
        if layout.is_buffer and not layout.persistent:
            continue
        entries.update(_save_entries(name, layout, state.local(name).detach(), mesh, state))
    if optimizer is not None:
        for name, key, value in _optimizer_values(state, optimizer):
            layout = state.program.layouts[name]
            if isinstance(value, torch.Tensor) and value.shape == state.local(name).shape:
                entries.update(_save_entries(f"{OPTIM}{name}/{key}", layout, value, mesh, state))
            else:
                entries[f"{OPTIM}{name}/{key}"] = value
        groups = io.BytesIO()
        torch.save([{k: v for k, v in group.items() if k != "params"}
                    for group in optimizer.param_groups], groups)
        entries[GROUPS] = groups
    partial = f"{path}.partial"
    if dist.get_rank() == 0 and os.path.exists(partial):
        shutil.rmtree(partial)  # an earlier interrupted save
    dist.barrier()
    dcp.save(entries, storage_writer=FileSystemWriter(partial))
    dist.barrier()
    if dist.get_rank() == 0:
        _commit(partial, path)
    dist.barrier()


def _commit(partial: str, path: str) -> None:
    """Make the finished save the checkpoint at `path` (the old one, if any, is removed)."""
    old = f"{path}.old"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(partial, path)
    if os.path.exists(old):
        shutil.rmtree(old)


def _save_entries(key: str, layout: ParamLayout, local: torch.Tensor, mesh: "Meshes",
                  state) -> dict[str, object]:
    splits = list(layout.placements.splits())
    if not splits:
        return {key: local}
    strided = [(d, p) for d, p in splits if isinstance(p, StridedShard)]
    if strided:  # fused projections (tp), an expert's gate|up (etp): each block on its own
        (mesh_dim, placement), = strided
        others = {d: p for d, p in splits if d != mesh_dim}
        parts = state.program.sizes[mesh_dim]
        pieces = local.split([b // parts for b in placement.blocks], dim=placement.dim)
        out = {}
        for i, (block, piece) in enumerate(zip(placement.blocks, pieces, strict=True)):
            shape = list(layout.full_shape)
            shape[placement.dim] = block
            out[f"{key}{BLOCK}{i}"] = _dtensor(
                piece, mesh, {**others, mesh_dim: Shard(placement.dim)}, tuple(shape))
        return out
    return {key: _dtensor(_unpadded(local, layout, state), mesh, dict(splits), layout.full_shape)}


def _unpadded(local: torch.Tensor, layout: ParamLayout, state) -> torch.Tensor:
    """This rank's shard without the zero rows that pad a vocabulary to a multiple of tp."""
    for mesh_dim, placement in layout.placements.splits():
        if isinstance(placement, Shard) and placement.padded is not None:
            full = layout.full_shape[placement.dim]
            per = placement.padded // state.program.sizes[mesh_dim]
            start = state.program.coords[mesh_dim] * per
            local = local.narrow(placement.dim, 0, max(0, min(per, full - start)))
    return local


def _dtensor(local: torch.Tensor, mesh: "Meshes", splits: dict, shape) -> DTensor:
    mesh = mesh.expert if set(splits) & _EXPERT_DIMS else mesh.dense
    placements = [DShard(splits[dim].dim) if dim in splits else DReplicate()
                  for dim in mesh.mesh_dim_names]
    return DTensor.from_local(local.contiguous(), mesh, placements, run_check=False,
                              shape=torch.Size(shape), stride=_contiguous_stride(shape))


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, out = 1, []
    for size in reversed(shape):
        out.append(stride)
        stride *= size
    return tuple(reversed(out))


_EXPERT_DIMS = {"etp", "ep", "edp"}


@dataclass(frozen=True)
class Meshes:
    """The plan's rank layouts as DeviceMeshes: dense (tp-cp-dp-pp) for every tensor, expert
    (etp-ep-edp-pp) for the experts split over ep (None without ep)."""

    dense: DeviceMesh
    expert: DeviceMesh | None


def _device_mesh(state) -> Meshes:
    """Made once per model (a DeviceMesh creates groups: every rank builds the same ones)."""
    meshes = getattr(state, "_checkpoint_mesh", None)
    if meshes is None:
        plan = state.program.plan
        meshes = Meshes(_as_device_mesh(RankLayout.dense(plan), state.device),
                        _as_device_mesh(RankLayout.expert(plan), state.device)
                        if plan.ep > 1 else None)
        state._checkpoint_mesh = meshes
    return meshes


def _as_device_mesh(layout: RankLayout, device: torch.device) -> DeviceMesh:
    names = tuple(dim for dim, _ in reversed(layout.sizes))  # slowest first
    ranks = torch.arange(layout.world_size).reshape([size for _, size in reversed(layout.sizes)])
    return DeviceMesh(device.type, ranks, mesh_dim_names=names)


# --- optimizer state ---------------------------------------------------------------------------

def _optimizer_values(state, optimizer):
    """(parameter name, state key, value) for every optimizer state entry, per parameter:
    tensors of a parameter's local shape, or the optimizer's scalars (step)."""
    names = {id(state.local(name)): name for name in state.program.layouts}
    if state.zero is None:
        for param, entry in optimizer.state.items():
            for key, value in entry.items():
                yield names[id(param)], key, value
        return
    shards = {id(shard): shard_key for shard_key, shard in state.zero.shards.items()}
    for param, entry in optimizer.state.items():
        shard_key = shards[id(param)]
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                flat = _gather_flat(state, shard_key, value)
                for p, view in _per_parameter(state, shard_key, flat):
                    yield names[id(p)], key, view
            else:
                for p in state.zero.params[shard_key]:
                    yield names[id(p)], key, value


def _gather_flat(state, key, shard_value: torch.Tensor) -> torch.Tensor:
    flat = torch.empty_like(state.zero.flat[key], dtype=shard_value.dtype)
    if state.zero.group(key) is None:
        flat.copy_(shard_value)
    else:
        dist.all_gather_into_tensor(flat, shard_value.contiguous(), group=state.zero.group(key))
    return flat


def _per_parameter(state, key, flat: torch.Tensor):
    offset = 0
    for p in state.zero.params[key]:
        yield p, flat[offset: offset + p.numel()].view_as(p)
        offset += p.numel()


# --- loading -----------------------------------------------------------------------------------

def load(state: "LocalState", path: str,
         optimizer: torch.optim.Optimizer | None = None) -> int | None:
    """Collective: read the checkpoint at `path` (saved under any plan) into this model;
    returns the dropout step counter it holds (None for a checkpoint saved without one)."""
    metadata = _metadata(path)
    saved = metadata.state_dict_metadata
    mesh = _device_mesh(state)
    targets: dict[str, object] = {}
    if DROPOUT_STEP in saved:
        targets[DROPOUT_STEP] = torch.tensor(0)
    finish = []  # callbacks run after DCP filled the targets
    missing = []
    for name, layout in state.program.all_layouts.items():
        if layout.is_buffer and not layout.persistent:
            continue
        if name not in state.program.layouts:
            if not _has(saved, name):
                missing.append(name)
            continue
        if not _plan_load(name, layout, state.local(name).detach(), saved, mesh, state,
                          targets, finish):
            missing.append(name)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} tensors of this model: "
                              f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    optimizer_slots = _optimizer_targets(state, optimizer, saved, mesh, targets, finish) \
        if optimizer is not None else None
    dcp.load(targets, storage_reader=FileSystemReader(path))
    with torch.no_grad():
        for callback in finish:
            callback()
    if optimizer is not None:
        optimizer_slots(targets)
    if state.zero is not None:
        state.zero.refresh_shards()
    return int(targets[DROPOUT_STEP]) if DROPOUT_STEP in targets else None


def _metadata(path: str):
    if not os.path.isdir(path):
        hint = (f"; an interrupted save left {path}.partial (it is not a checkpoint)"
                if os.path.exists(f"{path}.partial") else "")
        raise CheckpointError(f"no checkpoint at {path}{hint}")
    try:
        return FileSystemReader(path).read_metadata()
    except Exception as error:  # noqa: BLE001 - any unreadable checkpoint gets one message
        raise CheckpointError(f"checkpoint at {path} is unreadable ({error}); it was not "
                              f"written by a completed pm.save") from error


def _has(saved, key: str) -> bool:
    return key in saved or f"{key}{BLOCK}0" in saved


def _plan_load(key, layout, local, saved, mesh, state, targets, finish) -> bool:
    """Add the DCP targets that fill `local` from `key`; False if the checkpoint lacks it."""
    splits = list(layout.placements.splits())
    if key in saved and not any(isinstance(p, StridedShard) for _, p in splits):
        if splits:  # a plain shard: DCP reads this rank's chunk in place
            targets[key] = _dtensor(_unpadded(local, layout, state), mesh, dict(splits),
                                    layout.full_shape)
        else:
            targets[key] = local
        return True
    if not _has(saved, key):
        return False
    full = torch.empty(layout.full_shape, dtype=local.dtype, device=local.device)
    if key in saved:
        targets[key] = full
    else:  # saved as fused blocks: read each into its rows of the full tensor
        index = 0
        offset = 0
        while f"{key}{BLOCK}{index}" in saved:
            size = saved[f"{key}{BLOCK}{index}"].size
            dim = next(d for d, (a, b) in enumerate(zip(size, layout.full_shape, strict=True))
                       if a != b) if tuple(size) != layout.full_shape else 0
            targets[f"{key}{BLOCK}{index}"] = full.narrow(dim, offset, size[dim])
            offset += size[dim]
            index += 1
    finish.append(lambda: local.copy_(layout.shard(full, state.program.coords,
                                                   state.program.sizes)))
    return True


def _optimizer_targets(state, optimizer, saved, mesh, targets, finish):
    """Targets for the optimizer's per-parameter state; returns the step that installs it."""
    names = {id(state.local(name)): name for name in state.program.layouts}
    keys_of: dict[str, list[str]] = {}
    for key in saved:
        if key.startswith(OPTIM) and key != GROUPS:
            name, _, slot = key[len(OPTIM):].rpartition("/")
            slot = slot.split(BLOCK)[0]
            keys_of.setdefault(name, [])
            if slot not in keys_of[name]:
                keys_of[name].append(slot)
    values: dict[tuple[str, str], torch.Tensor] = {}
    for name in state.program.layouts:
        layout, local = state.program.layouts[name], state.local(name)
        for slot in keys_of.get(name, []):
            key = f"{OPTIM}{name}/{slot}"
            meta = saved.get(key)
            if meta is not None and not hasattr(meta, "size"):
                continue  # a non-tensor value: read below through the groups object
            if meta is not None and tuple(meta.size) != layout.full_shape:
                values[(name, slot)] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
                targets[key] = values[(name, slot)]
                continue
            value = torch.zeros_like(local)
            values[(name, slot)] = value
            _plan_load(key, layout, value, saved, mesh, state, targets, finish)
    targets[GROUPS] = io.BytesIO()

    def install(loaded: dict) -> None:
        loaded[GROUPS].seek(0)
        groups = torch.load(loaded[GROUPS], weights_only=False)
        if len(groups) != len(optimizer.param_groups):
            raise CheckpointError(f"the checkpoint's optimizer has {len(groups)} parameter "
                                  f"groups, this one {len(optimizer.param_groups)}")
        for group, saved_group in zip(optimizer.param_groups, groups, strict=True):
            group.update(saved_group)
        if state.zero is None:
            for param in (p for g in optimizer.param_groups for p in g["params"]):
                name = names[id(param)]
                optimizer.state[param] = {slot: values[(name, slot)]
                                          for slot in keys_of.get(name, [])}
            return
        for key, shard in state.zero.shards.items():
            entry = {}
            for slot in keys_of.get(names[id(state.zero.params[key][0])], []):
                sample = values[(names[id(state.zero.params[key][0])], slot)]
                if sample.shape == state.zero.params[key][0].shape:
                    flat = torch.zeros_like(state.zero.flat[key], dtype=sample.dtype)
                    for p, view in _per_parameter(state, key, flat):
                        view.copy_(values[(names[id(p)], slot)])
                    entry[slot] = state.zero.my_slice(key, flat).clone()
                else:
                    entry[slot] = sample
            optimizer.state[shard] = entry

    return install
