"""The ops passes insert into graphs, declared once: `torch.library` schemas in the `partitioner`
namespace with fake (shape-only) implementations, so a pass names them without importing the
runtime and `dump` runs them on meta tensors; `runtime/` registers what they do.

Collectives take `(x, group, tensor dims...)`. `group` is the mesh dimension ("tp") as the
passes write it; `passes.lowering.collectives` replaces it by the c10d name of this rank's
process group along that dimension and fills `group_size` (as `_c10d_functional`'s ops carry
theirs), so a lowered graph needs no ambient state to run and its shapes are known without a
live group. Each is an autograd pair (Megatron-Core's mappings):

    copy_to_region     f: identity            / all-reduce        (enters a column region)
    all_reduce         g: all-reduce          / identity          (leaves a row region)
    all_gather         all-gather             / keep our slice
    scatter            keep our slice         / all-gather
    reduce_scatter     reduce-scatter         / all-gather        (sp: leaves a row region)
    gather_for_region  all-gather             / reduce-scatter    (sp: enters a column region)
    all_to_all         all-to-all             / all-to-all with the dims swapped
    batch_statistic    all-reduce (sum/mean)  / the same all-reduce (a statistic over the
                                                batch's tokens, passes/batch_statistics.py)

Fused with the matmuls beside them (runtime/async_tp.py), so communication overlaps compute:

    copy_matmul            f + linears          / input grad all-reduced while the weight
                                                  grads are computed (every eager program)
    all_gather_matmul      sp gather + linears  / reduce-scatter + re-gather, ring steps
    matmul_reduce_scatter  linear + sp reduce-  / gather, ring steps      (async_tp=on)
                           scatter, ring steps

Kernel ops (passes/kernels.py) have the signature of the op they stand for and the same numbers
wherever no Triton kernel applies; `checkpointed_attention` is attention that keeps only q, k, v
for backward. `CheckpointedRegion` is the module the recompute pass puts around a sub-graph.

`dropout_mask` is the plan's dropout generator (core/dropout.py): the graph multiplies a dropped
value by it, so autograd keeps the mask for backward as torch's dropout keeps its noise.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                    create_selective_checkpoint_contexts)

from core import dropout

NAMESPACE = "partitioner"
_LIB = torch.library.Library(NAMESPACE, "DEF")

# --- collectives ---------------------------------------------------------------------------

_COLLECTIVE_SCHEMAS = {
    # the output aliases the input: f's forward is free (a custom op may not return its input
    # unless the schema says so, and a copy would cost one activation per column region)
    "copy_to_region": "(Tensor(a) x, str group) -> Tensor(a)",
    "all_reduce": "(Tensor x, str group) -> Tensor",
    "all_gather": "(Tensor x, str group, int tensor_dim, *, int group_size=0) -> Tensor",
    "scatter": "(Tensor x, str group, int tensor_dim, *, int group_size=0) -> Tensor",
    "reduce_scatter": "(Tensor x, str group, int tensor_dim, *, int group_size=0) -> Tensor",
    "gather_for_region": "(Tensor x, str group, int tensor_dim, *, int group_size=0) -> Tensor",
    "all_to_all": ("(Tensor x, str group, int scatter_dim, int gather_dim, *, "
                   "int group_size=0) -> Tensor"),
    "batch_statistic": "(Tensor x, str group, bool mean) -> Tensor",
}
for _name, _schema in _COLLECTIVE_SCHEMAS.items():
    _LIB.define(_name + _schema)

copy_to_region = torch.ops.partitioner.copy_to_region.default
all_reduce = torch.ops.partitioner.all_reduce.default
all_gather = torch.ops.partitioner.all_gather.default
scatter = torch.ops.partitioner.scatter.default
reduce_scatter = torch.ops.partitioner.reduce_scatter.default
gather_for_region = torch.ops.partitioner.gather_for_region.default
all_to_all = torch.ops.partitioner.all_to_all.default
batch_statistic = torch.ops.partitioner.batch_statistic.default

COLLECTIVES = (copy_to_region, all_reduce, all_gather, scatter, reduce_scatter,
               gather_for_region, all_to_all, batch_statistic)

OP_NAME = {op: str(op._schema.name).removeprefix("partitioner::") for op in COLLECTIVES}
"""Op -> its name ("all_reduce"), as the passes' records give an inserted collective's kind."""

SIZED = frozenset({all_gather, scatter, reduce_scatter, gather_for_region, all_to_all})
"""The collectives whose output shape depends on the group size (they take `group_size`)."""

COLLECTIVE_KINDS = {
    copy_to_region: None,  # no communication forward
    all_reduce: "all_reduce",
    all_gather: "all_gather",
    scatter: None,
    reduce_scatter: "reduce_scatter",
    gather_for_region: "all_gather",
    all_to_all: "all_to_all",
    batch_statistic: "all_reduce",
}
"""Graph nodes whose target is one of these are inserted collectives; the value is the name
reports use (DESIGN.md's `collective` field)."""


def _known_size(name: str, group: str, group_size: int) -> int:
    if group_size < 1:
        raise ValueError(f"partitioner.{name} over {group!r} has no group size: shapes are known "
                         f"once passes.lowering.collectives has fixed the group")
    return group_size


def _resized(x: torch.Tensor, dim: int, multiply: int = 1, divide: int = 1) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = shape[dim] * multiply // divide
    return x.new_empty(shape)


@torch.library.register_fake("partitioner::batch_statistic")
def _batch_statistic_fake(x, group, mean):
    return torch.empty_like(x)


@torch.library.register_fake("partitioner::copy_to_region")
def _copy_to_region_fake(x, group):
    return x.view_as(x)


@torch.library.register_fake("partitioner::all_reduce")
def _all_reduce_fake(x, group):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("partitioner::all_gather")
def _all_gather_fake(x, group, tensor_dim, *, group_size=0):
    return _resized(x, tensor_dim, multiply=_known_size("all_gather", group, group_size))


@torch.library.register_fake("partitioner::gather_for_region")
def _gather_for_region_fake(x, group, tensor_dim, *, group_size=0):
    return _resized(x, tensor_dim,
                    multiply=_known_size("gather_for_region", group, group_size))


@torch.library.register_fake("partitioner::scatter")
def _scatter_fake(x, group, tensor_dim, *, group_size=0):
    return _resized(x, tensor_dim, divide=_known_size("scatter", group, group_size))


@torch.library.register_fake("partitioner::reduce_scatter")
def _reduce_scatter_fake(x, group, tensor_dim, *, group_size=0):
    return _resized(x, tensor_dim, divide=_known_size("reduce_scatter", group, group_size))


@torch.library.register_fake("partitioner::all_to_all")
def _all_to_all_fake(x, group, scatter_dim, gather_dim, *, group_size=0):
    size = _known_size("all_to_all", group, group_size)
    shape = list(x.shape)
    shape[scatter_dim] //= size
    shape[gather_dim] *= size
    return x.new_empty(shape)


# --- async tensor parallelism (plan.async_tp) --------------------------------------------

_LIB.define("all_gather_matmul(Tensor x, Tensor[] weights, Tensor?[] biases, str group, "
            "int gather_dim, *, int group_size=0) -> Tensor[]")
_LIB.define("matmul_reduce_scatter(Tensor x, Tensor weight, str group, int scatter_dim, *, "
            "int group_size=0) -> Tensor")
all_gather_matmul = torch.ops.partitioner.all_gather_matmul.default
"""`[linear(gather_for_region(x, group, gather_dim), w, b) for w, b in zip(weights, biases)]`
with the gather decomposed into `group_size` ring steps, each chunk's matmuls computed while
the next chunk travels (torch's fused_all_gather_matmul, Megatron's tp_comm_overlap). Backward:
the input gradient's reduce-scatter and the re-gather of `x` for the weight gradients run as
the same ring, each step's matmuls overlapping the next step's transfers; only the shard `x`
is kept for backward (as sp's gathers are saved as shards)."""
matmul_reduce_scatter = torch.ops.partitioner.matmul_reduce_scatter.default
"""`reduce_scatter(linear(x, weight), group, scatter_dim)` with the reduce-scatter decomposed
into `group_size` ring steps, the partial sum of the chunk each step sends computed while the
previous one travels. Backward all-gathers the output gradient as a ring, each arriving chunk's
input- and weight-gradient matmuls overlapping the next transfer."""
_LIB.define("copy_matmul(Tensor x, Tensor[] weights, Tensor?[] biases, str group) -> Tensor[]")
copy_matmul = torch.ops.partitioner.copy_matmul.default
"""`[linear(copy_to_region(x, group), w, b) ...]`: a column region's entry with the linears
reading it. Forward is the linears (no communication); backward computes the input gradient
first, starts its all-reduce, computes the weight gradients while it runs and waits last
(Megatron's async gradient all-reduce). The running program's form of every column entry
(passes.lowering.collectives), whatever async_tp says."""
ASYNC_TP_OPS = (all_gather_matmul, matmul_reduce_scatter, copy_matmul)


@torch.library.register_fake("partitioner::all_gather_matmul")
def _all_gather_matmul_fake(x, weights, biases, group, gather_dim, *, group_size=0):
    size = _known_size("all_gather_matmul", group, group_size)
    gathered = _resized(x, gather_dim, multiply=size)
    return [gathered.new_empty(*gathered.shape[:-1], w.shape[0]) for w in weights]


@torch.library.register_fake("partitioner::copy_matmul")
def _copy_matmul_fake(x, weights, biases, group):
    return [x.new_empty(*x.shape[:-1], w.shape[0]) for w in weights]


@torch.library.register_fake("partitioner::matmul_reduce_scatter")
def _matmul_reduce_scatter_fake(x, weight, group, scatter_dim, *, group_size=0):
    size = _known_size("matmul_reduce_scatter", group, group_size)
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    return _resized(out, scatter_dim, divide=size)


# --- context-parallel attention ----------------------------------------------------------

_LIB.define("ring_attention(Tensor q, Tensor k, Tensor v, str group, int seq_len, bool balanced, "
            "bool is_causal, float scale, Tensor? attn_mask=None, *, int group_size=0) "
            "-> (Tensor, Tensor)")
ring_attention = torch.ops.partitioner.ring_attention.default
"""Attention of this cp rank's queries (B, H, S/cp, D) on the whole sequence, the key/value
blocks (B, KH, S/cp, D) passed around the cp ring; returns (out, lse). `seq_len` and `balanced`
give the sequence layout (core.sequence_layout) the rank's tokens follow, so each block's mask
is computed from global positions; `group` is a mesh dimension until lowering fixes it.
`attn_mask`, when given, is the model's whole (.., S, S) mask (bool: visible; float: added to
the scores), indexed at the global positions of each block's queries and keys."""

# --- expert-parallel token dispatch ------------------------------------------------------

_LIB.define("moe_dispatch(Tensor tokens, Tensor indices, str group, int num_experts, *, "
            "int group_size=0) -> (Tensor, Tensor)")
_LIB.define("moe_return(Tensor rows, Tensor indices, Tensor counts, str group, int num_experts, "
            "*, int group_size=0) -> Tensor")
_LIB.define("grouped_mm(Tensor rows, Tensor weight, Tensor counts) -> Tensor")
_LIB.define("expert_capacity(Tensor indices, int num_experts, int capacity) -> Tensor")
moe_dispatch = torch.ops.partitioner.moe_dispatch.default
"""Tokens (T, h) routed to experts `indices` (T, k) of `num_experts`, which lie evenly over the
ep `group` (rank r holds experts [r*E/ep, (r+1)*E/ep)): each token is copied once per choice and
sent by all-to-all to the rank holding that expert. Returns (rows, counts): the rows this rank's
experts received (N, h), grouped by local expert and, within one, by source rank; counts
(ep, E/ep) int64, how many rows each source rank sent to each local expert (N is data
dependent). Backward returns each row's gradient to its token and sums over its k copies."""
moe_return = torch.ops.partitioner.moe_return.default
"""The inverse movement: expert outputs `rows` (N, h) as `moe_dispatch` laid them out, sent
back to the ranks their tokens came from -> (T, k, h), choice j of token t at [t, j]."""
grouped_mm = torch.ops.partitioner.grouped_mm.default
"""`rows` (N, in) grouped by expert (group sizes: `counts` summed over its leading dim when it
has two) times each group's `weight[e]` (E, in, out) -> (N, out): the experts' GEMMs."""

expert_capacity = torch.ops.partitioner.expert_capacity.default
"""The expert choices with every pair past its expert's capacity set to `num_experts`, which
moe_dispatch sends nowhere and moe_return gives back as zeros (core/capacity.py's rule)."""
MOE_OPS = (moe_dispatch, moe_return, grouped_mm, expert_capacity)

COLLECTIVE_KINDS[all_gather_matmul] = "all_gather"  # decomposed into ring steps
COLLECTIVE_KINDS[matmul_reduce_scatter] = "reduce_scatter"

GROUPED = COLLECTIVES + (ring_attention, moe_dispatch, moe_return) + ASYNC_TP_OPS
"""Every op that names a process group (lowering fixes each one's group)."""

GROUP_SIZED = SIZED | {ring_attention, moe_dispatch, moe_return, all_gather_matmul,
                       matmul_reduce_scatter}
"""The ops of GROUPED that take `group_size`."""


def group_arg(op) -> int:
    """The position of the group argument of an op of GROUPED."""
    return {ring_attention: 3, moe_dispatch: 2, moe_return: 3, all_gather_matmul: 3,
            matmul_reduce_scatter: 2, copy_matmul: 3}.get(op, 1)


@torch.library.register_fake("partitioner::expert_capacity")
def _expert_capacity_fake(indices, num_experts, capacity):
    return torch.empty_like(indices)


@torch.library.register_fake("partitioner::moe_dispatch")
def _moe_dispatch_fake(tokens, indices, group, num_experts, *, group_size=0):
    size = _known_size("moe_dispatch", group, group_size)
    rows = torch.library.get_ctx().new_dynamic_size()
    return (tokens.new_empty(rows, tokens.shape[-1]),
            indices.new_empty(size, num_experts // size))


@torch.library.register_fake("partitioner::moe_return")
def _moe_return_fake(rows, indices, counts, group, num_experts, *, group_size=0):
    return rows.new_empty(*indices.shape, rows.shape[-1])


@torch.library.register_fake("partitioner::grouped_mm")
def _grouped_mm_fake(rows, weight, counts):
    return rows.new_empty(rows.shape[0], weight.shape[-1])


@torch.library.register_fake("partitioner::ring_attention")
def _ring_attention_fake(q, k, v, group, seq_len, balanced, is_causal, scale, attn_mask=None, *,
                        group_size=0):
    return torch.empty_like(q), q.new_empty(q.shape[:-1])


# --- kernels -------------------------------------------------------------------------------

_SDPA_ARGS = ("(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, "
              "float dropout_p=0.0, bool is_causal=False, *, float? scale=None, "
              "bool enable_gqa=False) -> Tensor")
_LIB.define("scaled_dot_product_attention" + _SDPA_ARGS)
_LIB.define("checkpointed_attention" + _SDPA_ARGS)
_LIB.define("layer_norm(Tensor input, SymInt[] normalized_shape, Tensor? weight=None, "
            "Tensor? bias=None, float eps=1e-05, bool cudnn_enable=True) -> Tensor")
_LIB.define("silu_mul(Tensor gate, Tensor up) -> Tensor")
_LIB.define("rms_norm(Tensor x, Tensor? weight, float eps, *, ScalarType? compute_dtype=None, "
            "ScalarType? output_dtype=None) -> Tensor")

scaled_dot_product_attention = torch.ops.partitioner.scaled_dot_product_attention.default
"""aten's scaled_dot_product_attention; flash attention where the kernel applies."""
checkpointed_attention = torch.ops.partitioner.checkpointed_attention.default
"""scaled_dot_product_attention that keeps only q, k, v for backward (selective recompute)."""
layer_norm = torch.ops.partitioner.layer_norm.default
"""aten's layer_norm; the fused kernel where it applies."""
silu_mul = torch.ops.partitioner.silu_mul.default
"""silu(gate) * up: the SwiGLU MLP's activation."""
rms_norm = torch.ops.partitioner.rms_norm.default
"""The RMSNorm models write out by hand, folded: `h = x.to(compute_dtype)`;
`y = (h * rsqrt(mean(h^2, -1) + eps)).to(output_dtype)`; `y * weight` (a None cast or weight is
absent)."""

KERNELS = (scaled_dot_product_attention, checkpointed_attention, layer_norm, silu_mul, rms_norm)


def rms_norm_reference(x, weight, eps, compute_dtype=None, output_dtype=None):
    """`rms_norm` in the aten ops of the captured graph, in its order (so the numbers match)."""
    h = x if compute_dtype is None else x.to(compute_dtype)
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if output_dtype is not None:
        y = y.to(output_dtype)
    return y if weight is None else y * weight


def _sdpa_fake(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *,
               scale=None, enable_gqa=False):
    return torch.ops.aten.scaled_dot_product_attention.default(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)


torch.library.register_fake("partitioner::scaled_dot_product_attention")(_sdpa_fake)
torch.library.register_fake("partitioner::checkpointed_attention")(_sdpa_fake)
torch.library.register_fake("partitioner::layer_norm")(torch.ops.aten.layer_norm.default)
torch.library.register_fake("partitioner::silu_mul")(
    lambda gate, up: torch.nn.functional.silu(gate) * up)
torch.library.register_fake("partitioner::rms_norm")(rms_norm_reference)


# --- dropout -------------------------------------------------------------------------------

_LIB.define("dropout_mask(Tensor x, float p, int seed, int node, int rows_per_sample, "
            "int[] spec) -> Tensor")
dropout_mask = torch.ops.partitioner.dropout_mask.default
"""The scaled keep mask of `x` (0 where dropped, 1/(1-p) where kept, x's shape and dtype; all
ones when the call's key says eval), drawn by the counter generator of core/dropout.py for
(`seed`, `node`, the call's step) at the global indices `spec` (core.dropout.IndexSpec.flat)
gives this rank's elements; dim 0 counts `rows_per_sample` rows per sample of the batch."""


@torch.library.register_fake("partitioner::dropout_mask")
def _dropout_mask_fake(x, p, seed, node, rows_per_sample, spec):
    return torch.empty_like(x)


# --- recompute -----------------------------------------------------------------------------

def _recompute_policy(recomputed: frozenset, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in recomputed or op.is_view:  # a saved view would keep its base alive
        return CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE


class CheckpointedRegion(nn.Module):
    """Runs `region` (a GraphModule taking every input explicitly, parameters included) under
    torch.utils.checkpoint (non-reentrant; backward runs the region again, with the same RNG
    state, to rebuild what it saved).

    `recomputed` empty: full recompute, forward keeps only the region's inputs (one block).
    Otherwise selective: only those ops (and views) run again in backward, every other op's
    output is kept, which is how sp's gathered inputs are saved as shards (passes.recompute).
    Dropout masks (`dropout_mask`) are drawn again in a full recompute with the key of the
    forward being replayed; selective and compiled regions keep them.
    """

    def __init__(self, region: nn.Module, recomputed: tuple = ()) -> None:
        super().__init__()
        self.region = region
        self.recomputed = tuple(recomputed)

    def forward(self, *inputs):
        if not torch.is_grad_enabled():
            return self.region(*inputs)
        if self.recomputed:  # dropout masks are kept (only `recomputed` ops run again)
            policy = functools.partial(_recompute_policy, frozenset(self.recomputed))
        elif torch.compiler.is_compiling():
            # AOTAutograd replays the region inside the compiled backward, where no dropout
            # key of the forward is current: keep the masks, recompute everything else (what
            # compile makes of a plain checkpoint, less the masks)
            policy = _keep_dropout_masks
        else:
            return checkpoint(self.region, *inputs, use_reentrant=False,
                              context_fn=_same_dropout_key)
        return checkpoint(self.region, *inputs, use_reentrant=False,
                          context_fn=functools.partial(create_selective_checkpoint_contexts,
                                                       policy))


def _keep_dropout_masks(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op is dropout_mask:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _same_dropout_key():
    """checkpoint's (forward, recompute) contexts: the recomputation draws its dropout masks
    with the key of the forward it replays (backward of a microbatch runs under another
    microbatch's key in a pipeline), so the masks are not kept."""
    return contextlib.nullcontext(), dropout.drawing(dropout.current_key())
