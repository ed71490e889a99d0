"""Soak in simulated time: hours of a serving daemon's metrics work in a minute or two.

`bench_soak.py` runs the real daemon in wall time; the alert history's fine window (65 min by
default) takes over an hour to fill, so a plateau needs hours of wall time. This script drives
the same code in one process on a simulated clock: two front ends (as `--api-server-count 2`)
record a stream of engine steps into their shards through the stat logger's recorder (finished
requests of every finish reason, first tokens, inter-token gaps, preemptions, client aborts);
the metrics side merges the shards, the alert service evaluates every default rule and keeps its
history at `alerts.evaluation_interval_seconds` steps of the simulated clock, and a scrape
renders /metrics every `--scrape-seconds` simulated seconds. Nothing waits: each simulated
evaluation interval costs only the work it causes.

Every `--sample-minutes` of simulated time it prints this process's resident memory, the live
Python objects, the alert history's series and samples, and the series in the exposition; then
the growth per simulated hour over the last `--plateau-minutes`, with the maxima of that stretch
and of the one before it. What must hold: the history
grows until it reaches back as far as the longest rule window (every evaluation for
`alerts.fine_history_seconds`, then one per `alerts.coarse_step_seconds`: about 6 h with the
default SLO rules) and then stays flat, the series count is flat from the
start, and memory and objects level off with it.

    .venv/bin/python -m bench.bench_soak_simulated [--hours 10] [--steps-per-tick 100]
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np

from exporter.alerts.service import AlertingService, load_rules
from exporter.config import load_config
from exporter.frontend import Frontend
from exporter.runtime import Runtime

MIB = 1024 * 1024
FINISH_REASONS = ("stop", "length", "abort", "error")


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def engine_step(rnd: random.Random) -> tuple[NS, NS]:
    """One engine step's (SchedulerStats, IterationStats) as vLLM's stat logger receives them."""
    finished = [NS(finish_reason=rnd.choice(FINISH_REASONS[:2]) if rnd.random() > 0.02
                   else rnd.choice(FINISH_REASONS[2:]),
                   e2e_latency=rnd.uniform(0.05, 30), num_prompt_tokens=rnd.randint(1, 4000),
                   num_generation_tokens=rnd.randint(1, 1000), queued_time=rnd.uniform(0, 2),
                   prefill_time=rnd.uniform(0.001, 1), decode_time=rnd.uniform(0.01, 20),
                   inference_time=rnd.uniform(0.01, 20),
                   mean_time_per_output_token=rnd.uniform(0.005, 0.1))
                for _ in range(rnd.choice((0, 0, 1, 2)))]
    running = rnd.randint(0, 64)
    scheduler = NS(num_running_reqs=running, num_waiting_reqs=rnd.randint(0, 8),
                   kv_cache_usage=rnd.random(), prefix_cache_stats=None)
    iteration = NS(num_prompt_tokens=rnd.randint(0, 2048), num_generation_tokens=running,
                   num_preempted_reqs=int(rnd.random() < 0.01),
                   time_to_first_tokens_iter=[rnd.uniform(0.01, 3) for _ in finished],
                   inter_token_latencies_iter=[rnd.uniform(0.005, 0.2) for _ in range(running)],
                   finished_requests=finished)
    return scheduler, iteration


def slope_per_hour(points: list[dict], key: str, since_minutes: float) -> float:
    tail = [p for p in points if p["minutes"] >= since_minutes]
    if len(tail) < 2:
        return float("nan")
    t = np.array([p["minutes"] for p in tail]) / 60
    return float(np.polyfit(t, np.array([p[key] for p in tail], dtype=float), 1)[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=10.0, help="simulated hours")
    parser.add_argument("--steps-per-tick", type=int, default=100,
                        help="engine steps recorded per front end per evaluation interval")
    parser.add_argument("--scrape-seconds", type=float, default=15.0)
    parser.add_argument("--sample-minutes", type=float, default=10.0)
    parser.add_argument("--plateau-minutes", type=float, default=120.0,
                        help="growth is fitted over this last stretch of simulated time and "
                             "its maxima compared with the stretch before it")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rnd = random.Random(args.seed)
    directory = tempfile.mkdtemp(prefix="bench-soak-simulated-")
    config = load_config(None, {"gpu.enabled": False, "metrics.port": 0})
    frontends = [Frontend(config, directory, role=f"frontend{i}") for i in range(2)]
    recorders = []
    for frontend in frontends:
        recorder = frontend.attach_stat_logger("soak-model", [0])
        recorder.set_capacity({"blocks": 4096, "block_size": 16, "bytes_per_token": 131072.0})
        frontend.set_engine_state("serving")
        recorders.append(recorder)
    rt = Runtime(config, mode="plugin", shard_dir=directory, role="metrics")
    service = AlertingService(config, load_rules(config))
    rt.bind_metrics_port()
    service.start(rt.registry, rt.alert_hooks(), thread=False)
    interval = config.alerts.evaluation_interval_seconds
    fine_minutes = service.history.tiers[0].span_ms / 60000
    reach_minutes = max(tier.span_ms for tier in service.history.tiers) / 60000

    ticks = int(args.hours * 3600 / interval)
    scrape_every = max(1, round(args.scrape_seconds / interval))
    sample_every = max(1, round(args.sample_minutes * 60 / interval))
    start = time.time()
    began = time.perf_counter()
    points: list[dict] = []
    print(f"{'sim. min':>8}{'RSS MiB':>9}{'objects':>9}{'hist. series':>13}"
          f"{'hist. samples':>14}{'series':>8}{'wall s':>8}", flush=True)
    try:
        for tick in range(1, ticks + 1):
            for recorder in recorders:
                for _ in range(args.steps_per_tick):
                    recorder.record(*engine_step(rnd))
            if rnd.random() < 0.05:
                rnd.choice(frontends).count_client_aborts(1)
            now = start + tick * interval
            service.tick(now)
            if tick % scrape_every == 0:
                _, body, _ = rt.server.render_metrics("text/plain", None)
            if tick % sample_every == 0:
                rt.check_idle()
                gc.collect()
                point = {"minutes": tick * interval / 60, "rss": rss_bytes(),
                         "objects": len(gc.get_objects()),
                         "history_series": service.history.series_count(),
                         "history_samples": service.history.sample_count(),
                         "series": sum(1 for line in body.splitlines()
                                       if line and not line.startswith(b"#"))}
                points.append(point)
                print(f"{point['minutes']:>8.0f}{point['rss'] / MIB:>9.1f}{point['objects']:>9}"
                      f"{point['history_series']:>13}{point['history_samples']:>14}"
                      f"{point['series']:>8}{time.perf_counter() - began:>8.1f}", flush=True)
    finally:
        rt.stop()
        for frontend in frontends:
            frontend.stop()

    since = args.hours * 60 - args.plateau_minutes
    print(f"\n{args.hours:g} simulated hours in {time.perf_counter() - began:.0f} s of wall "
          f"time; {ticks} evaluations, {2 * args.steps_per_tick * ticks} engine steps recorded; "
          f"the alert history keeps every evaluation for {fine_minutes:g} min and one in "
          f"{config.alerts.coarse_step_seconds:g} s for {reach_minutes:g} min")
    print(f"growth per simulated hour over the last {args.plateau_minutes:g} min "
          f"(from minute {since:g}):")
    earlier = [p for p in points if since - args.plateau_minutes <= p["minutes"] < since]
    later = [p for p in points if p["minutes"] >= since]
    print(f"  {'':<20}{'slope/h':>12}{'max before':>14}{'max in it':>14}   (the history is "
          f"trimmed in steps: compare the maxima of two equal stretches)")
    for key, label, unit in (("rss", "RSS MiB", MIB), ("objects", "Python objects", 1),
                             ("history_series", "history series", 1),
                             ("history_samples", "history samples", 1),
                             ("series", "series in /metrics", 1)):
        before = max((p[key] for p in earlier), default=float("nan")) / unit
        after = max(p[key] for p in later) / unit
        print(f"  {label:<20}{slope_per_hour(points, key, since) / unit:>+12.2f}"
              f"{before:>14.1f}{after:>14.1f}")
    if since < reach_minutes:
        print(f"note: the fitted stretch begins before the history is full "
              f"({reach_minutes:g} min); use --hours {reach_minutes / 60 + 1.5:.1f} or more")
    return 0


if __name__ == "__main__":
    sys.exit(main())
