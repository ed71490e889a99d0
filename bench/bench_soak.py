"""Soak: steady load for `--minutes` with a scrape every second; does the daemon's memory settle?

One daemon on the embedded default model with the default config (alert rules evaluated in the
daemon, GPU collector on). Clients keep a steady mix of completions (varied prompt and output
lengths, one stream in ten dropped mid-generation so the abort path runs too) while a scraper
GETs /metrics every second. Every `--sample` seconds the script records the resident memory of
the daemon's main process (vLLM's front end and our stat logger), of its metrics process (the
alert evaluator and its history, the /metrics render) and of vLLM's engine core process, the
number of series and bytes in the exposition, and the alert evaluator's history size.

Printed: the timeline, then start (after `--warmup`) vs end and the growth rate over the second
half, for each figure. What must hold: the series count is flat, and the memory of the main and
metrics processes levels off. The alert history grows by design until its windows are full
(every evaluation for alerts.fine_history_seconds, 65 min by default, then one per 30 s for the
longest rule window, 6 h), then stays flat; its sample count is printed so that this growth can
be told apart from a leak (`--fine-history-seconds 300` fills the fine window within the run;
bench_soak_simulated.py runs the same code over hours of simulated time in a minute or two).
`--baseline` soaks vLLM's own server without our plugin side by side, under the same load and a
scrape of its own /metrics every second, so that the growth of vLLM's front end itself is seen
in the same run.

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python -m bench.bench_soak [--minutes 20] [--baseline]
        [--fine-history-seconds 300] [--out soak.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

from bench.bench_overhead import Workers, start, stop_all
from testsupport.exposition import Samples
from testsupport.net import free_port
from testsupport.processes import descendant_pids, engine_core_pids

MIB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Load(Workers):
    """`clients` threads sending completions back to back; one in ten streams is dropped."""

    join_seconds = 120.0

    def __init__(self, api_url: str, model: str, clients: int):
        self.api_url, self.model = api_url, model
        self.done = self.failed = self.dropped = 0
        self.first_failure = ""
        self._lock = threading.Lock()
        super().__init__(clients)

    def _run(self, seed: int) -> None:
        rnd = random.Random(seed)
        with httpx.Client(timeout=180) as client:
            while not self._stop.is_set():
                words = " ".join(f"w{rnd.randrange(500)}" for _ in range(rnd.randint(4, 120)))
                body = {"model": self.model, "prompt": words, "ignore_eos": True,
                        "max_tokens": rnd.randint(8, 96)}
                try:
                    if rnd.random() < 0.1:
                        with client.stream("POST", self.api_url + "/v1/completions",
                                           json={**body, "stream": True,
                                                 "max_tokens": 200}) as response:
                            for i, _ in enumerate(response.iter_lines()):
                                if i >= 3:
                                    break  # leaving the block closes the stream mid-generation
                        outcome = "dropped"
                    else:
                        client.post(self.api_url + "/v1/completions",
                                    json=body).raise_for_status()
                        outcome = "done"
                except httpx.HTTPError as exc:
                    outcome = "failed"
                    self.first_failure = self.first_failure or repr(exc)
                    self._stop.wait(1)
                with self._lock:
                    setattr(self, outcome, getattr(self, outcome) + 1)


class Scraper(threading.Thread):
    """GET /metrics every second; keeps the latest exposition and counts failures."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.latest = ""
        self.scrapes = self.failures = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            next_at = time.monotonic()
            while not self.stop.is_set():
                try:
                    response = client.get(self.url)
                    response.raise_for_status()
                    self.latest = response.text
                    self.scrapes += 1
                except httpx.HTTPError:
                    self.failures += 1
                next_at += 1.0
                self.stop.wait(max(0.0, next_at - time.monotonic()))


def series_count(exposition: str) -> int:
    return sum(1 for line in exposition.splitlines() if line and not line.startswith("#"))


