"""Benchmark: alert detection latency (in-daemon vs Prometheus) and evaluator CPU per tick.

Two parts:
1. `cpu`: the default rule pack evaluated over a registry shaped like a busy daemon's (2
   engines, every engine family populated, histograms filled), fed and evaluated tick after
   tick with a fake clock; reports CPU time per tick (sampling the registry + evaluating).
   No engine needed.
2. `detection`: against a running daemon whose rule file holds the e2e rule
   (tests/alerting_fixtures.E2E_RULE: median queue time over 15 s > 0.25 s, for 1s) and which
   notifies an Alertmanager that posts to a webhook, with a Prometheus loading the same rules
   exported as PromQL (scrape and evaluation every 5 s in the tests, 15 s standalone):
   saturate the engine and time, from the load's start, the first firing notification of each
   path at the webhook. `measure_detection()` is what tests/test_alerts_e2e.py runs on the
   shared test daemon; run standalone, this script starts its own daemon, Alertmanager and
   Prometheus with the test fixtures' helpers.

    python bench/bench_alert_detection.py cpu [--ticks 500]
    python bench/bench_alert_detection.py detection   # starts an engine: ~1-3 min on 2 cores
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


# --- evaluator CPU per tick --------------------------------------------------------------------

def busy_registry():
    """Our registry with every engine family populated for two engines."""
    from prometheus_client import CollectorRegistry

    from exporter.metrics import EngineMetrics

    registry = CollectorRegistry()
    metrics = EngineMetrics(registry)
    children = []
    for engine in ("0", "1"):
        labels = ("model", engine)
        for reason in ("stop", "length", "abort", "error"):
            metrics.requests_finished.labels(*labels, reason)
        for objective in ("ttft", "tpot"):
            for result in ("good", "bad"):
                metrics.slo_requests.labels(*labels, objective, result)
        children.append(labels)
    metrics.engine_up.labels("model").set(1)
    metrics.frontend_requests_unfinished.labels("model").set(3)
    return registry, metrics, children


def advance(metrics, children, t: float, rnd: random.Random) -> None:
    """One tick's worth of activity on every family the default pack reads."""
    for labels in children:
        metrics.requests_running.labels(*labels).set(rnd.randint(0, 32))
        metrics.requests_waiting.labels(*labels).set(rnd.randint(0, 5))
        metrics.kv_cache_usage_ratio.labels(*labels).set(rnd.random())
        metrics.engine_last_step_timestamp_seconds.labels(*labels).set(t)
        metrics.engine_steps.labels(*labels).inc(20)
        metrics.preemptions.labels(*labels).inc(rnd.randint(0, 1))
        for _ in range(5):
            metrics.time_to_first_token_seconds.labels(*labels).observe(rnd.expovariate(5))
            metrics.request_queue_time_seconds.labels(*labels).observe(rnd.expovariate(20))
            metrics.time_per_output_token_seconds.labels(*labels).observe(rnd.uniform(0.01, 0.03))
            metrics.requests_finished.labels(*labels, "stop").inc()
            metrics.slo_requests.labels(*labels, "ttft", "good").inc()
            metrics.slo_requests.labels(*labels, "tpot", "good").inc()
        for _ in range(50):
            metrics.inter_token_latency_seconds.labels(*labels).observe(rnd.uniform(0.005, 0.05))


