"""A failure on one rank ends every rank with that rank's message, even when the failing rank
lives on and the others are blocked in a collective (which no exception can reach)."""

import time

import pytest
import torch.distributed as dist

from runtime import RankError, spawn
from runtime.failure import PeerFailed, watch_failures


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
