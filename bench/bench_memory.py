"""Does anything of ours keep memory per engine step, per scrape or per alert tick?

In one process, without an engine: our stat logger is fed vLLM's own statistics objects (a
finished request per step), the registry is scraped every 10 steps, and the alert evaluator with
the default rule pack ticks every 2 s of a simulated clock over that registry. Python's own
allocation tracer (tracemalloc) measures what is still held after each phase: phase 1 fills the
alert history's windows (6.5 h simulated: the 65 min fine tier and the 6 h coarse tier), phase 2
runs as long again. Printed: memory held after each phase and the growth in phase 2, which
must be about zero.

    .venv/bin/python -m bench.bench_memory [--hours 6.5] [--steps-per-tick 10] [--without-alerts]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc

from prometheus_client import generate_latest
from vllm.v1.metrics.stats import FinishedRequestStats, IterationStats, SchedulerStats

from exporter.alerts.service import AlertingService, load_rules
from exporter.config import load_config
from exporter.runtime import Runtime
from exporter.vllm_compat import finish_reason_name

TICK_SECONDS = 2.0


def step(i: int) -> tuple[SchedulerStats, IterationStats]:
    scheduler = SchedulerStats(num_running_reqs=3 + i % 5, num_waiting_reqs=i % 3,
                               kv_cache_usage=0.2)
    it = IterationStats()
    it.num_generation_tokens = 3
    it.prompt_token_stats.total = 5
    it.time_to_first_tokens_iter = [0.05 + (i % 7) * 0.01]
    it.inter_token_latencies_iter = [0.01, 0.02]
    it.finished_requests = [FinishedRequestStats(
        finish_reason="stop", e2e_latency=0.5, num_prompt_tokens=5, num_generation_tokens=20,
        queued_time=0.01, prefill_time=0.02, decode_time=0.1, inference_time=0.12,
        mean_time_per_output_token=0.005)]
    return scheduler, it


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=6.5, help="simulated time per phase")
    parser.add_argument("--steps-per-tick", type=int, default=10)
    parser.add_argument("--without-alerts", action="store_true",
                        help="the stat logger and the scrapes only (fast)")
    args = parser.parse_args()

    config = load_config(None, {"gpu.enabled": False})
    rt = Runtime(config, mode="daemon")
    rt.attach_stat_logger("m", [0], finish_reason_name)
    alerts = AlertingService(config, load_rules(config))
    alerts.start(rt.registry, rt.alert_hooks(), thread=False)
    clock = time.time()
    steps = 0

    def phase() -> tuple[int, float]:
        nonlocal clock, steps
        started = time.perf_counter()
        for _ in range(int(args.hours * 3600 / TICK_SECONDS)):
            for _ in range(args.steps_per_tick):
                rt.recorder.record(*step(steps), engine_idx=0)
                steps += 1
            generate_latest(rt.registry)
            clock += TICK_SECONDS
            if not args.without_alerts:
                alerts.tick(clock)
        gc.collect()
        return tracemalloc.get_traced_memory()[0], time.perf_counter() - started

    tracemalloc.start()
    held_1, took_1 = phase()
    samples_1 = alerts.history.sample_count()
    held_2, took_2 = phase()
    samples_2 = alerts.history.sample_count()
    ticks = int(args.hours * 3600 / TICK_SECONDS)
    print(f"each phase: {args.hours:g} h simulated, {ticks} ticks of {TICK_SECONDS:g} s "
          f"({'no alert evaluation' if args.without_alerts else 'alert rules evaluated'}), "
          f"{ticks * args.steps_per_tick} engine steps, {ticks} scrapes")
    print(f"after phase 1: {held_1 / 1024:9.0f} KiB held, {samples_1} history samples "
          f"({took_1:.0f} s)")
    print(f"after phase 2: {held_2 / 1024:9.0f} KiB held, {samples_2} history samples "
          f"({took_2:.0f} s)")
    print(f"growth in phase 2: {(held_2 - held_1) / 1024:+.0f} KiB "
          f"({(held_2 - held_1) / (ticks * args.steps_per_tick):+.3f} bytes per engine step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
