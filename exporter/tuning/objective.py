"""Latency objectives: `ttft_p95=0.5,itl_p95=50ms` -> checks a sweep point must pass."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError

METRICS = {"ttft": "ttft_seconds", "itl": "itl_seconds", "e2e": "e2e_seconds"}
QUANTILES = ("p50", "p95", "p99")


@dataclass(frozen=True)
class Objective:
    metric: str  # ttft | itl | e2e
    quantile: str  # p50 | p95 | p99
    threshold: float  # seconds

    @property
    def name(self) -> str:
        return f"{self.metric}_{self.quantile}"

    def value(self, measurements: dict) -> float | None:
        """This objective's latency in a client summary or a daemon view (seconds)."""
        return measurements[METRICS[self.metric]][self.quantile]

    def met_by(self, measurements: dict) -> bool:
        value = self.value(measurements)
        return value is not None and value <= self.threshold


def parse_objectives(text: str) -> list[Objective]:
    """Comma-separated NAME=SECONDS (or NAME=NUMBERms); NAME is ttft|itl|e2e _ p50|p95|p99."""
    objectives = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, raw = item.partition("=")
        metric, _, quantile = name.strip().partition("_")
        if not sep or metric not in METRICS or quantile not in QUANTILES:
            raise UsageError(f"objective {item!r}: expected NAME=SECONDS with NAME one of "
                             + ", ".join(f"{m}_{q}" for m in METRICS for q in QUANTILES))
        threshold = _seconds(raw.strip(), item)
        if threshold <= 0:
            raise UsageError(f"objective {item!r} is impossible: a latency bound must be > 0")
        objectives.append(Objective(metric, quantile, threshold))
    if not objectives:
        raise UsageError("--objective is empty")
    names = [o.name for o in objectives]
    if len(set(names)) != len(names):
        raise UsageError(f"--objective names a latency twice: {text!r}")
    return objectives


def _seconds(raw: str, item: str) -> float:
    scale = 1.0
    if raw.endswith("ms"):
        raw, scale = raw[:-2], 0.001
    elif raw.endswith("s"):
        raw = raw[:-1]
    try:
        return float(raw) * scale
    except ValueError:
        raise UsageError(f"objective {item!r}: {raw!r} is not a number of seconds") from None
