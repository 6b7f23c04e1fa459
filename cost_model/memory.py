"""Per-rank memory: weights, gradients, AdamW state, activations, temporaries.

Mixed-precision training as Megatron does it: 16-bit weights (2 B/param), fp32 gradient buffer
(4 B/param), AdamW with an fp32 master copy and two fp32 moments (12 B/param), the optimizer state
sharded over the data-parallel ranks with ZeRO-1; a plan naming `param_dtype` run by
partitioner's runtime counts what that runtime holds instead (`param_bytes`). Activations per
block come from layer_costs.activation_bytes (Korthikanti et al. 2022); a pipeline rank holds
the activations of the microbatches in flight of its schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from core.plan import layout_text

PARAM_BYTES = 2
GRAD_BYTES = 4
ADAM_BYTES = 12  # fp32 master + exp_avg + exp_avg_sq
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def korthikanti_activation_bytes(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                                 recompute: str = "none") -> float:
    """The closed-form table of published-runs.md (16-bit activations, GPT block)."""
    if recompute == "full":
        return 2 * s * b * h / (t if sp else 1)
    core = 0 if recompute == "selective" else 5 * a * s / (h * t)
    if t == 1:
        return s * b * h * (34 + core * t)
    if sp:
        return s * b * h * (34 / t + core)
    return s * b * h * (10 + 24 / t + core)


def in_flight(schedule: str, rank: int, pp: int, microbatches: int, vpp: int) -> float:
    """Microbatches whose activations `rank` holds at its peak (in units of its full layer set).

    GPipe: all m. 1F1B: min(m, p - rank). Interleaved 1F1B: Megatron's warm-up of
    (p - rank - 1) * 2 + (v - 1) * p chunks plus the one in progress, each 1/v of the rank's
    layers; for rank 0 this is p (1 + (p-1)/(p v)), Korthikanti's interleaving factor (exact
    for equal chunks; `interleaved_peak` follows the chunk order where they differ).
    Zero-bubble ZB-H1 and ZB-V: min(m, p) on every rank (a microbatch's activations are held
    until its weight-gradient step; the delayed W steps bring every rank to 1F1B's rank-0 peak,
    counted in full although W needs only the weights' inputs)."""
    if schedule == "gpipe":
        return float(microbatches)
    if schedule in ("zb-h1", "zb-v"):
        return float(min(microbatches, pp))
    if schedule == "interleaved-1f1b" and vpp > 1:
        chunks = min(microbatches * vpp, (pp - rank - 1) * 2 + (vpp - 1) * pp + 1)
        return chunks / vpp
    return float(min(microbatches, pp - rank))


def optimizer_bytes_per_param(zero: int, shards: int) -> float:
    return PARAM_BYTES + GRAD_BYTES + ADAM_BYTES / (shards if zero else 1)


@dataclass(frozen=True)
class ParamBytes:
    """Bytes per parameter a rank holds, by what they are."""

    weights: float
    """Held whole by every rank holding the parameter."""
    grads: float
    optimizer: float
    """Split over the ZeRO-1 ranks when zero=1."""


def param_bytes(param_dtype: str | None, zero: int, reduce_dtype: str = "fp32",
                runtime: str = "partitioner") -> ParamBytes:
    """Per parameter, following the plan's dtypes and whose runtime holds them.

    param_dtype unset, or 16-bit on Megatron-Core's runtime: Megatron's convention, which the
    published runs the model is checked against use (16-bit weights, a gradient buffer in the
    reduction dtype - fp32 unless grad_reduce_in_bf16 - the fp32 master and AdamW's two moments
    sharded by the distributed optimizer). bf16/fp16 on partitioner's runtime: a 16-bit
    compute copy and the fp32 main weight (2 + 4), the fp32 gradient (4), AdamW's two fp32
    moments (8), and under ZeRO-1 the 1/dp fp32 shard the optimizer updates (4, sharded).
    fp32: the same without the compute copy (on Megatron-Core's runtime without a master
    copy either)."""
    if param_dtype is None:
        return ParamBytes(PARAM_BYTES, GRAD_BYTES, ADAM_BYTES)
    if runtime == "megatron":  # fp32: no master copy, the moments only
        if param_dtype == "fp32":
            return ParamBytes(4, 4, 8)
        return ParamBytes(PARAM_BYTES, DTYPE_BYTES[reduce_dtype], ADAM_BYTES)
    copy = 0 if param_dtype == "fp32" else 2
    return ParamBytes(copy + 4, 4, 8 + (4 if zero else 0))


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on one rank (the fullest one)."""

    rank: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    temporary: float
    reserved: float
    """Outside the caching allocator (Hardware.reserved_bytes)."""
    allocator: float = 0.0
    """What the caching allocator holds beyond the tensors above (Hardware.allocator_margin
    of their bytes)."""

    @property
    def tensors(self) -> float:
        """Bytes of the tensors the rank holds at its peak."""
        return self.weights + self.grads + self.optimizer + self.activations + self.temporary

    @property
    def total(self) -> float:
        return self.tensors + self.allocator + self.reserved

    def as_dict(self) -> dict:
        return {"rank": self.rank, "weights": self.weights, "grads": self.grads,
                "optimizer": self.optimizer, "activations": self.activations,
                "temporary": self.temporary, "allocator": self.allocator,
                "reserved": self.reserved, "total": self.total}


def breakdown(rank: int, weights: float, grads: float, optimizer: float, activations: float,
              temporary: float, reserved: float, allocator_margin: float) -> MemoryBreakdown:
    """A rank's memory with the allocator's margin over its tensors."""
    tensors = weights + grads + optimizer + activations + temporary
    return MemoryBreakdown(rank, weights, grads, optimizer, activations, temporary, reserved,
                           allocator_margin * tensors)


@lru_cache(maxsize=4096)
def chunk_layers(layers: int, dense_layers: int, moe: bool, pp: int, vpp: int,
                 placement: tuple[int, ...] | None = None,
                 layout: tuple[int, ...] | None = None
                 ) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per pipeline rank, (dense blocks, MoE blocks) of each of its virtual stages (model
    chunks) in the order the rank runs them. `layout` (Plan.stage_layers) gives each of the
    pp*vpp chunks' layers in stage order; without it layers split as evenly as possible over
    the chunks, the remainder going to the middle chunks, away from the embedding and head on
    the first and last stage. Rank r holds chunks r, r+pp, r+2pp, ..., or those `placement`
    (the schedule's, core.schedules.placement) puts on it."""
    chunks = pp * vpp
    if layout is not None:
        if len(layout) != chunks or sum(layout) != layers:
            raise ValueError(f"stage_layers={layout_text(layout)} must give pp*vpp="
                             f"{chunks} stages summing to the model's {layers} layers")
        sizes = list(layout)
    else:
        base, rem = divmod(layers, chunks)
        extra = set(range(1, rem + 1)) if rem < chunks - 1 else set(range(rem))
        sizes = [base + (1 if i in extra else 0) for i in range(chunks)]
    starts = [sum(sizes[:i]) for i in range(chunks)]
    per_rank = []
    for r in range(pp):
        mixes = []
        for ci in (range(r, chunks, pp) if placement is None else
                   [c for c in range(chunks) if placement[c] == r]):
            moe_blocks = sum(1 for li in range(starts[ci], starts[ci] + sizes[ci])
                             if moe and li >= dense_layers)
            mixes.append((sizes[ci] - moe_blocks, moe_blocks))
        per_rank.append(tuple(mixes))
    return tuple(per_rank)


@lru_cache(maxsize=4096)
def stage_layers(layers: int, dense_layers: int, moe: bool, pp: int, vpp: int,
                 placement: tuple[int, ...] | None = None,
                 layout: tuple[int, ...] | None = None) -> tuple[tuple[int, int], ...]:
    """(dense blocks, MoE blocks) per pipeline rank: its chunks' (`chunk_layers`) together."""
    return tuple((sum(d for d, _ in mixes), sum(m for _, m in mixes))
                 for mixes in chunk_layers(layers, dense_layers, moe, pp, vpp, placement, layout))


@lru_cache(maxsize=4096)
def interleaved_peak(rank: int, pp: int, microbatches: int, chunk_bytes: tuple[float, ...]
                     ) -> float:
    """Activation bytes rank `rank` holds at its peak under Megatron's interleaved 1F1B, its
    model chunks keeping `chunk_bytes` each per microbatch.

    The rank runs its forwards chunk by chunk in groups of pp microbatches (the k-th forward is
    on chunk (k mod pp*v) // pp, the j-th backward on chunk v-1 - (j mod pp*v) // pp): a warm-up
    of (pp - rank - 1) * 2 + (v - 1) * pp forwards, then one forward and one backward in turn.
    With equal chunks the peak is `in_flight`'s; with uneven ones (Llama 3's first chunk of the
    embedding alone) it is what those forwards hold, not their count times the mean chunk."""
    v = len(chunk_bytes)
    total = microbatches * v
    warmup = min(total, (pp - rank - 1) * 2 + (v - 1) * pp)

    def forward_chunk(k):
        return (k % (pp * v)) // pp

    def backward_chunk(j):
        return v - 1 - (j % (pp * v)) // pp

    held = sum(chunk_bytes[forward_chunk(k)] for k in range(warmup))
    peak = held
    # any pp*v steps in a row run each chunk pp times forward and pp times backward: what is
    # held repeats with that period, so one period of the steady state has its peak
    for i in range(min(total - warmup, pp * v)):
        held += chunk_bytes[forward_chunk(warmup + i)]
        peak = max(peak, held)
        held -= chunk_bytes[backward_chunk(i)]
    return peak


@lru_cache(maxsize=4096)
def distinct_ranks(layers: int, dense_layers: int, moe: bool, pp: int, vpp: int,
                   placement: tuple[int, ...] | None = None,
                   layout: tuple[int, ...] | None = None) -> tuple[tuple[int, int, int], ...]:
    """(rank, dense, moe) for the first rank, the last, and the lowest rank of every other
    distinct layer mix: the only ranks that can be the slowest or the fullest."""
    per = stage_layers(layers, dense_layers, moe, pp, vpp, placement, layout)
    seen, out = set(), []
    for r, mix in enumerate(per):
        if r in (0, pp - 1) or mix not in seen:
            out.append((r, *mix))
            if 0 < r < pp - 1:
                seen.add(mix)
    return tuple(out)
