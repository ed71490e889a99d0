"""End-to-end overhead and scrape latency, in one run.

Two servers run side by side on the embedded default model: the daemon (vLLM's server with our
stat logger) and vLLM's own OpenAI server with no plugin loaded (VLLM_PLUGINS=none). The same
workload runs against each in turn, interleaved, `--reps` times (after one warm-up round), with
the other server paused; the script prints the median output throughput of each and their
ratio (target >= 0.98).

While the workload runs against the daemon, a scraper GETs our /metrics and vLLM's own /metrics
(on the daemon's API port) alternately and prints p50/p99 for both (target: ours p99 <= 5 ms).

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python bench/bench_overhead.py [--reps 5] [--requests 48]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import free_port, wait_for  # noqa: E402


def stop_all(processes: list[subprocess.Popen]) -> None:
    """SIGTERM every server, then wait up to 60 s for each and kill what is left."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def start(cmd: list[str], env: dict, log: Path, ready_url: str) -> subprocess.Popen:
    process = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env,
                               cwd=ROOT, start_new_session=True)

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"{cmd[:3]} exited: {log.read_text()[-3000:]}")
        try:
            return httpx.get(ready_url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 600, interval=1, what=ready_url)
    return process


async def workload(api_url: str, model: str, requests: int, concurrency: int,
                   max_tokens: int) -> float:
    """Output tokens per second for `requests` completions at fixed concurrency."""
    semaphore = asyncio.Semaphore(concurrency)
    tokens = 0
    async with httpx.AsyncClient(timeout=120) as client:
        async def one(i: int) -> None:
            nonlocal tokens
            async with semaphore:
                response = await client.post(api_url + "/v1/completions", json={
                    "model": model, "prompt": f"overhead benchmark request number {i} " * 3,
                    "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0})
                tokens += response.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        await asyncio.gather(*[one(i) for i in range(requests)])
        return tokens / (time.perf_counter() - started)


class Workers:
    """`count` threads, each running `self._run(index)` until the `with` block ends."""

    join_seconds = 30.0

    def __init__(self, count: int):
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(index,), daemon=True)
                         for index in range(count)]

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.join_seconds)

    def _run(self, index: int) -> None:
        raise NotImplementedError


class Scraper(threading.Thread):
    def __init__(self, urls: dict[str, str]):
        super().__init__(daemon=True)
        self.urls, self.times = urls, {name: [] for name in urls}
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                for name, url in self.urls.items():
                    started = time.perf_counter()
                    client.get(url).raise_for_status()
                    self.times[name].append((time.perf_counter() - started) * 1e3)
                time.sleep(0.05)


@contextlib.contextmanager
def paused(processes: list[subprocess.Popen]):
    for process in processes:
        os.killpg(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGCONT)


def scrape_render_seconds(url: str) -> float:
    from helpers import scrape

    samples = scrape(url)
    count = samples.get("vllm_exporter_scrape_duration_seconds_count")
    return samples.get("vllm_exporter_scrape_duration_seconds_sum") / count if count else 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    from exporter.default_model import SERVED_NAME, ensure_default_model

    model_dir = str(ensure_default_model())
    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    ours_api, ours_metrics, theirs_api = free_port(), free_port(), free_port()
    config = tmp / "daemon.yaml"
    config.write_text(yaml.safe_dump({
        "engine": {"max_model_len": 512}, "api": {"port": ours_api},
        "metrics": {"port": ours_metrics}}))
    processes = []
    try:
        processes.append(start([sys.executable, "-m", "exporter", "serve", "--config", str(config)],
                               env, tmp / "daemon.log",
                               f"http://127.0.0.1:{ours_metrics}/-/ready"))
        processes.append(start(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
             "--served-model-name", SERVED_NAME, "--max-model-len", "512",
             "--host", "127.0.0.1", "--port", str(theirs_api)],
            dict(env, VLLM_PLUGINS="none"), tmp / "vllm.log",
            f"http://127.0.0.1:{theirs_api}/health"))
        targets = {"vllm-exporter daemon": f"http://127.0.0.1:{ours_api}",
                   "vLLM server, no plugin": f"http://127.0.0.1:{theirs_api}"}
        groups = dict(zip(targets, processes))
        results: dict[str, list[float]] = {name: [] for name in targets}
        for rep in range(args.reps + 1):  # rep 0 warms both up and is not counted
            order = list(targets.items()) if rep % 2 == 0 else list(reversed(targets.items()))
            for name, url in order:
                # The other server is paused (SIGSTOP on its process group): on a small machine
                # its idle threads would otherwise take CPU from the one being measured.
                with paused([p for n, p in groups.items() if n != name]):
                    tokens_per_second = asyncio.run(workload(
                        url, SERVED_NAME, args.requests, args.concurrency, args.max_tokens))
                if rep:
                    results[name].append(tokens_per_second)
        # Scrape latency: a separate pass under the same load, so scraping does not tilt the
        # throughput comparison above.
        scraper = Scraper({"ours /metrics": f"http://127.0.0.1:{ours_metrics}/metrics",
                           "vLLM /metrics": f"http://127.0.0.1:{ours_api}/metrics"})
        scraper.start()
        with paused([groups["vLLM server, no plugin"]]):
            asyncio.run(workload(targets["vllm-exporter daemon"], SERVED_NAME, args.requests * 2,
                                 args.concurrency, args.max_tokens))
        scraper.stop.set()
        scraper.join(10)

        print(f"workload: {args.requests} requests x {args.max_tokens} tokens, concurrency "
              f"{args.concurrency}, {args.reps} interleaved reps")
        print(f"{'server':<26}{'median tok/s':>14}{'min':>10}{'max':>10}")
        medians = {}
        for name, values in results.items():
            medians[name] = statistics.median(values)
            print(f"{name:<26}{medians[name]:>14.1f}{min(values):>10.1f}{max(values):>10.1f}"
                  f"   reps: {' '.join(f'{v:.0f}' for v in values)}")
        ratio = medians["vllm-exporter daemon"] / medians["vLLM server, no plugin"]
        pairs = [a / b for a, b in zip(*results.values())]
        print(f"throughput ratio daemon/vLLM: {ratio:.3f} (target >= 0.98); per-rep pair ratios: "
              f"{' '.join(f'{r:.2f}' for r in pairs)}")
        render = scrape_render_seconds(f"http://127.0.0.1:{ours_metrics}/metrics")
        print(f"our render time (vllm_exporter_scrape_duration_seconds mean): {render * 1e3:.2f} ms")
        print(f"{'scrape (under load)':<26}{'n':>6}{'p50 ms':>10}{'p99 ms':>10}")
        for name, values in scraper.times.items():
            print(f"{name:<26}{len(values):>6}{percentile(values, 0.5):>10.2f}"
                  f"{percentile(values, 0.99):>10.2f}")
    finally:
        stop_all(processes)


if __name__ == "__main__":
    main()
