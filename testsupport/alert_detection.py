"""How long a real degradation takes to reach Alertmanager's webhook by each alerting path:
the daemon's own evaluator, and Prometheus evaluating the same rules exported as PromQL.
tests/test_alerts_e2e.py runs it on the shared test daemon; bench/bench_alert_detection.py
runs it standalone on a daemon of its own."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .alerting import E2E_ALERT, Alerting
from .daemon import Daemon
from .load import Saturation
from .net import http_get
from .prometheus import PROMETHEUS, make_prometheus, scrape_job
from .waiting import wait_for

JOB = "vllm-exporter"


def measure_detection(daemon: Daemon, alerting: Alerting, directory: Path,
                      prometheus_interval: str = "5s", timeout: float = 120) -> dict:
    """Saturate the daemon's engine; seconds from load start to each path's first firing
    notification, and from load stop to each path's resolution.

    Prometheus scrapes and evaluates every `prometheus_interval` (production setups use
    15 s to 1 m); the daemon evaluates every alerts.evaluation_interval_seconds. Without the
    prometheus binary (or without an Alertmanager) only the daemon's path is measured.
    """
    prom = None
    if PROMETHEUS and alerting.alertmanager is not None:
        prom = make_prometheus(directory / "prometheus",
                               [scrape_job(JOB, [f"127.0.0.1:{daemon.metrics_port}"])],
                               [alerting.prometheus_rules_file], alerting.alertmanager.url,
                               interval=prometheus_interval).start()
    webhook = alerting.webhook
    first_payload = len(webhook.received())

    def new_alerts() -> list[tuple[float, str, dict]]:
        """(arrival, path, alert) of the e2e alert in notifications since the measure began
        (Prometheus adds a job label)."""
        return [(at, "prometheus" if "job" in alert["labels"] else "daemon", alert)
                for at, payload in webhook.received()[first_payload:]
                for alert in payload.get("alerts", [])
                if alert["labels"].get("alertname") == E2E_ALERT]

    def first(path: str, status: str = "firing") -> float | None:
        """Arrival time of the first new notification of one path."""
        return next((at for at, p, alert in new_alerts()
                     if p == path and alert["status"] == status), None)

    def last(path: str) -> tuple[str | None, float]:
        """(status, arrival) of the newest notification of one path."""
        newest: tuple[str | None, float] = (None, 0.0)
        for at, p, alert in new_alerts():
            if p == path:
                newest = (alert["status"], at)
        return newest

    def notifications(since: float) -> list:
        return [(round(at - since, 2), path, alert["status"])
                for at, path, alert in new_alerts()]

    try:
        if prom is not None:  # Prometheus has scraped twice before the degradation
            seconds = float(prometheus_interval.rstrip("s"))
            wait_for(lambda: prom.query(f'count_over_time(up{{job="{JOB}"}}[1h]) >= 2'),
                     4 * seconds + 30, 0.5, "two scrapes by Prometheus")
        load = Saturation(daemon.api_url, daemon.model)
        seen = {"max_unfinished": 0.0, "max_running": 0.0}
        timeline = []

        def fired() -> bool:
            samples = daemon.scrape()
            waiting = samples.get("vllm_frontend_requests_unfinished")
            seen["max_unfinished"] = max(seen["max_unfinished"], waiting)
            seen["max_running"] = max(seen["max_running"], samples.get("vllm_requests_running"))
            timeline.append((round(time.time() - started, 2), waiting,
                             samples.get("vllm_exporter_alert_evaluations_total"),
                             samples.get("vllm_exporter_alert_rule_state", alertname=E2E_ALERT)))
            return bool(first("daemon") and (prom is None or first("prometheus")))

        def diagnosis() -> str:
            status, body, _ = http_get(f"http://127.0.0.1:{daemon.metrics_port}/alerts")
            rules = [r for r in json.loads(body)["rules"] if r["alert"] == E2E_ALERT]
            return (f"seen {seen}, load errors {load.errors[:3]}, finished {load.finished}, "
                    f"daemon path {first('daemon')}, prometheus path {first('prometheus')}, "
                    f"webhook payloads {len(webhook.received()) - first_payload}, "
                    f"rule {rules}, timeline (s, unfinished, evaluations, state) "
                    f"{timeline[::10]}")

        started = time.time()
        load.start()
        try:
            try:
                wait_for(fired, timeout, interval=0.05, what="firing notifications")
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {diagnosis()}") from None
        finally:
            stopped = time.time()
            load.stop()  # lets the requests in flight finish
            drained = time.time()
        # resolved: the path's latest notification says so (the alert may also have flapped
        # during the load; a resolution before the load drained counts as 0 s)
        try:
            wait_for(lambda: last("daemon")[0] == "resolved", timeout, interval=0.05,
                     what="the in-daemon resolved notification")
            if prom is not None:  # reported, not required (the tests check the daemon's)
                try:
                    wait_for(lambda: last("prometheus")[0] == "resolved", 30, interval=0.05,
                             what="Prometheus's resolved notification")
                except AssertionError:
                    pass
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {diagnosis()}; notifications (s after load stop, "
                                 f"path, status): {notifications(stopped)}") from None
        result = {"prometheus_interval": prometheus_interval,
                  "daemon_interval_s": alerting.evaluation_interval,
                  "daemon_s": first("daemon") - started,
                  "daemon_resolved_s": max(0.0, last("daemon")[1] - drained),
                  "drain_s": drained - stopped,
                  "load_errors": len(load.errors), "requests_finished": load.finished,
                  **seen, "notifications": notifications(stopped)}
        if prom is not None:
            result["prometheus_s"] = first("prometheus") - started
            status, at = last("prometheus")
            result["prometheus_resolved_s"] = (max(0.0, at - drained) if status == "resolved"
                                               else None)
        return result
    finally:
        if prom is not None:
            prom.stop()
