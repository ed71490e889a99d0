"""Render cost of one /metrics response in the metrics process, side by side with
prometheus-client's encoders on the same registry.

The registry is the default series set of a serving daemon: one model, the alert rules loaded and
evaluated, every engine family fed by a scripted stream of 300 engine steps (first tokens,
inter-token gaps, a finished request per step), written by `--frontends` shards as API-server
processes would (GPU families are left out: no GPU here). Prints milliseconds per render for
both formats (target: <= 1 ms) and the size of the exposition.

    .venv/bin/python -m bench.bench_render [--frontends 1 2 4] [--renders 300]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from types import SimpleNamespace as NS

from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from exporter.alerts.service import AlertingService, load_rules
from exporter.config import load_config
from exporter.frontend import Frontend
from exporter.runtime import Runtime

FORMATS = (("text 0.0.4", "text/plain", generate_latest),
           ("OpenMetrics", "application/openmetrics-text; version=1.0.0", openmetrics_latest))


def feed(frontend: Frontend, steps: int) -> None:
    recorder = frontend.attach_stat_logger("m", [0])
    recorder.set_capacity({"blocks": 2048, "block_size": 16, "bytes_per_token": 131072.0})
    frontend.set_engine_state("serving")
    for i in range(steps):
        finished = NS(finish_reason="stop", e2e_latency=i * 0.1, num_prompt_tokens=i,
                      num_generation_tokens=i % 20 + 2, queued_time=0.01, prefill_time=0.02,
                      decode_time=0.3, inference_time=0.4, mean_time_per_output_token=0.01)
        iteration = NS(num_prompt_tokens=3, num_generation_tokens=3, num_preempted_reqs=0,
                       time_to_first_tokens_iter=[0.01 * (i % 30)],
                       inter_token_latencies_iter=[0.001 * (i % 50)] * 5,
                       finished_requests=[finished])
        recorder.record(NS(num_running_reqs=3, num_waiting_reqs=1, kv_cache_usage=0.2,
                           prefix_cache_stats=None), iteration)


def measure(frontends: int, renders: int) -> list[tuple[str, float, float, int]]:
    directory = tempfile.mkdtemp(prefix="bench-render-")
    config = load_config(None, {"gpu.enabled": False, "metrics.port": 0})
    writers = [Frontend(config, directory, role=f"frontend{i}") for i in range(frontends)]
    for frontend in writers:
        feed(frontend, 300)
    rt = Runtime(config, mode="plugin", shard_dir=directory, role="metrics")
    service = AlertingService(config, load_rules(config))
    rows = []
    try:
        rt.bind_metrics_port()
        service.start(rt.registry, rt.alert_hooks(), thread=False)
        service.tick(time.time())
        for name, accept, encoder in FORMATS:
            ours, theirs = [], []
            for _ in range(renders):  # interleaved: both see the same machine noise
                started = time.perf_counter()
                _, body, _ = rt.server.render_metrics(accept, None)
                ours.append(time.perf_counter() - started)
                started = time.perf_counter()
                encoder(rt.registry)
                theirs.append(time.perf_counter() - started)
            rows.append((name, statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3,
                         len(body), body.count(b"\n")))
    finally:
        rt.stop()
        for frontend in writers:
            frontend.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frontends", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--renders", type=int, default=300)
    args = parser.parse_args()
    print(f"{'front ends':>10}  {'format':<12}{'ours ms':>9}{'encoder ms':>12}{'ratio':>7}"
          f"{'bytes':>8}{'lines':>7}")
    for frontends in args.frontends:
        for name, ours, theirs, size, lines in measure(frontends, args.renders):
            print(f"{frontends:>10}  {name:<12}{ours:>9.3f}{theirs:>12.3f}{ours / theirs:>7.2f}"
                  f"{size:>8}{lines:>7}")
    print("target: ours <= 1 ms per render for the default series set")


if __name__ == "__main__":
    main()
