"""wait_for: poll a condition until it holds; asked_again: ask while the answer is bad."""

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


def asked_again(fetch: Callable[[], T], bad: Callable[[T], bool], timeout: float,
                interval: float = 0.5) -> T:
    """`fetch()`, called again every `interval` s while `bad(value)` holds, for up to
    `timeout` s; the last value, bad or not, for the caller to report (a query whose answer
    can be briefly wrong for a reason outside the test: a scrape late on a busy machine)."""
    deadline = time.monotonic() + timeout
    value = fetch()
    while bad(value) and time.monotonic() < deadline:
        time.sleep(interval)
        value = fetch()
    return value
