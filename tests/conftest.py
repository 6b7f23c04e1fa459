"""Shared test set-up: `tests/` is on sys.path (rootdir import mode), so spawned ranks can
import `model_zoo` and the test modules' worker functions by name."""

from ranks import close_pools


def pytest_sessionfinish(session, exitstatus):
    close_pools()
