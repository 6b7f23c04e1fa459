"""Stage cut: the dynamic program against brute force over every cut combination on small
instances, closed-form cases (unequal layer counts, tie-breaking, pins, memory), and bad input."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from passes.stage_cut import Segment, StageCut, choose_cuts


def _blocks(n: int, compute: float = 1.0, memory: float = 1.0, out_bytes: float = 1.0):
    return [Segment(f"blocks.{k}", compute, memory, out_bytes) for k in range(n)]


def _brute_force(segments, stages, memory_limit=None, bw=math.inf, lat=0.0, pinned=()):
    """Every cut combination, scored by (bottleneck, crossing bytes, bounds); None if none fits."""
    n = len(segments)
    pins = set(pinned) - {0}
    best = None
    for cuts in itertools.combinations(range(1, n), stages - 1):
        if not pins <= set(cuts):
            continue
        bounds = (0, *cuts, n)
        times, cross, fits = [], 0.0, True
        for a, b in zip(bounds[:-1], bounds[1:]):
            if memory_limit is not None and sum(s.memory for s in segments[a:b]) > memory_limit:
                fits = False
            t = sum(s.compute for s in segments[a:b])
            if b < n:
                t += segments[b - 1].out_bytes / bw + lat
                cross += segments[b - 1].out_bytes
            times.append(t)
        if fits:
            key = (max(times), cross, bounds)
            best = key if best is None or key < best else best
    return best


def _min_max_memory(segments, stages, pinned=()):
    n = len(segments)
    pins = set(pinned) - {0}
    return min(
        max(sum(s.memory for s in segments[a:b]) for a, b in zip((0, *c), (*c, n)))
        for c in itertools.combinations(range(1, n), stages - 1)
        if pins <= set(c)
    )


def _random_case(rng: random.Random, integral: bool):
    """A small instance; integral ones are exact in floating point, so ties really tie."""
    n = rng.randint(1, 9)
    stages = rng.randint(1, min(n, 5))
    if integral:
        draw = lambda hi: float(rng.randint(0, hi))  # noqa: E731
    else:
        draw = lambda hi: rng.uniform(0, hi)  # noqa: E731
    segments = [Segment(f"s{k}", draw(6), draw(6), draw(8)) for k in range(n)]
    kwargs = {}
    if rng.random() < 0.5:
        kwargs["memory_limit"] = draw(20)
    if rng.random() < 0.5:
        kwargs["p2p_bandwidth"] = rng.choice([1.0, 2.0, 4.0]) if integral else rng.uniform(0.5, 4)
        kwargs["p2p_latency"] = rng.choice([0.0, 0.5, 1.0]) if integral else rng.uniform(0, 1)
    if rng.random() < 0.4 and n > 1:
        kwargs["pinned"] = rng.sample(range(n), rng.randint(0, min(stages - 1, n - 1)))
    return segments, stages, kwargs


def _check_against_brute_force(segments, stages, kwargs):
    expected = _brute_force(
        segments,
        stages,
        kwargs.get("memory_limit"),
        kwargs.get("p2p_bandwidth", math.inf),
        kwargs.get("p2p_latency", 0.0),
        kwargs.get("pinned", ()),
    )
    if expected is None:
        with pytest.raises(ValueError, match="smallest achievable max stage memory"):
            choose_cuts(segments, stages, **kwargs)
        return False
    cut = choose_cuts(segments, stages, **kwargs)
    bottleneck, cross, bounds = expected
    assert cut.bounds == bounds, (segments, stages, kwargs)
    assert cut.bottleneck == pytest.approx(bottleneck, rel=1e-12, abs=1e-12)
    assert cut.cut_bytes == pytest.approx(cross, rel=1e-12, abs=1e-12)
    assert cut.bottleneck == max(cut.stage_time)
    if "memory_limit" in kwargs:
        assert max(cut.stage_memory) <= kwargs["memory_limit"]
    for p in kwargs.get("pinned", ()):
        assert p in cut.bounds
    return True


@pytest.mark.parametrize("integral", [True, False], ids=["exact-ties", "random-floats"])
def test_matches_brute_force(integral):
    rng = random.Random(1234 + integral)
    feasible = 0
    for _ in range(4000):
        feasible += _check_against_brute_force(*_random_case(rng, integral))
    assert feasible > 1500  # the memory limits leave most cases solvable


def test_unequal_layer_counts():
    # 7 equal blocks on 3 stages: 3 blocks bottleneck; equal crossing bytes, so the earliest cuts
    cut = choose_cuts(_blocks(7), 3)
    assert cut.bottleneck == 3.0
    assert cut.bounds == (0, 1, 4, 7)
    assert [len(cut.segments_of(s)) for s in range(3)] == [1, 3, 3]
    assert cut.stage_time == (1.0, 3.0, 3.0)
    assert cut.stage_memory == (1.0, 3.0, 3.0)
    assert [cut.stage_of(k) for k in range(7)] == [0, 1, 1, 1, 2, 2, 2]
    # a heavier embedding and head: 10 s on 3 stages -> 4 s bottleneck, the head shares a stage
    segs = [Segment("pre", 2.0, 1, 1), *_blocks(6), Segment("post", 2.0, 1, 0)]
    cut = choose_cuts(segs, 3)
    assert cut.bounds == (0, 1, 5, 8) and cut.stage_time == (2.0, 4.0, 4.0)
    # 126 blocks on 16 stages: 8 per stage at most
    cut = choose_cuts(_blocks(126), 16)
    assert cut.bottleneck == 8.0
    assert sorted({b - a for a, b in zip(cut.bounds, cut.bounds[1:])}) == [6, 8]


def test_tie_broken_by_crossing_bytes_then_earliest_cuts():
    segs = [Segment(f"b{k}", 1.0, 0, ob) for k, ob in enumerate([9, 5, 1, 7])]
    # three stages, bottleneck 2 for every cut set: {1,2} crosses 9+5, {1,3} 9+1, {2,3} 5+1
    # bytes; the fewest bytes win over the earliest cuts
    cut = choose_cuts(segs, 3)
    assert cut.bounds == (0, 2, 3, 4) and cut.cut_bytes == 6.0 and cut.bottleneck == 2.0
    # equal bytes everywhere: the earliest cuts win
    even = [Segment(f"b{k}", 1.0, 0, 4) for k in range(4)]
    assert choose_cuts(even, 3).bounds == (0, 1, 2, 4)
    # bottlenecks within 1e-12 relative tie: cut after a gives 2 s crossing 8 bytes, after b
    # 2 + 2e-14 s crossing 1 byte; the bytes decide
    near = [Segment("a", 1.0 + 2e-14, 0, 8), Segment("b", 1.0, 0, 1), Segment("c", 1.0, 0, 0)]
    cut = choose_cuts(near, 2)
    assert cut.bounds == (0, 2, 3) and cut.cut_bytes == 1.0
    # beyond the tolerance the faster cut wins despite its bytes
    far = [Segment("a", 1.0 + 1e-9, 0, 8), Segment("b", 1.0, 0, 1), Segment("c", 1.0, 0, 0)]
    assert choose_cuts(far, 2).bounds == (0, 1, 3)


def test_p2p_cost_moves_the_cut():
    # a cut after the big activation costs 10 s on the wire; the balanced cut is no longer best
    segs = [Segment("a", 1, 0, 1), Segment("b", 1, 0, 100), Segment("c", 1, 0, 1),
            Segment("d", 1, 0, 0)]
    assert choose_cuts(segs, 2).bounds == (0, 2, 4)
    cut = choose_cuts(segs, 2, p2p_bandwidth=10.0, p2p_latency=0.5)
    assert cut.bounds == (0, 1, 4)
    assert cut.stage_time == (1.0 + 0.1 + 0.5, 3.0)
    assert cut.bottleneck == 3.0 and cut.cut_bytes == 1.0


def test_memory_limit_honoured():
    segs = [Segment("pre", 1, 10, 1), *_blocks(4, memory=1), Segment("post", 1, 1, 0)]
    # unconstrained: 6 segments on 2 stages -> 3 | 3, stage 0 holds 12 bytes
    assert choose_cuts(segs, 2).bounds == (0, 3, 6)
    cut = choose_cuts(segs, 2, memory_limit=10)
    assert cut.bounds == (0, 1, 6)
    assert cut.stage_memory == (10.0, 5.0) and cut.bottleneck == 5.0


def test_pins():
    segs = _blocks(8)
    # pinned cut before 1 forces 1 | 7 on two stages
    assert choose_cuts(segs, 2, pinned=[1]).bounds == (0, 1, 8)
    # pins count toward stages; the free cut balances the remainder
    cut = choose_cuts(segs, 3, pinned=[2])
    assert cut.bounds == (0, 2, 5, 8) and cut.bottleneck == 3.0
    # pin 0 is a no-op; duplicates count once
    assert choose_cuts(segs, 2, pinned=[0, 4, 4]).bounds == (0, 4, 8)
    # every cut pinned
    assert choose_cuts(segs, 4, pinned=(7, 3, 5)).bounds == (0, 3, 5, 7, 8)


def test_single_stage_and_one_segment_per_stage():
    segs = [Segment(f"s{k}", k + 1.0, 1, 2) for k in range(4)]
    cut = choose_cuts(segs, 1)
    assert cut.bounds == (0, 4) and cut.stage_time == (10.0,) and cut.cut_bytes == 0.0
    cut = choose_cuts(segs, 4, p2p_bandwidth=2.0)
    assert cut.bounds == (0, 1, 2, 3, 4) and cut.stage_time == (2.0, 3.0, 4.0, 4.0)
    assert cut.stages == 4
    assert isinstance(cut, StageCut)


def test_large_instance_completes():
    rng = random.Random(0)
    segs = [Segment("pre", 0.5, 2e9, 1e7)]
    segs += [Segment(f"blocks.{k}", rng.uniform(0.9, 1.1), 1e9, 1e7) for k in range(128)]
    segs += [Segment("post", 1.5, 2e9, 0)]
    cut = choose_cuts(segs, 64, memory_limit=4e9, p2p_bandwidth=1e10, p2p_latency=1e-5,
                      pinned=[1])
    assert len(cut.bounds) == 65 and cut.bounds[1] == 1
    assert max(cut.stage_memory) <= 4e9
    assert all(b > a for a, b in zip(cut.bounds, cut.bounds[1:]))


# --- bad input --------------------------------------------------------------------------------

def test_errors():
    segs = _blocks(5)
    with pytest.raises(ValueError, match=r"stages=0 must be an integer >= 1"):
        choose_cuts(segs, 0)
    with pytest.raises(ValueError, match=r"cannot cut 5 segments into 6 stages: .*pp\*vpp <= 5"):
        choose_cuts(segs, 6)
    with pytest.raises(
        ValueError,
        match=r"smallest achievable max stage memory is 3 bytes > limit 2; "
        r"raise the limit or use more stages",
    ):
        choose_cuts(segs, 2, memory_limit=2)
    big = [*_blocks(3), Segment("post", 1, 7, 0)]
    with pytest.raises(ValueError, match=r"segment 3 'post' alone needs 7 bytes"):
        choose_cuts(big, 2, memory_limit=5)
    with pytest.raises(ValueError, match=r"2 pinned cuts \[1 \(blocks.1\), 3 \(blocks.3\)\] "
                       r"need at least 3 stages but stages=2; unpin 1"):
        choose_cuts(segs, 2, pinned=[1, 3])
    for bad in (5, -1, 2.0):
        with pytest.raises(ValueError, match=r"pinned segment index .* out of range for 5 "):
            choose_cuts(segs, 2, pinned=[bad])
    with pytest.raises(ValueError, match=r"p2p_bandwidth=0 must be > 0"):
        choose_cuts(segs, 2, p2p_bandwidth=0)
    with pytest.raises(ValueError, match=r"Segment 'x': compute=-1 must be a finite number >= 0"):
        Segment("x", -1, 0, 0)
    cut = choose_cuts(segs, 2)
    with pytest.raises(ValueError, match=r"segment index 5 is out of range for 5 segments"):
        cut.stage_of(5)


def test_memory_error_matches_brute_force():
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 8)
        stages = rng.randint(1, min(n, 4))
        segs = [Segment(f"s{k}", 1, float(rng.randint(1, 9)), 1) for k in range(n)]
        pins = rng.sample(range(n), rng.randint(0, min(stages - 1, n - 1)))
        smallest = _min_max_memory(segs, stages, pins)
        assert max(choose_cuts(segs, stages, memory_limit=smallest, pinned=pins).stage_memory) \
            == smallest
        with pytest.raises(ValueError, match=rf"smallest achievable max stage memory is "
                           rf"{smallest:g} bytes > limit {smallest - 0.5:g}"):
            choose_cuts(segs, stages, memory_limit=smallest - 0.5, pinned=pins)
