"""Activation recomputation ops that the recompute pass inserts into graphs.

Both use torch.utils.checkpoint (non-reentrant): the forward keeps only the region's inputs, and
backward runs the region again (with the same RNG state) to rebuild what it needs. Results are
bit-for-bit those of the plain graph.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from runtime.collectives import active_mesh, bind_mesh
from runtime.kernels import dispatch


def checkpointed_attention(*args, **kwargs):
    """scaled_dot_product_attention that keeps only q, k, v for backward (selective); the
    kernel dispatch picks flash attention on CUDA."""
    return checkpoint(dispatch.scaled_dot_product_attention, *args, use_reentrant=False,
                      **kwargs)


class CheckpointedRegion(nn.Module):
    """Runs `region` (a GraphModule taking every input explicitly, parameters included) under
    activation checkpointing (full recompute of one block)."""

    def __init__(self, region: nn.Module) -> None:
        super().__init__()
        self.region = region

    def forward(self, *inputs):
        if not torch.is_grad_enabled():
            return self.region(*inputs)
        # Backward recomputes the region (and its collectives) after the step has left the
        # mesh's context: take the mesh along.
        mesh = active_mesh()

        def run(*args):
            with bind_mesh(mesh):
                return self.region(*args)

        return checkpoint(run, *inputs, use_reentrant=False)
