"""A monotonic deadline, so every polling loop in tests and benchmarks is bounded.

:func:`wait_for` is *the* way tests wait for something that happens on another
thread or in another process: it polls a condition until it holds or the
deadline passes. It never stands in for synchronisation by itself — the
condition is what the test asserts on, the deadline only bounds a failure.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: Seconds between two polls of a :func:`wait_for` condition (short: tests stay fast).
POLL_INTERVAL = 0.01
#: Default bound of :func:`wait_for` (seconds): generous for a loaded 2-core machine.
DEFAULT_TIMEOUT = 10.0


class Deadline:
    """``seconds`` from now on the monotonic clock."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return time.monotonic() >= self._end


def wait_for(
    cond: Callable[[], bool],
    timeout: float = DEFAULT_TIMEOUT,
    what: str = "the condition",
    *,
    interval: float = POLL_INTERVAL,
) -> None:
    """Poll ``cond`` until it returns true.

    The condition is checked once more after the deadline, so a slow machine
    fails only when the condition really does not hold.

    Raises:
        AssertionError: ``cond`` was still false after ``timeout`` seconds; the
        message names ``what`` was awaited.
    """
    deadline = Deadline(timeout)
    while not cond():
        if deadline.expired():
            if cond():
                return
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(min(interval, max(deadline.remaining(), 0.001)))
