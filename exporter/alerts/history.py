"""A short in-memory history of the samples the rules read, in two resolutions.

Each evaluation tick appends one reading of every wanted sample (by exposed sample name,
e.g. `vllm_time_to_first_token_seconds_bucket`). The fine tier keeps every tick for
`fine_seconds`; the coarse tier keeps one reading per `coarse_step_seconds` for
`history_seconds`, so 6 h SLO windows cost hundreds of points per series, not thousands.
A window query reads the fine tier when it reaches back far enough, else the coarse one.

A series missing from a reading gets no sample (like a stale series in Prometheus); an
instant query takes the newest sample within the lookback, unless the series went stale
after it.
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Iterable, NamedTuple

from .promfuncs import counter_correction

LabelsKey = tuple[tuple[str, str], ...]


class Window(NamedTuple):
    """One series' samples inside a range, as much as rate() needs of them."""

    labels: dict[str, str]
    first_ms: int
    last_ms: int
    count: int
    first_value: float
    last_value: float
    correction: float  # the counter-reset correction inside the range


class _Series:
    __slots__ = ("labels", "ts", "values", "stale_since", "drops")

    def __init__(self, labels: dict[str, str]):
        self.labels = labels
        self.ts: list[int] = []
        self.values: list[float] = []
        self.stale_since: int | None = None  # set when a reading lacked this series
        # times of samples lower than their predecessor (counter resets): a window without
        # any skips rate()'s reset scan, the bulk of the evaluation cost on long windows
        self.drops: list[int] = []


class _Tier:
    def __init__(self, step_ms: int, span_ms: int):
        self.step_ms, self.span_ms = step_ms, span_ms
        self.last_ms: int | None = None
        self.first_ms: int | None = None
        self.series: dict[str, dict[LabelsKey, _Series]] = {}

    def wants(self, t_ms: int) -> bool:
        return self.last_ms is None or t_ms - self.last_ms >= self.step_ms

    def add(self, t_ms: int, readings: dict[str, dict[LabelsKey, tuple[dict, float]]]) -> None:
        self.last_ms = t_ms
        if self.first_ms is None:
            self.first_ms = t_ms
        for name, by_key in readings.items():
            table = self.series.setdefault(name, {})
            for key, (labels, value) in by_key.items():
                series = table.get(key)
                if series is None:
                    series = table[key] = _Series(labels)
                if series.values and value < series.values[-1]:
                    series.drops.append(t_ms)
                series.ts.append(t_ms)
                series.values.append(value)
                series.stale_since = None
        for name, table in self.series.items():
            present = readings.get(name, {})
            for key, series in table.items():
                if key not in present and series.stale_since is None:
                    series.stale_since = t_ms
        self._trim(t_ms)

    def _trim(self, t_ms: int) -> None:
        horizon = t_ms - self.span_ms
        if self.first_ms is not None and self.first_ms < horizon:
            self.first_ms = horizon
        for table in self.series.values():
            for key in list(table):
                series = table[key]
                # trim in chunks: cheap amortised, at most ~1/8 extra kept
                if series.ts and series.ts[0] < horizon:
                    cut = bisect.bisect_left(series.ts, horizon)
                    if cut * 8 >= len(series.ts) or cut == len(series.ts):
                        del series.ts[:cut], series.values[:cut]
                        del series.drops[:bisect.bisect_left(series.drops, horizon)]
                if not series.ts:
                    del table[key]


class History:
    def __init__(self, wanted: Iterable[str], step_seconds: float, fine_seconds: float,
                 history_seconds: float, coarse_step_seconds: float = 30.0):
        self.wanted = frozenset(wanted)
        self._lock = threading.Lock()
        fine = _Tier(0, int(fine_seconds * 1000))
        self.tiers = [fine]
        if history_seconds > fine_seconds:
            step = max(coarse_step_seconds, step_seconds)
            self.tiers.append(_Tier(int(step * 1000), int(history_seconds * 1000)))

    # --- writing -------------------------------------------------------------------------
    def add(self, t: float, samples: Iterable[tuple[str, dict[str, str], float]]) -> None:
        """One reading: (sample name, labels, value) for every sample exposed now."""
        t_ms = int(round(t * 1000))
        readings: dict[str, dict[LabelsKey, tuple[dict, float]]] = {}
        for name, labels, value in samples:
            if name in self.wanted and not math.isnan(value):
                key = tuple(sorted(labels.items()))
                readings.setdefault(name, {})[key] = (labels, value)
        with self._lock:
            for tier in self.tiers:
                if tier.wants(t_ms):
                    tier.add(t_ms, readings)

    def add_registry(self, t: float, registry) -> None:
        """Read only the families the rules use (the other collectors are not called)."""
        restricted = registry.restricted_registry(self.wanted)

        def samples():
            for family in restricted.collect():
                for s in family.samples:
                    yield s.name, s.labels, s.value
        self.add(t, samples())

    # --- reading ---------------------------------------------------------------------------
    def latest(self, name: str, t_ms: int, lookback_ms: int):
        out = []
        with self._lock:
            for series in self.tiers[0].series.get(name, {}).values():
                i = bisect.bisect_right(series.ts, t_ms) - 1
                if i < 0 or series.ts[i] <= t_ms - lookback_ms:
                    continue
                if series.stale_since is not None and series.ts[i] < series.stale_since <= t_ms:
                    continue
                out.append((series.labels, series.values[i]))
        return out

    def window(self, name: str, start_ms: int, end_ms: int) -> list[Window]:
        """Every series of `name` with at least two samples in [start_ms, end_ms]."""
        with self._lock:
            tier = self._tier_for(start_ms)
            out = []
            for series in tier.series.get(name, {}).values():
                lo = bisect.bisect_left(series.ts, start_ms)
                hi = bisect.bisect_right(series.ts, end_ms)
                if hi - lo < 2:
                    continue
                d = bisect.bisect_right(series.drops, series.ts[lo])
                correction = 0.0
                if d < len(series.drops) and series.drops[d] <= series.ts[hi - 1]:
                    correction = counter_correction(series.values[lo:hi])
                out.append(Window(series.labels, series.ts[lo], series.ts[hi - 1], hi - lo,
                                  series.values[lo], series.values[hi - 1], correction))
            return out

    def _tier_for(self, start_ms: int) -> _Tier:
        """The finest tier reaching back to start_ms; else the one reaching back furthest
        (windows are then partial, as in a Prometheus that started recently)."""
        filled = [t for t in self.tiers if t.first_ms is not None]
        for tier in filled:
            if tier.first_ms <= start_ms:
                return tier
        if not filled:
            return self.tiers[0]
        return min(filled, key=lambda t: t.first_ms)  # min() keeps the first (finest) on ties

    def series_count(self) -> int:
        with self._lock:
            return sum(len(t) for t in self.tiers[0].series.values())

    def sample_count(self) -> int:
        """Samples held in both tiers: about 40 bytes each (two lists of Python numbers)."""
        with self._lock:
            return sum(len(series.ts) for tier in self.tiers
                       for table in tier.series.values() for series in table.values())
