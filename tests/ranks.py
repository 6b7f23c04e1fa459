"""The test session's ranks: `on_ranks(world_size, fn, *args)` is `runtime.spawn` on a
`runtime.RankPool` kept for the whole session, one per world size. Every spawn costs each rank
seconds of process start, torch's import and first-call warm-up; the suite's few dozen spawns
would pay that few dozen times. A run that fails ends its pool (the next run starts a fresh
one), so one failing test cannot leave ranks in a state that fails the next.

The tests of spawn itself (launch, failure propagation, a killed rank) and the compile test
(dynamo's counters are per process) use `runtime.spawn`: fresh ranks."""

from __future__ import annotations

from runtime import RankPool

_POOLS: dict[int, RankPool] = {}

POOL_TIMEOUT_S = 3600.0
"""The pools' process-group timeout: a bound on any one collective (each run has its own)."""


def on_ranks(world_size: int, fn, *args, timeout: float = 600.0) -> list:
    """`fn(*args)` on `world_size` ranks of the session's pool: [result of rank 0, ...]."""
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive:
        pool = _POOLS[world_size] = RankPool(world_size, timeout=POOL_TIMEOUT_S)
    return pool.run(fn, *args, timeout=timeout)


def close_pools() -> None:
    while _POOLS:
        _POOLS.popitem()[1].close()
