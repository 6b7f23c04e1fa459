"""Pipeline stage cut: where to cut a chain of uncuttable segments into `stages` pipeline stages.

A pure function of per-segment costs; the graph split (`pipeline_split`) builds the segments from
region boundaries and the cost model, calls `choose_cuts`, and cuts the graph at `StageCut.bounds`.

The choice is an exact dynamic program over suffixes ("cut segments [i, N) into s stages"), in
three passes, each O(S * N^2) with prefix sums:

1. the smallest achievable bottleneck B* (slowest stage time), within the memory limit and pins;
2. among cuts whose every stage time is <= B* (up to a 1e-12 relative tie tolerance), the
   smallest total of bytes crossing the cuts;
3. among those, the earliest cuts: a forward greedy walk that takes the first cut from which the
   optimum is still reachable, which yields the lexicographically smallest `bounds`.
"""

from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

log = logging.getLogger(__name__)

_TIE_RTOL = 1e-12
"""Two bottlenecks (or two crossing-byte totals) within this relative distance are a tie."""

_INF = math.inf


@dataclass(frozen=True)
class Segment:
    """One uncuttable piece of the model in graph order: the embedding/pre part, a block, the
    head/post part."""

    name: str
    """Where it comes from, e.g. "pre", "blocks.0", ..., "post" (used in error messages)."""
    compute: float
    """Seconds (forward + backward) of this segment per microbatch."""
    memory: float
    """Bytes this segment adds to its stage (params + grads + optimizer + activations in flight)."""
    out_bytes: float
    """Bytes crossing a cut placed right after this segment (the P2P activations)."""

    def __post_init__(self) -> None:
        for field in ("compute", "memory", "out_bytes"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"Segment {self.name!r}: {field}={value!r} must be a finite number >= 0"
                )


@dataclass(frozen=True)
class StageCut:
    """The chosen cut. Stage s holds segments [bounds[s], bounds[s+1])."""

    bounds: tuple[int, ...]
    """Stage starts plus the end: bounds[0] = 0, bounds[-1] = len(segments), strictly increasing."""
    stage_time: tuple[float, ...]
    """Per stage: the compute of its segments plus the P2P time of its outgoing cut (none for the
    last stage)."""
    stage_memory: tuple[float, ...]
    """Per stage: the sum of its segments' memory, in bytes."""
    bottleneck: float
    """max(stage_time): the time per microbatch of the slowest stage."""
    cut_bytes: float = 0.0
    """Total bytes crossing the cuts per microbatch (out_bytes of every stage but the last)."""

    @property
    def stages(self) -> int:
        return len(self.bounds) - 1

    def stage_of(self, segment_index: int) -> int:
        """The stage that holds segment `segment_index`."""
        n = self.bounds[-1]
        if not 0 <= segment_index < n:
            raise ValueError(f"segment index {segment_index} is out of range for {n} segments")
        return bisect.bisect_right(self.bounds, segment_index) - 1

    def segments_of(self, stage: int) -> range:
        """The indices of the segments that stage `stage` holds."""
        return range(self.bounds[stage], self.bounds[stage + 1])


