"""Benchmark: alert detection latency (in-daemon vs Prometheus) and evaluator CPU per tick.

Two parts:
1. `cpu`: the default rule pack evaluated over a registry shaped like a busy daemon's (2
   engines, every engine family populated, histograms filled), fed and evaluated tick after
   tick with a fake clock; reports CPU time per tick (sampling the registry + evaluating).
   No engine needed.
2. `detection`: a daemon whose rule file holds the e2e rule (testsupport.alerting.E2E_RULE:
   median queue time over 15 s > 0.25 s, for 1s) and which notifies an Alertmanager that posts
   to a webhook, with a Prometheus loading the same rules exported as PromQL (scrape and
   evaluation every 15 s here, 5 s in the tests): saturate the engine and time, from the load's
   start, the first firing notification of each path at the webhook
   (testsupport.alert_detection.measure_detection, which tests/test_alerts_e2e.py runs on the
   shared test daemon). This script starts its own daemon, Alertmanager and Prometheus.

From the repository root:

    python -m bench.bench_alert_detection cpu [--ticks 500]
    python -m bench.bench_alert_detection detection   # starts an engine: ~1-3 min on 2 cores
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path


# --- evaluator CPU per tick --------------------------------------------------------------------

def busy_registry():
    """A daemon's runtime (its own families and its front end's shard, in one registry) with
    every engine family populated for two engines."""
    from exporter.config import load_config
    from exporter.runtime import Runtime

    rt = Runtime(load_config(None, {"gpu.enabled": False}), mode="daemon")
    metrics = rt.metrics
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
    return rt, metrics, children


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
    rt, metrics, children = busy_registry()
    registry = rt.registry
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
    rt.stop()
    costs.sort()
    return {"rules": len(rules), "series": history.series_count(), "ticks": ticks,
            "interval_s": interval,
            "mean_ms": 1000 * statistics.fmean(costs), "p50_ms": 1000 * costs[len(costs) // 2],
            "p99_ms": 1000 * costs[int(len(costs) * 0.99)],
            "cpu_share_pct": 100 * statistics.fmean(costs) / interval}


# --- detection latency -------------------------------------------------------------------------

def run_detection_standalone() -> dict:
    """A daemon of its own with the e2e rule, an Alertmanager notifying a webhook, and a
    Prometheus evaluating every 15 s."""
    from testsupport.alert_detection import measure_detection
    from testsupport.alerting import start_alerting
    from testsupport.daemon import daemon_config, start_daemon
    from testsupport.net import free_port

    tmp = Path(tempfile.mkdtemp(prefix="bench-alerts-"))
    alerting = start_alerting(tmp / "alerting")
    try:
        daemon = start_daemon(tmp, daemon_config(free_port(), free_port(),
                                                 alerts=alerting.daemon_section()))
        try:
            return measure_detection(daemon, alerting, tmp, prometheus_interval="15s")
        finally:
            daemon.stop()
    finally:
        alerting.close()


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
              f"load drained ({r['drain_s']:.2f} s after its stop) -> resolved: in-daemon "
              f"{r['daemon_resolved_s']:.2f} s, Prometheus "
              f"{r.get('prometheus_resolved_s') or float('nan'):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
