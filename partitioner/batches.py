"""Global batches, microbatches and flat input leaves (pytree helpers of the face)."""

from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

from core.plan import Plan, PlanError


def batch_size(args: tuple, kwargs: dict) -> int | None:
    """Dim 0 of the first tensor input with a dimension; None when there is none."""
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


def tile_batch(tree, times: int):
    """`tree` with every tensor whose dim 0 is the batch repeated `times` along dim 0: the
    shape of `times` ranks' shares put together (other leaves unchanged)."""
    batch = batch_size(*tree)
    tiled: dict[int, torch.Tensor] = {}  # one tensor passed twice stays one (export aliases it)

    def tile(leaf):
        if not (isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == batch):
            return leaf
        if id(leaf) not in tiled:
            tiled[id(leaf)] = torch.cat([leaf] * times)
        return tiled[id(leaf)]

    return pytree.tree_map(tile, tree)


def first_microbatch(plan: Plan, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The (args, kwargs) of one microbatch of the global example batch: the shape `step`
    runs and so the shape to capture. Raises PlanError when the batch does not split."""
    batch = batch_size(args, kwargs)
    if batch is None:
        return args, kwargs
    chunks = plan.degree("dp") * plan.microbatches
    if batch % chunks:
        raise PlanError(f"the example batch of {batch} does not split into dp*microbatches="
                        f"{plan.degree('dp')}*{plan.microbatches}={chunks} equal parts; "
                        f"use a global batch that is a multiple of {chunks}")
    return split_batch((args, kwargs), chunks, batch)[0]


def input_leaves(args: tuple, kwargs: dict) -> list:
    """The call's flat input leaves, in the order of the captured graph's placeholders."""
    return pytree.tree_leaves((tuple(args), dict(kwargs)))


def on_device(tree, device):
    """Every tensor of `tree` moved to `device`."""
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tree)
