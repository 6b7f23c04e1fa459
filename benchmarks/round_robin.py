"""Timing shared by the benchmarks that compare runners on the same ranks.

Runners are timed round-robin, one step each per round, between barriers, so that whatever
else the machine does falls on all of them alike; the first round warms up and is not kept.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def time_round_robin(runners: dict[str, Callable[[], object]], steps: int,
                     after: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Seconds of each timed step per runner (this rank); `after(name)` runs after each."""
    import torch.distributed as dist

    times = {name: [] for name in runners}
    for step in range(steps + 1):
        for name, run in runners.items():
            dist.barrier()
            start = time.perf_counter()
            run()
            dist.barrier()
            if step:
                times[name].append(time.perf_counter() - start)
                if after is not None:
                    after(name)
    return times


def slowest_rank_median(per_rank: list[dict[str, list[float]]], name: str) -> float:
    """Median over steps of the slowest rank's time: what a step costs the job."""
    return statistics.median(max(steps) for steps in zip(*(r[name] for r in per_rank),
                                                          strict=True))


def ratio_interval(num: list[float], den: list[float], samples: int = 2000,
                   seed: int = 0) -> tuple[float, float, float]:
    """median(num) / median(den) and its 95% paired bootstrap interval: repetitions are
    resampled with replacement, each keeping its pair (both sides ran back to back)."""
    import random

    rng = random.Random(seed)
    n = len(num)
    ratios = []
    for _ in range(samples):
        idx = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistics.median(num[i] for i in idx)
                      / statistics.median(den[i] for i in idx))
    ratios.sort()
    point = statistics.median(num) / statistics.median(den)
    return point, ratios[int(0.025 * samples)], ratios[int(0.975 * samples) - 1]
