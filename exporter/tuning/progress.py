"""A one-line progress indicator on stderr (no dependency): `label: done/total, elapsed`."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int | None, enabled: bool = True,
                 interval: float = 0.25):
        self.label, self.total, self.enabled, self.interval = label, total, enabled, interval
        self.started = time.monotonic()
        self.done = 0
        self.failed = 0
        self._last_draw = 0.0

    def advance(self, ok: bool = True) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        now = time.monotonic()
        if now - self._last_draw >= self.interval:
            self._last_draw = now
            self._draw()

    def _draw(self, end: str = "") -> None:
        if not self.enabled:
            return
        total = f"/{self.total}" if self.total else ""
        failed = f", {self.failed} failed" if self.failed else ""
        elapsed = time.monotonic() - self.started
        sys.stderr.write(f"\r{self.label}: {self.done}{total} requests{failed}, "
                         f"{elapsed:.1f} s\x1b[K{end}")
        sys.stderr.flush()

    def close(self) -> None:
        self._draw(end="\n")
