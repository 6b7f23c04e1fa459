"""What `core.ops.checkpointed_attention` does (the recompute pass's selective granularity).

torch.utils.checkpoint (non-reentrant): the forward keeps only q, k, v, and backward runs the
attention again (with the same RNG state) to rebuild what it needs; the kernel dispatch picks
flash attention on CUDA. Results are bit-for-bit those of the plain graph. The full granularity
needs nothing from the runtime: `core.ops.CheckpointedRegion` is plain torch.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from core import ops
from runtime.kernels import dispatch  # noqa: F401 - registers ops.scaled_dot_product_attention


def checkpointed_attention(*args, **kwargs):
    """scaled_dot_product_attention that keeps only q, k, v for backward."""
    return checkpoint(ops.scaled_dot_product_attention, *args, use_reentrant=False, **kwargs)


# CompositeImplicitAutograd: the checkpoint is autograd's business, as for a Python call
torch.library.impl(ops.checkpointed_attention._name, "CompositeImplicitAutograd")(
    checkpointed_attention)
