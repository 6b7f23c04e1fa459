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
import socket
import time
import traceback
from datetime import timedelta

from runtime.failure import watch_failures


class RankError(RuntimeError):
    """An exception raised on one of the spawned ranks."""


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
                dead = [r for r, p in enumerate(procs)
                        if r not in outputs and not p.is_alive() and p.exitcode not in (None, 0)]
                if dead:
                    raise RankError(f"rank {dead[0]} died with exit code "
                                    f"{procs[dead[0]].exitcode} before reporting")
                if time.monotonic() > deadline:
                    raise RankError(f"spawn({world_size}) timed out after {timeout:.0f}s; "
                                    f"ranks still running: "
                                    f"{sorted(set(range(world_size)) - set(outputs))}")
                continue
            if not ok:
                raise RankError(f"rank {rank} failed:\n{payload}")
            outputs[rank] = payload
    finally:
        for proc in procs:
            proc.join(timeout=5 if len(outputs) == world_size else 0.1)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [outputs[rank] for rank in range(world_size)]


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
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
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