def choose_cuts(
    segments: Sequence[Segment],
    stages: int,
    *,
    memory_limit: float | None = None,
    p2p_bandwidth: float = float("inf"),
    p2p_latency: float = 0.0,
    pinned: Iterable[int] = (),
) -> StageCut:
    """Cut `segments` (in graph order) into `stages` non-empty contiguous stages.

    Minimizes the slowest stage, where a stage's time is the sum of its segments' compute plus,
    for every stage but the last, `out_bytes` of its last segment / `p2p_bandwidth` +
    `p2p_latency`. Every stage's memory must be <= `memory_limit` (when given). Ties (bottlenecks
    equal within 1e-12 relative) go to the fewest bytes crossing the cuts, then to the earliest
    cuts (the lexicographically smallest `bounds`).

    `pinned` holds segment indices that must start a stage (a cut right before them), like the
    split points of torch.distributed.pipelining; they count toward `stages`. Pinning 0 is a no-op.
    """
    n = len(segments)
    pins = _check_args(segments, stages, memory_limit, p2p_bandwidth, p2p_latency, pinned)
    limit = _INF if memory_limit is None else float(memory_limit)

    # prefix sums: compute and memory of segments [i, j) are C[j] - C[i] and M[j] - M[i]
    C = [0.0] * (n + 1)
    M = [0.0] * (n + 1)
    for k, seg in enumerate(segments):
        C[k + 1] = C[k] + seg.compute
        M[k + 1] = M[k] + seg.memory
    # cross[j]: bytes crossing a cut before segment j; tail[j]: its P2P time (0 at the end)
    cross = [0.0] * (n + 1)
    tail = [0.0] * (n + 1)
    for j in range(1, n):
        cross[j] = float(segments[j - 1].out_bytes)
        tail[j] = cross[j] / p2p_bandwidth + p2p_latency
    # a stage starting at i may end no later than the next pinned start after i
    next_pin = [n] * (n + 1)
    for i in range(n - 1, -1, -1):
        next_pin[i] = i + 1 if (i + 1) in pins else next_pin[i + 1]

    # 1. h[i] = smallest bottleneck cutting [i, n) into s stages (s grows level by level)
    h = [_INF] * (n + 1)
    for i in range(stages - 1, n):
        if next_pin[i] == n and M[n] - M[i] <= limit:
            h[i] = C[n] - C[i]
    for s in range(2, stages + 1):
        prev, h = h, [_INF] * (n + 1)
        for i in range(stages - s, n - s + 1):
            best = _INF
            ci, mi = C[i], M[i]
            for j in range(i + 1, min(n - s + 1, next_pin[i]) + 1):
                if M[j] - mi > limit:
                    break  # memory only grows with j
                c = C[j] - ci
                if c >= best:
                    break  # compute only grows with j, and it alone is already no better
                v = c + tail[j]
                if prev[j] > v:
                    v = prev[j]
                if v < best:
                    best = v
            h[i] = best
    bottleneck = h[0]
    if bottleneck == _INF:
        raise _memory_error(segments, stages, limit, M, next_pin)
    threshold = bottleneck + _TIE_RTOL * bottleneck

    # 2. g[s][i] = fewest crossing bytes cutting [i, n) into s stages, each stage <= threshold
    g = [[_INF] * (n + 1) for _ in range(stages + 1)]
    for i in range(stages - 1, n):
        if next_pin[i] == n and M[n] - M[i] <= limit and C[n] - C[i] <= threshold:
            g[1][i] = 0.0
    for s in range(2, stages + 1):
        prev, cur = g[s - 1], g[s]
        for i in range(stages - s, n - s + 1):
            best = _INF
            ci, mi = C[i], M[i]
            for j in range(i + 1, min(n - s + 1, next_pin[i]) + 1):
                c = C[j] - ci
                if M[j] - mi > limit or c > threshold:
                    break
                if c + tail[j] <= threshold:
                    v = cross[j] + prev[j]
                    if v < best:
                        best = v
            cur[i] = best
    total_cross = g[stages][0]

    # 3. earliest cuts: walk forward, taking the first end whose remainder stays within budget
    bounds = [0]
    budget = total_cross + _TIE_RTOL * total_cross
    i = 0
    for s in range(stages, 1, -1):
        prev = g[s - 1]
        for j in range(i + 1, min(n - s + 1, next_pin[i]) + 1):
            if M[j] - M[i] > limit or C[j] - C[i] + tail[j] > threshold:
                continue
            if cross[j] + prev[j] <= budget:
                # never let rounding drop the budget below the remainder known to be reachable
                budget = max(budget - cross[j], prev[j])
                i = j
                break
        else:  # pragma: no cover - g guarantees a continuation
            raise AssertionError(f"stage cut: no continuation from segment {i} with {s} stages")
        bounds.append(i)
    bounds.append(n)

    cut = _describe(segments, tuple(bounds), p2p_bandwidth, p2p_latency)
    log.debug("stage cut of %d segments into %d stages: %s", n, stages, cut)
    return cut


