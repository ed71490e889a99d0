"""Latency objectives the daemon counts itself, request by request.

A Prometheus histogram can only tell whether a request met "TTFT under 0.75 s" when 0.75 is a
bucket bound. The stat logger instead compares each request's value with each configured
threshold as it records it, and counts good and bad requests per objective in
`vllm_slo_requests_total{objective, result}`. Burn-rate alerts (exporter/alerts) divide those
counters over their windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SIGNALS = ("time_to_first_token", "time_per_output_token", "e2e_request_latency")


@dataclass
class LatencyObjective:
    name: str = ""
    signal: str = "time_to_first_token"  # one of SIGNALS
    threshold_seconds: float = 1.0
    target: float = 0.99  # fraction of requests that must meet the threshold

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if not self.name or not self.name.replace("_", "").isalnum():
            out.append(("name", f"must be a non-empty word (letters, digits, _), got {self.name!r}"))
        if self.signal not in SIGNALS:
            out.append(("signal", f"must be one of {', '.join(SIGNALS)}, got {self.signal!r}"))
        if self.threshold_seconds <= 0:
            out.append(("threshold_seconds", f"must be > 0, got {self.threshold_seconds}"))
        if not 0 < self.target < 1:
            out.append(("target", f"must be in (0, 1), got {self.target}"))
        return out


def default_objectives() -> list[LatencyObjective]:
    return [
        LatencyObjective("ttft", "time_to_first_token", threshold_seconds=2.0, target=0.99),
        LatencyObjective("tpot", "time_per_output_token", threshold_seconds=0.1, target=0.99),
    ]


@dataclass
class SloConfig:
    objectives: list[LatencyObjective] = field(default_factory=default_objectives)
    # Requests finishing with reason "error" (and, in daemon mode, client aborts are NOT errors)
    # must stay below 1 - error_target of all finished requests.
    error_target: float = 0.999

    def problems(self) -> list[tuple[str, str]]:
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            return [("objectives", f"objective names must be unique, got {names}")]
        if not 0 < self.error_target < 1:
            return [("error_target", f"must be in (0, 1), got {self.error_target}")]
        return []


class ObjectiveCounter:
    """good/bad counter children of one objective, for one (model, engine)."""

    __slots__ = ("threshold", "good", "bad")

    def __init__(self, family, model: str, engine: str, objective: LatencyObjective):
        self.threshold = objective.threshold_seconds
        self.good = family.labels(model, engine, objective.name, "good")
        self.bad = family.labels(model, engine, objective.name, "bad")

    def observe(self, seconds: float) -> None:
        (self.good if seconds <= self.threshold else self.bad).inc()