def measure_cpu(ticks: int, interval: float = 2.0) -> dict:
    """CPU seconds per tick (registry read + all default rules), at steady state."""
    from exporter.alerts.evaluator import Evaluator
    from exporter.alerts.service import history_for, load_rules
    from exporter.config import load_config

    config = load_config(None)
    config.alerts.evaluation_interval_seconds = interval
    rules = load_rules(config)
    history = history_for(rules, config)
    evaluator = Evaluator(rules, history, interval)
    registry, metrics, children = busy_registry()
    rnd = random.Random(0)
    # warm-up: one hour of history so that every window holds data
    t0 = 1_700_000_000.0
    warm = int(3600 / interval)
    for i in range(warm):
        t = t0 + i * interval
        advance(metrics, children, t, rnd)
        history.add_registry(t, registry)
        evaluator.evaluate(t)
    costs = []
    for i in range(warm, warm + ticks):
        t = t0 + i * interval
        advance(metrics, children, t, rnd)
        started = time.process_time()
        history.add_registry(t, registry)
        evaluator.evaluate(t)
        evaluator.due_notifications(t, "http://bench/alerts")
        costs.append(time.process_time() - started)
    costs.sort()
    return {"rules": len(rules), "series": history.series_count(), "ticks": ticks,
            "interval_s": interval,
            "mean_ms": 1000 * statistics.fmean(costs), "p50_ms": 1000 * costs[len(costs) // 2],
            "p99_ms": 1000 * costs[int(len(costs) * 0.99)],
            "cpu_share_pct": 100 * statistics.fmean(costs) / interval}


# --- detection latency -------------------------------------------------------------------------

def measure_detection(daemon, alerting, tmp: Path, prometheus_interval: str = "5s",
                      timeout: float = 120) -> dict:
    """Saturate the daemon's engine; seconds from load start to each path's first firing.

    Prometheus scrapes and evaluates every `prometheus_interval` (production setups use
    15 s to 1 m); the daemon evaluates every alerts.evaluation_interval_seconds.
    """
    import json

    from alerting_fixtures import E2E_ALERT, PROMETHEUS, Saturation, make_prometheus
    from helpers import http_get, wait_for

    prom = None
    if PROMETHEUS:
        prom = make_prometheus(tmp, f"127.0.0.1:{daemon.metrics_port}", alerting.alertmanager.url,
                               alerting.prometheus_rules_file,
                               interval=prometheus_interval).start()
    webhook = alerting.webhook
    first_payload = len(webhook.payloads)

    def first(path: str, status: str = "firing", after: float = 0.0) -> float | None:
        """Arrival time of the first new notification of one path (Prometheus adds job)."""
        for payload, at in list(zip(webhook.payloads, webhook.arrivals))[first_payload:]:
            if at < after:
                continue
            for alert in payload.get("alerts", []):
                if alert["labels"].get("alertname") != E2E_ALERT or alert["status"] != status:
                    continue
                if ("job" in alert["labels"]) == (path == "prometheus"):
                    return at
        return None

    try:
        if prom is not None:  # let Prometheus scrape twice before the degradation
            time.sleep(2 * float(prometheus_interval.rstrip("s")) + 1)
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

        def last(path: str) -> tuple[str | None, float]:
            """(status, arrival) of the newest notification of one path."""
            newest: tuple[str | None, float] = (None, 0.0)
            for payload, at in list(zip(webhook.payloads, webhook.arrivals))[first_payload:]:
                for alert in payload.get("alerts", []):
                    if alert["labels"].get("alertname") == E2E_ALERT and \
                            ("job" in alert["labels"]) == (path == "prometheus"):
                        newest = (alert["status"], at)
            return newest

        def notifications(since: float) -> list:
            out = []
            for payload, at in list(zip(webhook.payloads, webhook.arrivals))[first_payload:]:
                for alert in payload.get("alerts", []):
                    if alert["labels"].get("alertname") == E2E_ALERT:
                        path = "prometheus" if "job" in alert["labels"] else "daemon"
                        out.append((round(at - since, 2), path, alert["status"]))
            return out

        def diagnosis() -> str:
            status, body, _ = http_get(f"http://127.0.0.1:{daemon.metrics_port}/alerts")
            rules = [r for r in json.loads(body)["rules"] if r["alert"] == E2E_ALERT]
            return (f"seen {seen}, load errors {load.errors[:3]}, finished {load.finished}, "
                    f"daemon path {first('daemon')}, prometheus path {first('prometheus')}, "
                    f"webhook payloads {len(webhook.payloads) - first_payload}, rule {rules}, "
                    f"timeline (s, unfinished, evaluations, state) {timeline[::10]}")

        started = time.time()
        load.start()
        try:
            try:
                wait_for(fired, timeout, interval=0.05, what="firing notifications")
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {diagnosis()}") from None
        finally:
            stopped = time.time()
            load.stop()
        # resolved: the path's latest notification says so (the alert may also have flapped
        # during the load; a resolution before the stop counts as 0 s)
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
                  "daemon_resolved_s": max(0.0, last("daemon")[1] - stopped),
                  "load_errors": len(load.errors), "requests_finished": load.finished,
                  **seen, "notifications": notifications(stopped)}
        if prom is not None:
            result["prometheus_s"] = first("prometheus") - started
            status, at = last("prometheus")
            result["prometheus_resolved_s"] = (max(0.0, at - stopped) if status == "resolved"
                                               else None)
        return result
    finally:
        if prom is not None:
            prom.stop()


def run_detection_standalone() -> dict:
    import tempfile

    import conftest  # the test suite's daemon helpers
    from alerting_fixtures import (ALERTMANAGER, E2E_RULE, WebhookReceiver, make_alertmanager,
                                   SessionAlerting)
    from exporter.alerts.defaults import default_rule_file
    from exporter.alerts.promql import prometheus_rule_file, to_yaml
    from exporter.alerts.rules import parse_rules
    from exporter.slo import SloConfig
    from helpers import free_port
    import yaml

    tmp = Path(tempfile.mkdtemp(prefix="bench-alerts-"))
    raw = default_rule_file()
    raw["rules"].append(E2E_RULE)
    (tmp / "rules.yml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (tmp / "rules.prom.yml").write_text(
        to_yaml(prometheus_rule_file(parse_rules(raw, SloConfig(), "bench"))))
    webhook = WebhookReceiver()
    am = make_alertmanager(tmp, webhook.url).start() if ALERTMANAGER else None
    alerting = SessionAlerting(webhook, am, tmp / "rules.yml", tmp / "rules.prom.yml")
    api_port, metrics_port = free_port(), free_port()
    daemon = conftest.start_daemon(tmp, conftest.daemon_config(
        api_port, metrics_port, alerts=alerting.daemon_section()))
    try:
        return measure_detection(daemon, alerting, tmp, prometheus_interval="15s")
    finally:
        conftest.stop_process_group(daemon.process)
        if am is not None:
            am.stop()
        webhook.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["cpu", "detection", "all"], nargs="?", default="all")
    parser.add_argument("--ticks", type=int, default=500)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
          f"python {platform.python_version()}")
    if args.part in ("cpu", "all"):
        r = measure_cpu(args.ticks)
        print(f"evaluator: {r['rules']} rules, {r['series']} history series, "
              f"{r['ticks']} ticks every {r['interval_s']:g}s: CPU per tick mean "
              f"{r['mean_ms']:.2f} ms, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms "
              f"({r['cpu_share_pct']:.3f} % of one core)")
    if args.part in ("detection", "all"):
        r = run_detection_standalone()
        print("detection latency, load start -> firing at the webhook: in-daemon "
              f"{r['daemon_s']:.2f} s, Prometheus {r.get('prometheus_s', float('nan')):.2f} s; "
              f"load stop -> resolved: in-daemon {r['daemon_resolved_s']:.2f} s, Prometheus "
              f"{r.get('prometheus_resolved_s') or float('nan'):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
