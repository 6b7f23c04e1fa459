"""Failure propagation: an exception on one rank ends every rank, with its message and its rank.

The process group's timeout is not enough: a rank that raised but lives on (its caller caught
the error, or it waits for input) leaves the others blocked in a collective until the timeout,
often many minutes, and then they fail with a message about a timeout instead of the cause.

So the runtime records the first failure under one key of the process group's store, and every
rank runs a small watcher thread that polls that key. When another rank's failure appears, the
watcher raises `PeerFailed` (naming that rank and its message) in the main thread, which
interrupts Python code at once; if the main thread is blocked inside a collective (C++ code an
exception cannot reach) and has not ended after `grace_s`, the watcher reports the same message
through `on_exit` (spawn's result queue, or stderr) and ends the process. Every rank therefore
stops within `poll_s + grace_s` of the first failure.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

FAILURE_KEY = "partitioner/failure"


class PeerFailed(RuntimeError):
    """Another rank failed; this rank stops too (the message is that rank's)."""


@dataclass
class FailureWatch:
    """Polls the store for another rank's failure; see the module docstring."""

    store: object
    """A torch.distributed Store shared by every rank (the default group's)."""
    rank: int
    poll_s: float = 0.2
    grace_s: float = 5.0
    on_exit: Callable[[str], None] | None = None
    """Called with the message before the process is ended (default: print to stderr)."""
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> "FailureWatch":
        main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._watch, args=(main,), daemon=True,
                                        name="partitioner-failure-watch")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.poll_s + 1)

    def report(self, error: BaseException) -> None:
        """Record this rank's failure for the others (the first failure recorded wins)."""
        message = f"rank {self.rank} failed: {type(error).__name__}: {error}"
        with contextlib.suppress(Exception):  # the store may be gone already
            self.store.compare_set(FAILURE_KEY, "", message)

    def failure(self) -> str | None:
        """The recorded failure of another rank, or None."""
        if not self.store.check([FAILURE_KEY]):
            return None
        message = self.store.get(FAILURE_KEY).decode()
        return None if message.startswith(f"rank {self.rank} failed:") else message

    @contextlib.contextmanager
    def scope(self):
        """Report any exception raised inside (other ranks then stop), and re-raise it."""
        try:
            yield
        except PeerFailed:
            raise  # not ours: the failing rank has reported it
        except BaseException as error:
            self.report(error)
            raise

    def _watch(self, main_thread: int) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                message = self.failure()
            except Exception:  # noqa: BLE001 - the store went away: the job is ending
                return
            if message is None:
                continue
            _raise_in(main_thread, _peer_failed(message))
            deadline = time.monotonic() + self.grace_s
            while time.monotonic() < deadline:
                if self._stop.wait(self.poll_s):
                    return  # the main thread saw PeerFailed and stopped us
            (self.on_exit or _print)(f"stopped because {message}")
            os._exit(1)


def _print(message: str) -> None:
    print(f"partitioner: {message}", file=sys.stderr, flush=True)


def _peer_failed(message: str) -> type[PeerFailed]:
    """A PeerFailed subclass carrying `message`: an exception raised into another thread is
    given as a class, instantiated there without arguments."""
    return type("PeerFailed", (PeerFailed,),
                {"__init__": lambda self: PeerFailed.__init__(self, f"stopped because {message}"),
                 "__module__": __name__})


def _raise_in(thread_id: int, kind: type[BaseException]) -> None:
    """Raise `kind` in another thread at its next Python instruction."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(kind))


_WATCH: FailureWatch | None = None


def _stop_at_exit() -> None:
    """Stop the watcher while the interpreter is whole. A daemon thread that comes back from
    the store's C++ code during interpreter finalization is ended where it stands, unwinding
    through C++ frames that may not be unwound: the process aborts ("terminate called without
    an active exception", SIGABRT) after a run that succeeded, and torchrun reports it failed."""
    global _WATCH
    if _WATCH is not None:
        _WATCH.stop()
        _WATCH = None


def watch_failures(poll_s: float = 0.2, grace_s: float = 5.0,
                   on_exit: Callable[[str], None] | None = None) -> FailureWatch:
    """This process's watch over the default process group (started on first call; later
    calls return it, with `grace_s`/`on_exit` updated). Needs torch.distributed initialized."""
    global _WATCH
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    if _WATCH is None or _WATCH.store is not store:
        if _WATCH is None:
            atexit.register(_stop_at_exit)  # once per process: later watches replace _WATCH
        else:
            _WATCH.stop()
        _WATCH = FailureWatch(store, dist.get_rank(), poll_s, grace_s, on_exit).start()
    else:
        _WATCH.grace_s = grace_s
        _WATCH.on_exit = on_exit or _WATCH.on_exit
    return _WATCH
