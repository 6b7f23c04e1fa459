"""Run a function on N local CPU ranks (gloo on loopback) and collect what each returns.

`spawn(world_size, fn, *args)` is how tests, the demo and benchmarks get real ranks without
torchrun: every rank runs `fn(*args)` inside an initialized process group; the return values come
back as a list indexed by rank. An exception on any rank is re-raised in the parent with that
rank's traceback, and the other ranks (possibly blocked in a collective) are killed, so a failure
never turns into a hang. `timeout` bounds the whole run. `RankPool` keeps the ranks up for many
runs (the test suite's: each spawn costs seconds of process start and torch import per rank).

Ranks are forked from multiprocessing's fork server, which imports `_PRELOAD` once per parent
process, instead of each rank importing torch afresh (the "spawn" method). Like spawn, a rank
starts clean (no state of the parent's), so `fn` and its arguments must be importable and
picklable. Each rank starts with the parent's environment as it is at `spawn`/`RankPool`; the
preloaded modules read theirs once, when the first pool of the parent started the server.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import time
import traceback
from datetime import timedelta

from runtime.failure import watch_failures


class RankError(RuntimeError):
    """An exception raised on one of the spawned ranks, or a rank that died.

    `str()` carries the rank's traceback; `summary()` is the one line a command prints."""

    def __init__(self, message: str, *, rank: int | None = None,
                 summary: str | None = None) -> None:
        super().__init__(message)
        self.rank = rank
        self._summary = summary

    def summary(self) -> str:
        """Which rank, why, and (for a rank that died) what to do: one line, no traceback."""
        return self._summary or str(self).strip().splitlines()[0]


_CRASHES = {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE}


def death_message(rank: int, exitcode: int, world_size: int) -> str:
    """Why a rank that ended without reporting ended (its exit code: minus the signal that
    ended it, as multiprocessing gives it), and what to do, in one line."""
    if exitcode < 0:
        try:
            sig = signal.Signals(-exitcode)
        except ValueError:
            sig = None
        name = sig.name if sig is not None else f"signal {-exitcode}"
        if sig == signal.SIGKILL:
            why = (f"was killed ({name}), on Linux most often by the out-of-memory killer: "
                   f"{world_size} ranks need more memory than this machine has")
            fix = ("a smaller model or batch, fewer ranks (--world-size), or more memory "
                   "(`dmesg` says whether the out-of-memory killer ran)")
        elif sig in _CRASHES:
            why = f"crashed ({name})"
            fix = ("run it again with PYTHONFAULTHANDLER=1 to see where, or on fewer ranks to "
                   "narrow it down")
        else:
            why = f"was ended by {name} from outside (a scheduler, a time limit or a user)"
            fix = "run it again, with more time or memory if a scheduler ended it"
    else:
        why = f"exited with status {exitcode} before reporting a result"
        fix = "its own output above says why (sys.exit or os._exit in the code it ran)"
    return f"rank {rank} of {world_size} {why}; the other ranks were stopped; fix: {fix}"


