"""Scrape flood: engine throughput with and without 20 clients scraping every 100 ms.

One daemon on the embedded default model, its metrics port behind the web config of a real
deployment (TLS + basic auth; `--plain` for neither). The same completion workload runs with no
scraper and with the flood, interleaved, `--reps` times. Printed: median output tokens/s of each
and their ratio, failed inference requests, and the flood's status counts (200 and 503 only are
expected; anything else, or a connection error, is listed), with the daemon's own
vllm_exporter_scrapes_rejected_total at the end. The stated bound: the flooded median throughput
is at least `--bound` (0.9) x the unflooded one.

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python -m bench.bench_scrape_flood [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

from bench.bench_overhead import Workers, percentile, start, stop_all
from testsupport.exposition import Samples
from testsupport.net import free_port
from testsupport.pki import make_pki, write_web_config

USER, PASSWORD = "prometheus", "flood-test"


async def workload(api_url: str, model: str, requests: int, concurrency: int,
                   max_tokens: int) -> tuple[float, list[str]]:
    """(output tokens per second, failures) for `requests` completions."""
    semaphore = asyncio.Semaphore(concurrency)
    tokens, failures = 0, []
    async with httpx.AsyncClient(timeout=180) as client:
        async def one(i: int) -> None:
            nonlocal tokens
            async with semaphore:
                try:
                    response = await client.post(api_url + "/v1/completions", json={
                        "model": model, "prompt": f"flood benchmark request {i} " * 3,
                        "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0})
                    response.raise_for_status()
                    tokens += response.json()["usage"]["completion_tokens"]
                except Exception as exc:  # counted and printed: the benchmark's verdict
                    failures.append(repr(exc))

        started = time.perf_counter()
        await asyncio.gather(*[one(i) for i in range(requests)])
        return tokens / (time.perf_counter() - started), failures


class Flood(Workers):
    """`clients` threads, each with its own keep-alive client, GET /metrics every `period` s."""

    def __init__(self, url: str, clients: int, period: float, verify, auth):
        self.url, self.clients, self.period, self.verify, self.auth = (url, clients, period,
                                                                       verify, auth)
        self.statuses: collections.Counter = collections.Counter()
        self.errors: collections.Counter = collections.Counter()
        self.latencies_ms: list[float] = []
        self._lock = threading.Lock()
        super().__init__(clients)

    def _run(self, index: int) -> None:
        with httpx.Client(verify=self.verify, auth=self.auth, timeout=10) as client:
            next_at = time.monotonic()
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    status = client.get(self.url).status_code
                    with self._lock:
                        self.statuses[status] += 1
                        self.latencies_ms.append((time.perf_counter() - started) * 1e3)
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.errors[type(exc).__name__] += 1
                next_at += self.period
                self._stop.wait(max(0.0, next_at - time.monotonic()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--period", type=float, default=0.1, help="seconds between scrapes")
    parser.add_argument("--plain", action="store_true", help="no TLS, no basic auth")
    parser.add_argument("--bound", type=float, default=0.9,
                        help="the stated bound: flooded median throughput >= this x unflooded")
    args = parser.parse_args()

    from exporter.default_model import SERVED_NAME

    tmp = Path(tempfile.mkdtemp(prefix="bench-flood-"))
    api_port, metrics_port = free_port(), free_port()
    metrics: dict = {"port": metrics_port}
    verify, auth, scheme = True, None, "http"
    if not args.plain:
        pki = make_pki(tmp)
        write_web_config(tmp / "web.yml", pki, {USER: PASSWORD}, rounds=10)
        metrics["web_config_file"] = str(tmp / "web.yml")
        verify, auth, scheme = (ssl.create_default_context(cafile=str(pki.ca)),
                                (USER, PASSWORD), "https")
    (tmp / "daemon.yaml").write_text(yaml.safe_dump({
        "engine": {"max_model_len": 512}, "api": {"port": api_port}, "metrics": metrics,
        "gpu": {"enabled": False}}))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    api_url = f"http://127.0.0.1:{api_port}"
    metrics_url = f"{scheme}://127.0.0.1:{metrics_port}/metrics"
    process = start([sys.executable, "-m", "exporter", "serve", "--config",
                     str(tmp / "daemon.yaml")], env, tmp / "daemon.log", api_url + "/health")
    try:
        asyncio.run(workload(api_url, SERVED_NAME, 8, 8, 8))  # warm-up
        results: dict[str, list[float]] = {"unflooded": [], "flooded": []}
        failures: list[str] = []
        floods: list[Flood] = []
        for rep in range(args.reps):
            order = ["unflooded", "flooded"] if rep % 2 == 0 else ["flooded", "unflooded"]
            for kind in order:
                def run() -> tuple[float, list[str]]:
                    return asyncio.run(workload(api_url, SERVED_NAME, args.requests,
                                                args.concurrency, args.max_tokens))

                if kind == "flooded":
                    with Flood(metrics_url, args.clients, args.period, verify, auth) as flood:
                        tokens_per_s, failed = run()
                    floods.append(flood)
                else:
                    tokens_per_s, failed = run()
                results[kind].append(tokens_per_s)
                failures += failed

        with httpx.Client(verify=verify, auth=auth, timeout=10) as client:
            final = Samples(client.get(metrics_url).text)
        statuses = sum((f.statuses for f in floods), collections.Counter())
        errors = sum((f.errors for f in floods), collections.Counter())
        latencies = [ms for f in floods for ms in f.latencies_ms]

        print(f"workload: {args.requests} requests x {args.max_tokens} tokens, concurrency "
              f"{args.concurrency}, {args.reps} interleaved reps; flood: {args.clients} clients "
              f"every {args.period * 1e3:.0f} ms, "
              f"{'plain HTTP' if args.plain else 'TLS + basic auth'}")
        print(f"{'run':<12}{'median tok/s':>14}{'min':>10}{'max':>10}   each rep, in order")
        for kind, values in results.items():
            print(f"{kind:<12}{statistics.median(values):>14.1f}{min(values):>10.1f}"
                  f"{max(values):>10.1f}   " + " ".join(f"{v:.0f}" for v in values))
        ratio = statistics.median(results["flooded"]) / statistics.median(results["unflooded"])
        verdict = "within" if ratio >= args.bound else "BELOW"
        print(f"throughput ratio flooded/unflooded: {ratio:.3f} ({verdict} the stated bound "
              f"{args.bound:g})")
        print(f"failed inference requests: {len(failures)}"
              + (f" (first: {failures[0]})" if failures else ""))
        print(f"flood responses by status: {dict(sorted(statuses.items()))}; "
              f"connection errors: {dict(errors) or 0}")
        if latencies:
            print(f"flood scrape latency ms: p50 {percentile(latencies, 0.5):.2f}, "
                  f"p99 {percentile(latencies, 0.99):.2f}")
        print("daemon's own count of refusals: " + ", ".join(
            f"{labels['reason']}={value:g}"
            for labels, value in final.series("vllm_exporter_scrapes_rejected_total")))
        unexpected = {s: n for s, n in statuses.items() if s not in (200, 503)}
        if unexpected or errors or failures:
            print(f"UNEXPECTED: statuses {unexpected}, errors {dict(errors)}, "
                  f"failures {len(failures)}")
    finally:
        stop_all([process])


if __name__ == "__main__":
    main()
