"""The alerting thread: sample the registry, evaluate the rules, notify Alertmanager.

Every `evaluation_interval_seconds`: read our registry into the history (only the samples the
rules use), evaluate all rules, publish states as metrics, hand due notifications to the
Alertmanager client. Nothing here raises into the daemon: errors are logged and counted in
vllm_exporter_errors_total{component="alerts"}.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry

from ..exposition import PublishedFamilies
from ..families import create_client, metric_family
from .alertmanager import AlertmanagerClient, SendCounters
from .defaults import default_rule_file
from .evaluator import FIRING, PENDING, STATE_VALUE, Evaluator
from .families import ALERT_FAMILIES
from .history import History
from .hooks import AlertHooks
from .rules import Rule, load_rule_file, parse_rules

log = logging.getLogger("exporter.alerts")

DEFAULT_PACK_SOURCE = "<default rule pack>"
# Families published whole once per tick (PublishedFamilies) rather than set series by series.
PUBLISHED = ("vllm_exporter_alert_rule_state", "vllm_exporter_alerts")
RULE_STATE_SPEC, ALERTS_SPEC = (next(spec for spec in ALERT_FAMILIES if spec.name == name)
                                for name in PUBLISHED)


def load_rules(config: Any) -> list[Rule]:
    """The configured rule file, or the default pack with the configured thresholds."""
    alerts = config.alerts
    if alerts.rules_file:
        return load_rule_file(alerts.rules_file, config.slo)
    raw = default_rule_file(alerts.thresholds, config.slo, alerts.runbook_base_url)
    return parse_rules(raw, config.slo,
                       DEFAULT_PACK_SOURCE)


def history_for(rules: list[Rule], config: Any) -> History:
    wanted = {s.name for rule in rules for s in rule.expr.selectors()}
    reach = max((rule.expr.max_range_seconds() for rule in rules), default=300.0)
    a = config.alerts
    span = reach + 2 * a.evaluation_interval_seconds
    return History(wanted, a.evaluation_interval_seconds, min(a.fine_history_seconds, span),
                   span, a.coarse_step_seconds)


class AlertingService:
    def __init__(self, config: Any, rules: list[Rule]):
        self.config = config
        self.rules = rules
        self.interval = config.alerts.evaluation_interval_seconds
        self.history = history_for(rules, config)
        self.evaluator: Evaluator | None = None
        self.client: AlertmanagerClient | None = None
        self.generator_url = config.alerts.external_url
        self._stop = threading.Event()
        self._tick_now = threading.Event()  # set: evaluate at once instead of at the next tick
        self._last_tick_at = 0.0  # the `now` of the last completed tick
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards evaluator state against the JSON route
        self.registry: CollectorRegistry | None = None
        self.hooks = AlertHooks()

    # --- lifecycle -------------------------------------------------------------------------
    def start(self, registry: CollectorRegistry, hooks: AlertHooks = AlertHooks(),
              thread: bool = True) -> None:
        """Start evaluating the samples of `registry` (where the service's own families go
        too); thread=False leaves the ticks to the caller (bench/ drives tick() with a
        simulated clock)."""
        self.registry, self.hooks = registry, hooks
        self._create_families(registry)
        am = self.config.alerts.alertmanager
        self.evaluator = Evaluator(self.rules, self.history, self.interval,
                                   resend_interval=am.resend_interval_seconds,
                                   on_error=self._rule_failed)
        self._publish_states()  # every rule at 0 before the first tick
        if self.generator_url is None:
            port = hooks.metrics_port if hooks.metrics_port is not None \
                else self.config.metrics.port
            self.generator_url = f"http://{self.config.metrics.host}:{port}"
        self.generator_url = self.generator_url.rstrip("/") + "/alerts"
        if am.urls:
            port = hooks.metrics_port if hooks.metrics_port is not None \
                else self.config.metrics.port
            self.client = AlertmanagerClient(am, SendCounters(
                sent=lambda url, n: self.sent.labels(url).inc(n),
                failed=lambda url, n: self.failed.labels(url).inc(n),
                dropped=lambda url, n: self.dropped.labels(url).inc(n)),
                replica_labels=self.config.alerts.replica_labels(port))
            for url in am.urls:
                for family in (self.sent, self.failed, self.dropped, self.queue_length):
                    family.labels(url)
            self.client.start()
        hooks.on_engine_death(self.request_tick)
        hooks.add_route("/alerts", self.alerts_json, "alert rules and their current states (JSON)")
        if thread:
            self._thread = threading.Thread(target=self._run, name="alert-evaluator",
                                            daemon=True)
            self._thread.start()
        log.info("evaluating %d alert rules every %gs; Alertmanager: %s", len(self.rules),
                 self.interval, ", ".join(am.urls) or "none")

    def stop(self) -> None:
        self._stop.set()
        self._tick_now.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.client is not None:
            self.client.stop(flush_seconds=1.0)

    def _create_families(self, registry: CollectorRegistry) -> None:
        made = {spec.name: create_client(spec, registry)
                for spec in ALERT_FAMILIES if spec.name not in PUBLISHED}
        # The rule and alert states change once per tick: rendered once per tick, not per
        # scrape (their 70-odd series were a third of the metrics port's render).
        self.states = PublishedFamilies()
        registry.register(self.states)
        self.hooks.add_renderer(self.states)
        self.evaluations = made["vllm_exporter_alert_evaluations_total"]
        self.evaluation_seconds = made["vllm_exporter_alert_evaluation_seconds_total"]
        self.rule_failures = made["vllm_exporter_alert_evaluation_failures_total"]
        self.history_series = made["vllm_exporter_alert_history_series"]
        self.history_samples = made["vllm_exporter_alert_history_samples"]
        self.sent = made["vllm_exporter_alert_notifications_sent_total"]
        self.failed = made["vllm_exporter_alert_notifications_failed_total"]
        self.dropped = made["vllm_exporter_alert_notifications_dropped_total"]
        self.queue_length = made["vllm_exporter_alert_queue_length"]

    # --- the loop --------------------------------------------------------------------------
    def _run(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            try:
                self.tick(time.time())
            except Exception:
                log.exception("alert evaluation tick failed")
                self.hooks.count_error()
            next_tick += self.interval
            delay = next_tick - time.monotonic()
            if delay < 0:  # fell behind (a slow tick): skip, do not burst
                next_tick, delay = time.monotonic(), 0
            self._tick_now.wait(delay)
            self._tick_now.clear()

    def request_tick(self) -> None:
        """Evaluate now rather than at the next interval (safe from any thread)."""
        self._tick_now.set()

    def deliver_now(self, timeout: float) -> bool:
        """Evaluate with the registry as it is now and wait up to `timeout` s until every
        resulting notification has reached every Alertmanager. The daemon calls this when the
        engine died, before it exits: a `for: 0s` rule on vllm_engine_state{state="dead"}
        then reaches Alertmanager although the process is about to go. True if delivered."""
        deadline = time.monotonic() + timeout
        asked_at = time.time()
        self.request_tick()
        while self._last_tick_at < asked_at:
            if time.monotonic() >= deadline or self._thread is None or \
                    not self._thread.is_alive():
                return False
            time.sleep(0.02)
        if self.client is None:
            return True
        return self.client.wait_until_delivered(max(0.0, deadline - time.monotonic()))

    def tick(self, now: float) -> None:
        started = time.perf_counter()
        self.history.add_registry(now, self.registry)
        with self._lock:
            self.evaluator.evaluate(now)
            due = self.evaluator.due_notifications(now, self.generator_url)
            self._publish_states()
        if self.client is not None:
            self.client.enqueue(due)
            for url in self.client.queues:
                self.queue_length.labels(url).set(self.client.queue_length(url))
        self.history_series.set(self.history.series_count())
        self.history_samples.set(self.history.sample_count())
        self.evaluations.inc()
        self.evaluation_seconds.inc(time.perf_counter() - started)
        self._last_tick_at = now

    def _publish_states(self) -> None:
        rule_state, alerts = (metric_family(spec) for spec in (RULE_STATE_SPEC, ALERTS_SPEC))
        for state in self.evaluator.rules:
            rule = state.rule
            rule_state.add_metric([rule.alert, rule.severity], STATE_VALUE[state.state()])
            for name in (PENDING, FIRING):
                count = sum(1 for a in state.alerts.values() if a.state == name)
                alerts.add_metric([rule.alert, name], count)
        self.states.publish([rule_state, alerts])

    def _rule_failed(self, rule: Rule, exc: Exception) -> None:
        self.rule_failures.labels(rule.alert).inc()
        self.hooks.count_error()

    # --- JSON ------------------------------------------------------------------------------
    def alerts_json(self) -> tuple[int, str, bytes]:
        with self._lock:
            rules = self.evaluator.snapshot() if self.evaluator else []
            last = self.evaluator.last_eval if self.evaluator else None
        body = {
            "evaluation_interval_seconds": self.interval,
            "last_evaluation": last,
            "rules": rules,
            "alertmanagers": [
                {"url": url, "queue_length": self.client.queue_length(url)}
                for url in (self.client.queues if self.client else [])],
        }
        return 200, "application/json", json.dumps(body, indent=1).encode()