_PRELOAD = ("torch", "torch.distributed", "torch._dynamo")
"""What the fork server imports before it forks ranks: about 2 s of torch and 2 s of dynamo
(torch.export's tracer) that every rank would import itself, at once with its peers (four
ranks on two cores: 8 s of starting per pool instead of 2)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(world_size: int, fn, *args, timeout: float = 600.0, threads_per_rank: int | None = None):
    """Run `fn(*args)` on `world_size` gloo ranks; return [result of rank 0, rank 1, ...]."""
    with RankPool(world_size, timeout=timeout, threads_per_rank=threads_per_rank) as pool:
        return pool.run(fn, *args, timeout=timeout)


class RankPool:
    """`world_size` gloo ranks that stay up between runs: `pool.run(fn, *args)` is `spawn`'s
    contract (results in rank order, a rank's error re-raised, never a hang) without starting
    the processes, importing torch and initializing the process group again for every run.

    Runs happen one at a time, each on every rank. Whatever a run leaves in a rank's process
    (imported modules, caches, the process groups of `runtime.mesh.process_group`) is there for
    the next one, as it is for later code in one `spawn`; other process groups the run made
    (a DeviceMesh's, a rank's own singleton) are destroyed at its end, since gloo keeps a
    polling thread per group: 40 left over keep an idle rank at 3% of a core, and a pool that
    lives through a test suite's runs would run hundreds. A run that fails or times out ends
    the pool, since its ranks may be anywhere (blocked in a collective, or between two):
    `alive` turns False and the next pool starts fresh. So does a run in which some rank
    recorded a failure that its own code then caught (the other ranks would be stopped by it
    in a later run). `timeout` bounds the process group's collectives over the pool's whole
    life; each run has its own.
    """

    def __init__(self, world_size: int, *, timeout: float = 600.0,
                 threads_per_rank: int | None = None) -> None:
        if world_size < 1:
            raise ValueError(f"world_size={world_size} must be >= 1")
        self.world_size = world_size
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(_PRELOAD))  # no effect once the server runs
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
        self._procs = [ctx.Process(target=_rank_main, daemon=True,
                                   args=(rank, world_size, port, threads, timeout,
                                         self._tasks[rank], self._results, dict(os.environ)))
                       for rank in range(world_size)]
        for proc in self._procs:
            proc.start()
        self._broken = False

    @property
    def alive(self) -> bool:
        return not self._broken and all(proc.is_alive() for proc in self._procs)

    def run(self, fn, *args, timeout: float = 600.0) -> list:
        """`fn(*args)` on every rank; [result of rank 0, rank 1, ...]."""
        if not self.alive:
            raise RuntimeError("this RankPool was closed or a run on it failed: start a new one")
        for tasks in self._tasks:
            tasks.put((fn, args))
        try:
            outputs = self._collect(timeout)
        except BaseException:
            self._stop(kill=True)
            raise
        return [outputs[rank] for rank in range(self.world_size)]

    def close(self) -> None:
        """End the ranks (each leaves the process group cleanly when the pool is healthy)."""
        self._stop(kill=not self.alive)

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _collect(self, timeout: float) -> dict[int, object]:
        outputs: dict[int, object] = {}
        deadline = time.monotonic() + timeout
        while len(outputs) < self.world_size:
            try:
                rank, ok, payload = self._results.get(timeout=1.0)
            except queue.Empty:
                report = self._late_report()
                if report is None:
                    _raise_if_dead(self._procs, outputs)
                    if time.monotonic() > deadline:
                        raise RankError(
                            f"spawn({self.world_size}) timed out after {timeout:.0f}s; ranks "
                            f"still running: "
                            f"{sorted(set(range(self.world_size)) - set(outputs))}") from None
                    continue
                rank, ok, payload = report
            if not ok:
                # A rank killed by a signal makes its peers fail in their collectives: name
                # the cause, not the first peer to notice (nor this rank, ending after its
                # report).
                _raise_if_dead(self._procs, {**outputs, rank: None}, wait=_SETTLE_S,
                               signalled_only=True)
                summary, trace = payload if isinstance(payload, tuple) else (None, payload)
                raise RankError(f"rank {rank} failed:\n{trace}", rank=rank,
                                summary=f"rank {rank} failed: {summary}" if summary else None)
            outputs[rank] = payload
        return outputs

    def _late_report(self):
        """A failing rank reports, then ends at once: once a rank has ended, its report may
        be readable only now (so it is not taken for a rank that died without one)."""
        if all(proc.is_alive() for proc in self._procs):
            return None
        try:
            return self._results.get(timeout=_SETTLE_S)
        except queue.Empty:
            return None

    def _stop(self, kill: bool) -> None:
        self._broken = True
        if not kill:
            for tasks in self._tasks:
                tasks.put(None)
        for proc in self._procs:
            proc.join(timeout=0.1 if kill else 5)
            if proc.is_alive():
                proc.kill()
                proc.join()


_SETTLE_S = 1.0
"""How long a failure report waits for a rank killed by a signal to be seen as dead."""


def _raise_if_dead(procs, outputs: dict, wait: float = 0.0, signalled_only: bool = False):
    """Raise the RankError of a rank that ended without reporting (exit code not 0)."""
    end = time.monotonic() + wait
    while True:
        dead = [r for r, p in enumerate(procs) if r not in outputs and not p.is_alive()
                and p.exitcode not in (None, 0) and (p.exitcode < 0 or not signalled_only)]
        if dead:
            rank, code = dead[0], procs[dead[0]].exitcode
            message = death_message(rank, code, len(procs))
            raise RankError(message, rank=rank, summary=message)
        if time.monotonic() >= end:
            return
        time.sleep(0.05)


def _rank_main(rank, world_size, port, threads, timeout, tasks, results, environment):
    import torch
    import torch.distributed as dist

    from runtime.failure import FAILURE_KEY

    # the fork server's environment is the parent's when the server started: take today's
    os.environ.clear()
    os.environ.update(environment)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
        watch = watch_failures(on_exit=lambda message: _deliver(results, rank, message))
        while (task := tasks.get()) is not None:
            fn, args = task
            groups_before = set(_live_groups())
            with watch.scope():
                result = fn(*args)
            # Every rank ends the run here, so a failure a rank recorded during it (and caught)
            # is seen by all of them: the run fails rather than stopping a later one.
            dist.barrier()
            store = dist.distributed_c10d._get_default_store()
            if store.check([FAILURE_KEY]):
                raise RuntimeError(store.get(FAILURE_KEY).decode())
            _destroy_groups_except(groups_before)
            results.put((rank, True, result))
    except BaseException as error:  # noqa: BLE001 - every failure must reach the parent
        first_line = (str(error).strip().splitlines() or [""])[0]
        summary = f"{type(error).__name__}: {first_line}"
        results.put((rank, False, (summary, traceback.format_exc())))
        # End now, the report flushed: the process group cannot be left cleanly while peers
        # wait in a collective, and its threads torn down at interpreter exit can abort the
        # process ("terminate called without an active exception"), which would read as a crash.
        results.close()
        results.join_thread()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    try:
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the results are already delivered
        pass


def _live_groups() -> list:
    import torch.distributed as dist

    return list(dist.distributed_c10d._world.pg_map)


def _destroy_groups_except(kept: set) -> None:
    """Destroy the process groups made since `kept` was taken, but the default group and those
    `runtime.mesh.process_group` keeps for reuse (every rank made the same ones in the same
    order, so every rank destroys the same ones)."""
    import torch.distributed as dist

    from runtime.mesh import cached_groups

    kept = kept | set(cached_groups()) | {dist.group.WORLD}
    for group in _live_groups():
        if group not in kept:
            dist.destroy_process_group(group)


def _deliver(results, rank: int, message: str) -> None:
    """Hand a rank's last message to the parent before the process ends (a Queue's feeder
    thread would otherwise die with it, message unsent)."""
    results.put((rank, False, message))
    results.close()
    results.join_thread()
