"""A failure on one rank ends every rank with that rank's message, even when the failing rank
lives on and the others are blocked in a collective (which no exception can reach)."""

import time

import pytest
import torch.distributed as dist

from runtime import RankError, spawn
from runtime.failure import PeerFailed, watch_failures
from runtime.launch import death_message


def _one_rank_fails_and_lives_on(blocked: bool):
    watch = watch_failures(grace_s=1.0)
    if dist.get_rank() == 1:
        try:
            with watch.scope():
                raise ValueError("bad batch on rank one")
        except ValueError:
            time.sleep(120)  # caught, and never joins the others
        return "lived on"
    if blocked:
        dist.barrier()  # C++: only the watcher's exit ends this
        return "unreachable"
    try:
        while True:  # Python code: PeerFailed arrives as an exception
            time.sleep(0.01)
    except PeerFailed as error:
        raise RuntimeError(f"rank 0 saw: {error}") from None


@pytest.mark.parametrize("blocked", [True, False], ids=["in a collective", "in python"])
def test_every_rank_stops_with_the_failing_ranks_message(blocked):
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        spawn(2, _one_rank_fails_and_lives_on, blocked, timeout=300)
    assert "rank 0 " in str(info.value)
    assert "rank 1 failed: ValueError: bad batch on rank one" in str(info.value)
    # far less than the 120 s rank 1 sleeps (or the process group's timeout): only start-up
    # (two torch imports on a busy machine) plus poll + grace
    assert time.monotonic() - start < 100


def _rank_one_is_killed():
    import os
    import signal

    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer does
    dist.barrier()  # rank 0's gloo sees the peer gone and fails: a consequence, not the cause
    return "unreachable"


def test_a_killed_rank_is_named_with_why_and_what_to_do():
    with pytest.raises(RankError) as info:
        spawn(2, _rank_one_is_killed, timeout=300)
    summary = info.value.summary()
    assert info.value.rank == 1 and len(summary.splitlines()) == 1
    assert summary.startswith("rank 1 of 2 was killed (SIGKILL), on Linux most often by the "
                              "out-of-memory killer")
    assert "fix: a smaller model or batch, fewer ranks (--world-size)" in summary


@pytest.mark.parametrize("exitcode, fragment", [
    (-9, "rank 1 of 4 was killed (SIGKILL), on Linux most often by the out-of-memory killer: 4 "
         "ranks need more memory than this machine has; the other ranks were stopped; fix: "),
    (-11, "rank 1 of 4 crashed (SIGSEGV); the other ranks were stopped; fix: run it again "
          "with PYTHONFAULTHANDLER=1"),
    (-15, "rank 1 of 4 was ended by SIGTERM from outside (a scheduler, a time limit or a user)"),
    (3, "rank 1 of 4 exited with status 3 before reporting a result"),
])
def test_death_message_says_which_rank_why_and_the_fix(exitcode, fragment):
    message = death_message(1, exitcode, 4)
    assert fragment in message and len(message.splitlines()) == 1 and "fix: " in message


def _watcher_at_exit():
    import atexit

    from runtime import failure

    calls = []
    real_register = atexit.register
    atexit.register = lambda fn: calls.append(fn) or real_register(fn)
    try:
        failure._stop_at_exit()  # start from no watch in this process
        watch = watch_failures()
    finally:
        atexit.register = real_register
    running = watch._thread.is_alive()
    for fn in calls:
        fn()  # what the interpreter runs at exit, before finalization
    return calls == [failure._stop_at_exit], running, watch._thread.is_alive()


def test_the_watcher_stops_at_exit_before_the_interpreter_finalizes():
    """A daemon thread back from the store's C++ code during finalization aborts the process
    after a successful run (torchrun then reports it failed): exit stops the watcher first."""
    for registered, running, alive_after in spawn(2, _watcher_at_exit, timeout=120):
        assert registered and running and not alive_after
