"""Alert states over time, the way Prometheus's alerting rules keep them.

Each evaluation at time t runs every rule's expression; each resulting series is one alert,
identified by its labels (series labels + rule labels + alertname):
- new: pending, active since t; pending for at least `for` (0s: at once): firing;
- gone from the result: a pending alert is forgotten, a firing one becomes inactive
  (resolved at t) and is still reported to Alertmanager for `resolved_retention` seconds.
Annotations are rendered at each evaluation with the current value and labels.

`due_notifications(t)` applies Prometheus's sending rule: a firing alert is sent when it
starts firing and again every `resend_interval`; a resolved one at once and then again every
interval until it is forgotten. Firing alerts carry endsAt = t + 4 x max(resend, interval),
so Alertmanager resolves them by itself if the daemon disappears.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from .expr import Context, SampleSource
from .rules import Rule
from .templates import render

log = logging.getLogger("exporter.alerts")

INACTIVE, PENDING, FIRING = "inactive", "pending", "firing"
STATE_VALUE = {INACTIVE: 0, PENDING: 1, FIRING: 2}


@dataclass
class Alert:
    labels: dict[str, str]
    annotations: dict[str, str]
    value: float
    state: str
    active_at: float
    fired_at: float | None = None
    resolved_at: float | None = None
    last_sent_at: float | None = None


@dataclass
class RuleState:
    rule: Rule
    alerts: dict[tuple, Alert] = field(default_factory=dict)
    last_error: str | None = None
    last_duration: float = 0.0

    def state(self) -> str:
        states = {a.state for a in self.alerts.values()}
        return FIRING if FIRING in states else PENDING if PENDING in states else INACTIVE


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


class Evaluator:
    def __init__(self, rules: list[Rule], source: SampleSource, interval: float,
                 resend_interval: float = 60.0, resolved_retention: float = 900.0,
                 on_error: Callable[[Rule, Exception], None] | None = None):
        self.rules = [RuleState(rule) for rule in rules]
        self.source = source
        self.interval = interval
        self.resend_interval = resend_interval
        self.resolved_retention = resolved_retention
        self.on_error = on_error
        self.last_eval: float | None = None

    def evaluate(self, t: float) -> None:
        ctx = Context(self.source, t)
        for state in self.rules:
            started = time.perf_counter()
            try:
                self._evaluate_rule(state, ctx)
                state.last_error = None
            except Exception as exc:  # one broken rule must not stop the others
                state.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("evaluating %s failed", state.rule.alert)
                if self.on_error:
                    self.on_error(state.rule, exc)
            state.last_duration = time.perf_counter() - started
        self.last_eval = t

    def _evaluate_rule(self, state: RuleState, ctx: Context) -> None:
        rule, t = state.rule, ctx.t
        result = rule.expr.evaluate(ctx)
        if not isinstance(result, dict):
            raise ValueError("the expression gives a scalar, not a vector")
        seen = set()
        for key, value in result.items():
            series = dict(key)
            labels = dict(series)
            for name, text in rule.all_labels().items():
                labels[name] = render(text, series, value)
            labels["alertname"] = rule.alert
            annotations = {name: render(text, series, value)
                           for name, text in rule.annotations.items()}
            ident = tuple(sorted(labels.items()))
            seen.add(ident)
            alert = state.alerts.get(ident)
            if alert is not None and alert.state != INACTIVE:
                alert.value, alert.annotations = value, annotations
                continue
            state.alerts[ident] = Alert(labels, annotations, value, PENDING, active_at=t)
        for ident in list(state.alerts):
            alert = state.alerts[ident]
            if ident in seen:
                if alert.state == PENDING and t - alert.active_at >= rule.for_seconds:
                    alert.state, alert.fired_at = FIRING, t
                continue
            if alert.state == PENDING:
                del state.alerts[ident]
            elif alert.state == FIRING:
                alert.state, alert.resolved_at = INACTIVE, t
            elif alert.resolved_at is not None and t - alert.resolved_at > self.resolved_retention:
                del state.alerts[ident]

    # --- reading the states ----------------------------------------------------------------
    def firing(self) -> list[Alert]:
        return [a for s in self.rules for a in s.alerts.values() if a.state == FIRING]

    def due_notifications(self, t: float, generator_url: str) -> list[dict]:
        """Alerts to send now, as Alertmanager API v2 objects; marks them sent."""
        out = []
        valid_for = 4 * max(self.resend_interval, self.interval)
        for state in self.rules:
            for alert in state.alerts.values():
                if alert.state == PENDING:
                    continue
                resolved_since_sent = (alert.resolved_at is not None and
                                       (alert.last_sent_at is None or
                                        alert.resolved_at > alert.last_sent_at))
                if not resolved_since_sent and alert.last_sent_at is not None and \
                        alert.last_sent_at + self.resend_interval > t:
                    continue
                alert.last_sent_at = t
                ends = alert.resolved_at if alert.state == INACTIVE else t + valid_for
                out.append({
                    "labels": dict(alert.labels),
                    "annotations": dict(alert.annotations),
                    "startsAt": rfc3339(alert.fired_at or alert.active_at),
                    "endsAt": rfc3339(ends),
                    "generatorURL": generator_url,
                })
        return out

    def snapshot(self) -> list[dict]:
        """Every rule with its alerts, for the JSON endpoint."""
        out = []
        for state in self.rules:
            rule = state.rule
            out.append({
                "alert": rule.alert, "kind": rule.kind, "state": state.state(),
                "severity": rule.severity, "for_seconds": rule.for_seconds,
                "expr": rule.expr.promql(), "last_error": state.last_error,
                "last_evaluation_seconds": state.last_duration,
                "alerts": [{
                    "labels": a.labels, "annotations": a.annotations, "state": a.state,
                    "value": a.value if math.isfinite(a.value) else str(a.value),
                    "active_at": rfc3339(a.active_at),
                    "fired_at": rfc3339(a.fired_at) if a.fired_at else None,
                    "resolved_at": rfc3339(a.resolved_at) if a.resolved_at else None,
                } for a in state.alerts.values()],
            })
        return out