def slope_per_minute(points: list[dict], key: str) -> float:
    """Least-squares growth of `key` per minute over the second half of the run."""
    half = points[len(points) // 2:]
    if len(half) < 2:
        return 0.0
    t = np.array([p["t"] for p in half]) / 60
    return float(np.polyfit(t, np.array([p[key] for p in half], dtype=float), 1)[0])


class Target:
    """One server under soak: its processes, its load, its scraper and its samples."""

    def __init__(self, name: str, process: subprocess.Popen, api_url: str, metrics_url: str,
                 clients: int, model: str):
        self.name, self.process = name, process
        self.engine_pids = engine_core_pids(process.pid)
        # The daemon's metrics process (alert evaluator and its history, the /metrics render).
        self.metrics_pids = descendant_pids(process.pid, b"exporter.metrics_process")
        self.load = Load(api_url, model, clients)
        self.scraper = Scraper(metrics_url)
        self.points: list[dict] = []

    def sample(self, t: float) -> dict:
        latest = self.scraper.latest
        samples = Samples(latest) if latest else Samples("")
        point = {
            "t": t,
            "main_rss": rss_bytes(self.process.pid),
            "engine_rss": sum(rss_bytes(pid) for pid in self.engine_pids),
            "metrics_rss": sum(rss_bytes(pid) for pid in self.metrics_pids),
            "series": series_count(latest),
            "exposition_bytes": len(latest.encode()),
            "history_series": samples.get("vllm_exporter_alert_history_series"),
            "history_samples": samples.get("vllm_exporter_alert_history_samples"),
            "requests": self.load.done + self.load.dropped, "failed": self.load.failed,
        }
        self.points.append(point)
        return point

    def summary(self, warmup: float) -> dict:
        start_at = next((p for p in self.points if p["t"] >= warmup), self.points[0])
        end = self.points[-1]
        requests = max(1, end["requests"] - start_at["requests"])
        return {
            "name": self.name, "scrapes": self.scraper.scrapes,
            "scrape_failures": self.scraper.failures, "requests_done": self.load.done,
            "streams_dropped": self.load.dropped, "requests_failed": self.load.failed,
            "first_failure": self.load.first_failure, "start": start_at, "end": end,
            "main_rss_growth_kib_per_1000_requests":
                (end["main_rss"] - start_at["main_rss"]) / 1024 / requests * 1000,
            **{f"{key}_slope_per_min": slope_per_minute(self.points, key)
               for key in ("main_rss", "metrics_rss", "engine_rss", "series",
                           "history_samples")},
        }


def print_summary(summary: dict) -> None:
    print(f"\n{summary['name']}: {summary['requests_done']} completions, "
          f"{summary['streams_dropped']} dropped streams, {summary['requests_failed']} failed "
          f"{summary['first_failure']}; {summary['scrapes']} scrapes, "
          f"{summary['scrape_failures']} failed")
    start_at, end = summary["start"], summary["end"]
    for key, label, unit in (("main_rss", "main process RSS MiB", MIB),
                             ("metrics_rss", "metrics process RSS MiB", MIB),
                             ("engine_rss", "engine core RSS MiB", MIB),
                             ("series", "series in /metrics", 1),
                             ("history_samples", "alert history samples", 1)):
        print(f"  {label:<24} start {start_at[key] / unit:>9.1f}  end {end[key] / unit:>9.1f}"
              f"  change {(end[key] - start_at[key]) / unit:>+8.1f}  second-half slope "
              f"{summary[key + '_slope_per_min'] / unit:>+7.2f}/min")
    print(f"  main process growth per 1000 requests: "
          f"{summary['main_rss_growth_kib_per_1000_requests']:.0f} KiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before 'start'")
    parser.add_argument("--sample", type=float, default=15.0, help="seconds between samples")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--fine-history-seconds", type=float,
                        help="alerts.fine_history_seconds (default: the daemon's, 3900)")
    parser.add_argument("--baseline", action="store_true",
                        help="also soak vLLM's own server without our plugin, side by side, "
                             "scraping its own /metrics")
    parser.add_argument("--out", type=Path, help="write the samples and summary as JSON")
    args = parser.parse_args()

    from exporter.default_model import SERVED_NAME, ensure_default_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    api_port, metrics_port = free_port(), free_port()
    config: dict = {"engine": {"max_model_len": 512}, "api": {"port": api_port},
                    "metrics": {"port": metrics_port}}
    if args.fine_history_seconds:
        config["alerts"] = {"fine_history_seconds": args.fine_history_seconds}
    (tmp / "daemon.yaml").write_text(yaml.safe_dump(config))
    targets: list[Target] = []
    try:
        api_url = f"http://127.0.0.1:{api_port}"
        process = start([sys.executable, "-m", "exporter", "serve", "--config",
                         str(tmp / "daemon.yaml")], env, tmp / "daemon.log", api_url + "/health")
        targets.append(Target("vllm-exporter daemon", process, api_url,
                              f"http://127.0.0.1:{metrics_port}/metrics", args.clients,
                              SERVED_NAME))
        if args.baseline:
            port = free_port()
            api_url = f"http://127.0.0.1:{port}"
            process = start(
                [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                 str(ensure_default_model()), "--served-model-name", SERVED_NAME,
                 "--max-model-len", "512", "--host", "127.0.0.1", "--port", str(port)],
                dict(env, VLLM_PLUGINS="none"), tmp / "vllm.log", api_url + "/health")
            targets.append(Target("vLLM server, no plugin", process, api_url,
                                  api_url + "/metrics", args.clients, SERVED_NAME))
        for target in targets:
            target.scraper.start()
            target.load.__enter__()
        began = time.monotonic()
        print(f"{'min':>6}  " + "  ".join(
            f"{'main MiB':>9}{'metrics MiB':>12}{'engine MiB':>11}{'series':>7}"
            f"{'hist. samples':>14}{'requests':>9}" for _ in targets) + "   (" + " | ".join(t.name for t in targets) + ")", flush=True)
        while time.monotonic() - began < args.minutes * 60:
            time.sleep(args.sample)
            t = time.monotonic() - began
            row = [target.sample(t) for target in targets]
            print(f"{t / 60:>6.1f}  " + "  ".join(
                f"{p['main_rss'] / MIB:>9.1f}{p['metrics_rss'] / MIB:>12.1f}"
                f"{p['engine_rss'] / MIB:>11.1f}{p['series']:>7}"
                f"{p['history_samples']:>14.0f}{p['requests']:>9}" for p in row), flush=True)
        for target in targets:
            target.load.__exit__()
            target.scraper.stop.set()
            target.scraper.join(10)
        summaries = [target.summary(args.warmup) for target in targets]
        print(f"\n{args.minutes:g} min, {args.clients} clients per server, a scrape per second")
        for summary in summaries:
            print_summary(summary)
        if args.out:
            args.out.write_text(json.dumps({
                "summaries": summaries,
                "points": {target.name: target.points for target in targets}}, indent=1))
        return 0
    finally:
        stop_all([target.process for target in targets])


if __name__ == "__main__":
    sys.exit(main())
