"""Readings in, advice and forecasts out: the rules run over each model's window.

Used by the daemon's service (service.py) and by `vllm-exporter advise` when it samples a
daemon's /metrics itself; neither applies anything.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .config import AdviceConfig
from .forecast import energy_per_output_token, forecast
from .model import Advice
from .readings import Reading, windows
from .rules import RULES

log = logging.getLogger("exporter.advice")


@dataclass
class ModelResult:
    model: str
    window_seconds: float
    advice: list[Advice] = field(default_factory=list)
    silent: list[str] = field(default_factory=list)  # rules that gave nothing
    forecast: dict[str, float] = field(default_factory=dict)
    energy_per_output_token: float | None = None
    config: dict[str, str] = field(default_factory=dict)


class Advisor:
    """Keeps the readings of the last window and evaluates every rule over them."""

    def __init__(self, settings: AdviceConfig,
                 on_error: Callable[[str], None] = lambda rule: None):
        self.settings = settings
        self.on_error = on_error
        self.readings: deque[Reading] = deque()

    def add(self, reading: Reading) -> None:
        self.readings.append(reading)
        horizon = reading.t - self.settings.window_seconds
        while len(self.readings) > 2 and self.readings[1].t <= horizon:
            self.readings.popleft()

    def evaluate(self) -> list[ModelResult]:
        results = []
        for w in windows(list(self.readings)):
            result = ModelResult(w.model, w.seconds, config=dict(w.config))
            for rule in RULES:
                try:
                    found = rule.evaluate(w, self.settings)
                except Exception:  # one broken rule must not silence the others
                    log.exception("advice rule %s failed", rule.NAME)
                    self.on_error(rule.NAME)
                    found = []
                result.advice.extend(found)
                if not found:
                    result.silent.append(rule.NAME)
            try:
                result.forecast = forecast(w)
                result.energy_per_output_token = energy_per_output_token(w)
            except Exception:
                log.exception("capacity forecast failed")
                self.on_error("forecast")
            results.append(result)
        return results


def results_json(results: list[ModelResult], settings: AdviceConfig,
                 evaluated_at: float | None) -> dict:
    """The /advice page (and `advise --json`)."""
    return {
        "evaluated_at": evaluated_at,
        "interval_seconds": settings.interval_seconds,
        "window_seconds": settings.window_seconds,
        "applied": False,  # never: advice is for an operator to read
        "models": [{
            "model": r.model,
            "window_seconds": round(r.window_seconds, 1),
            "advice": [a.to_json() for a in r.advice],
            "silent_rules": r.silent,
            "forecast": {k: _finite(v) for k, v in r.forecast.items()},
            "energy_per_output_token_joules": r.energy_per_output_token,
        } for r in results],
    }


def _finite(value: float) -> float | str:
    return value if value != float("inf") else "+Inf"