def _check_args(segments, stages, memory_limit, p2p_bandwidth, p2p_latency, pinned) -> set[int]:
    n = len(segments)
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages={stages!r} must be an integer >= 1 (stages = pp * vpp)")
    if stages > n:
        raise ValueError(
            f"cannot cut {n} segments into {stages} stages: every stage needs at least one "
            f"segment; use pp*vpp <= {n}"
        )
    if memory_limit is not None and not memory_limit >= 0:
        raise ValueError(f"memory_limit={memory_limit!r} must be >= 0 bytes (or None for no limit)")
    if not p2p_bandwidth > 0:
        raise ValueError(f"p2p_bandwidth={p2p_bandwidth!r} must be > 0 bytes/s (inf: free P2P)")
    if not (math.isfinite(p2p_latency) and p2p_latency >= 0):
        raise ValueError(f"p2p_latency={p2p_latency!r} must be a finite number of seconds >= 0")
    pins = set()
    for p in pinned:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < n:
            raise ValueError(
                f"pinned segment index {p!r} is out of range for {n} segments: a pin is the "
                f"index of the segment that starts a stage, 0 <= index < {n}"
            )
        pins.add(p)
    pins.discard(0)  # segment 0 always starts stage 0
    if len(pins) > stages - 1:
        names = ", ".join(f"{p} ({segments[p].name})" for p in sorted(pins))
        raise ValueError(
            f"{len(pins)} pinned cuts [{names}] need at least {len(pins) + 1} stages but "
            f"stages={stages}; unpin {len(pins) - stages + 1} of them or use more stages"
        )
    return pins


def _memory_error(segments, stages, limit, M, next_pin) -> ValueError:
    """The error when no cut fits `limit`: says the smallest max stage memory any cut reaches."""
    n = len(segments)
    h = [_INF] * (n + 1)
    for i in range(stages - 1, n):
        if next_pin[i] == n:
            h[i] = M[n] - M[i]
    for s in range(2, stages + 1):
        prev, h = h, [_INF] * (n + 1)
        for i in range(stages - s, n - s + 1):
            best = _INF
            for j in range(i + 1, min(n - s + 1, next_pin[i]) + 1):
                m = M[j] - M[i]
                if m >= best:
                    break
                v = prev[j] if prev[j] > m else m
                if v < best:
                    best = v
            h[i] = best
    worst = max(range(n), key=lambda k: segments[k].memory)
    hint = ""
    if segments[worst].memory > limit:
        hint = (
            f" (segment {worst} {segments[worst].name!r} alone needs "
            f"{segments[worst].memory:.6g} bytes)"
        )
    return ValueError(
        f"cannot cut {n} segments into {stages} stages within memory_limit: the smallest "
        f"achievable max stage memory is {h[0]:.6g} bytes > limit {limit:.6g}{hint}; "
        f"raise the limit or use more stages"
    )


def _describe(segments, bounds, p2p_bandwidth, p2p_latency) -> StageCut:
    """Times and memory of each stage of `bounds`, summed directly (not from prefix sums)."""
    n = len(segments)
    times, mems, crossing = [], [], []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        t = math.fsum(seg.compute for seg in segments[a:b])
        if b < n:
            crossing.append(float(segments[b - 1].out_bytes))
            t += crossing[-1] / p2p_bandwidth + p2p_latency
        times.append(t)
        mems.append(math.fsum(seg.memory for seg in segments[a:b]))
    return StageCut(
        bounds=bounds,
        stage_time=tuple(times),
        stage_memory=tuple(mems),
        bottleneck=max(times),
        cut_bytes=math.fsum(crossing),
    )
