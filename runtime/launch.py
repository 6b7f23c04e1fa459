"""Run a function on N local CPU ranks (gloo on loopback) and collect what each returns.

`spawn(world_size, fn, *args)` is how tests, the demo and benchmarks get real ranks without
torchrun: every rank runs `fn(*args)` inside an initialized process group; the return values come
back as a list indexed by rank. An exception on any rank is re-raised in the parent with that
rank's traceback, and the other ranks (possibly blocked in a collective) are killed, so a failure
never turns into a hang. `timeout` bounds the whole run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import socket
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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(world_size: int, fn, *args, timeout: float = 600.0, threads_per_rank: int | None = None):
    """Run `fn(*args)` on `world_size` gloo ranks; return [result of rank 0, rank 1, ...]."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    procs = [ctx.Process(target=_rank_main, daemon=True,
                         args=(rank, world_size, port, threads, timeout, fn, args, results))
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    outputs: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) < world_size:
            try:
                rank, ok, payload = results.get(timeout=1.0)
            except queue.Empty:
                _raise_if_dead(procs, outputs)
                if time.monotonic() > deadline:
                    raise RankError(f"spawn({world_size}) timed out after {timeout:.0f}s; "
                                    f"ranks still running: "
                                    f"{sorted(set(range(world_size)) - set(outputs))}")
                continue
            if not ok:
                # A rank killed by a signal makes its peers fail in their collectives: name
                # the cause, not the first peer to notice.
                _raise_if_dead(procs, outputs, wait=_SETTLE_S, signalled_only=True)
                summary, trace = payload if isinstance(payload, tuple) else (None, payload)
                raise RankError(f"rank {rank} failed:\n{trace}", rank=rank,
                                summary=f"rank {rank} failed: {summary}" if summary else None)
            outputs[rank] = payload
    finally:
        for proc in procs:
            proc.join(timeout=5 if len(outputs) == world_size else 0.1)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [outputs[rank] for rank in range(world_size)]


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


def _rank_main(rank, world_size, port, threads, timeout, fn, args, results):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
        watch = watch_failures(on_exit=lambda message: _deliver(results, rank, message))
        with watch.scope():
            result = fn(*args)
        results.put((rank, True, result))
    except BaseException as error:  # noqa: BLE001 - every failure must reach the parent
        first_line = (str(error).strip().splitlines() or [""])[0]
        summary = f"{type(error).__name__}: {first_line}"
        results.put((rank, False, (summary, traceback.format_exc())))
        return
    try:
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the result is already delivered
        pass


def _deliver(results, rank: int, message: str) -> None:
    """Hand a rank's last message to the parent before the process ends (a Queue's feeder
    thread would otherwise die with it, message unsent)."""
    results.put((rank, False, message))
    results.close()
    results.join_thread()
