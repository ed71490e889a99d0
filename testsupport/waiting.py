"""wait_for: poll a condition until it holds."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
             what: str = "condition") -> T:
    """Call `predicate` every `interval` s until it returns something true, and return that.

    Raises AssertionError naming `what` (and the last value seen) once `timeout` s have passed.
    An exception from `predicate` is not caught: a predicate that can fail for a while (a
    server not listening yet) catches that itself and returns False.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} "
                                 f"(last: {value!r})")
        time.sleep(interval)
