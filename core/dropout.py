"""Dropout masks that every plan draws alike: a counter-based generator and its key.

torch's dropout draws from the device's RNG state, so a tp rank, a dp rank or a microbatch
draws masks no single device would (Megatron's RNG tracker draws different masks per tp rank
on purpose). Here a mask element is a pure function of

    (plan seed, the dropout node, the step counter, the element's index in the global batch)

hashed with splitmix64 in int64 torch ops (wrapping integer arithmetic, so the same bits on
any device; checked on CPU so far). Each rank computes
the global indices of the elements it holds (`IndexSpec`: per dim, which full-size indices the
local dim holds; dim 0 counts rows of the global batch from the microbatch's first sample) and
draws only those, so a sharded value gets exactly its slice of the mask the single-device
model draws on the whole batch, whatever the plan, microbatch split or schedule order.

The key the runtime supplies per call (`DropoutKey`: step counter, first sample, training)
lives in a context variable set around each microbatch's forward; `core.ops.CheckpointedRegion`
captures it at forward time so that recompute replays the same masks.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from contextvars import ContextVar
from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class DropoutKey:
    """What a call draws with, beside what the graph bakes in (seed, node, index spec)."""

    step: int = 0
    """The step counter: `ParallelModel.step` and training-mode forward calls each use one."""
    first_sample: int = 0
    """Index in the global batch of the first sample of the microbatch being run."""
    training: bool = True
    """False: dropout is the identity (`ParallelModel.eval()`)."""


_current: ContextVar[DropoutKey] = ContextVar("dropout_key", default=DropoutKey())


def current_key() -> DropoutKey:
    """The key dropout draws with now (step 0, sample 0, training when none was set)."""
    return _current.get()


@contextlib.contextmanager
def drawing(key: DropoutKey):
    """Inside, dropout draws with `key` (the executor sets one around each microbatch)."""
    token = _current.set(key)
    try:
        yield
    finally:
        _current.reset(token)


def node_key(name: str) -> int:
    """A dropout node's stable id: its name in the captured graph, hashed to 63 bits."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1


# --- index specs ---------------------------------------------------------------------------
# Per dim of the local value: its full size and the (start, length) runs of full-size indices
# the local dim holds, in local order. Flattened into one int list for the op schema:
# [ndim, then per dim: full, runs, start0, length0, start1, length1, ...].

@dataclass(frozen=True)
class IndexSpec:
    full: tuple[int, ...]
    """The full (unsharded) size of each dim; dim 0 counts one microbatch's rows."""
    runs: tuple[tuple[tuple[int, int], ...], ...]
    """Per dim: (start, length) runs of full-size indices, concatenated in local order."""

    @classmethod
    def of(cls, full: tuple[int, ...], indices: list[list[int]]) -> "IndexSpec":
        """From explicit local -> full index lists (consecutive indices merged into runs)."""
        runs = []
        for index in indices:
            dim_runs: list[list[int]] = []
            for i in index:
                if dim_runs and dim_runs[-1][0] + dim_runs[-1][1] == i:
                    dim_runs[-1][1] += 1
                else:
                    dim_runs.append([i, 1])
            runs.append(tuple((s, n) for s, n in dim_runs))
        return cls(tuple(full), tuple(runs))

    def flat(self) -> list[int]:
        out = [len(self.full)]
        for size, runs in zip(self.full, self.runs, strict=True):
            out += [size, len(runs)]
            for start, length in runs:
                out += [start, length]
        return out

    @classmethod
    def parse(cls, flat: list[int]) -> "IndexSpec":
        ndim, at = flat[0], 1
        full, runs = [], []
        for _ in range(ndim):
            size, count = flat[at], flat[at + 1]
            at += 2
            full.append(size)
            runs.append(tuple((flat[at + 2 * i], flat[at + 2 * i + 1]) for i in range(count)))
            at += 2 * count
        return cls(tuple(full), tuple(runs))

    @property
    def local(self) -> tuple[int, ...]:
        return tuple(sum(n for _, n in runs) for runs in self.runs)

    def __str__(self) -> str:
        def dim(size, runs):
            if runs == ((0, size),):
                return str(size)
            return f"{size}[{'+'.join(f'{s}:{s + n}' for s, n in runs)}]"
        return "x".join(dim(s, r) for s, r in zip(self.full, self.runs, strict=True))


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic on signed values)."""
    return (x >> bits).bitwise_and_((1 << (64 - bits)) - 1)


_GAMMA = _signed(0x9E3779B97F4A7C15)
_SIGN = _signed(1 << 63)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _mix_(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64, in place (multiplication wraps as uint64 would); one
    temporary of z's size at a time."""
    z.bitwise_xor_(_shr(z, 30)).mul_(_MIX1)
    z.bitwise_xor_(_shr(z, 27)).mul_(_MIX2)
    return z.bitwise_xor_(_shr(z, 31))


def _mix_int(z: int) -> int:
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def stream(seed: int, node: int, step: int) -> int:
    """The 64-bit base of one (seed, node, step): each element hashes its counter from it."""
    return _mix_int(_mix_int(_mix_int(seed) ^ node) ^ (step * 0x9E3779B97F4A7C15))


def global_counters(spec: IndexSpec, first_row: int, device=None) -> torch.Tensor:
    """Each local element's linear index in the global batch's tensor (int64, local shape):
    dim 0 rows offset by `first_row`, the other dims at their full-size strides."""
    ndim = len(spec.full)
    if ndim and all(runs == ((0, size),) for size, runs in zip(spec.full[1:], spec.runs[1:])) \
            and len(spec.runs[0]) == 1:  # whole rows of one run: one arange
        inner = math.prod(spec.full[1:])
        (start, length), = spec.runs[0]
        first = (first_row + start) * inner
        return torch.arange(first, first + length * inner, dtype=torch.int64,
                            device=device).view(spec.local)
    total = torch.zeros((), dtype=torch.int64, device=device)
    stride = 1
    for dim in reversed(range(ndim)):
        index = torch.cat([torch.arange(s, s + n, dtype=torch.int64, device=device)
                           for s, n in spec.runs[dim]])
        if dim == 0:
            index = index + first_row
        shape = [1] * ndim
        shape[dim] = -1
        total = total + index.view(shape) * stride
        stride *= spec.full[dim]
    return total.expand(spec.local) if ndim else total


def keep_mask(p: float, seed: int, node: int, spec: IndexSpec, key: DropoutKey,
              rows_per_sample: int, device=None) -> torch.Tensor:
    """The bool mask (True: kept) of a dropout with probability `p` on the local elements
    `spec` describes, for the call `key`: element kept when its 53-bit uniform is >= p."""
    bits = global_counters(spec, key.first_sample * rows_per_sample, device).contiguous()
    _mix_(bits.mul_(_GAMMA).add_(_signed(stream(seed, node, key.step))))
    # kept when the top 53 bits, as a uniform in [0, 1), are >= p: compared as unsigned
    # (the sign bit flipped on both sides of a signed comparison)
    threshold = int(round(p * (1 << 53))) << 11
    if threshold >= 1 << 64:
        return torch.zeros(spec.local, dtype=torch.bool, device=device)
    return bits.bitwise_xor_(_SIGN) >= _signed(threshold ^ (1 << 63))
