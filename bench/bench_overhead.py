"""End-to-end overhead and scrape latency, side by side in one run: the daemon against vLLM alone.

Two servers on the same model: the daemon (vLLM's server with our stat logger; our /metrics is
served by the separate metrics process) and vLLM's own OpenAI server with no plugin loaded. The
same closed-loop workload (streaming completions, usage included) runs against each in turn,
interleaved, `--reps` times after a warm-up round, at each `--concurrency`; the script prints
output throughput and client TTFT p50 of each and their ratios (targets: throughput >= 0.995 x
vLLM alone, TTFT p50 within 1 %).

Then, under the same load against the daemon, two scraper processes, one for our /metrics and
one for vLLM's own /metrics (on the daemon's API port), each GET theirs over a keep-alive
connection as Prometheus does, and the script prints p50/p99 of both (target: ours p99 <= 5 ms
on the GPU machine), our render time per scrape (target <= 1 ms) and our stat logger's time per
engine step, both read from the daemon's own counters over that run.

On this machine (the embedded default model, both servers started here; the idle one is paused
so it takes no CPU from the measured one):
    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python -m bench.bench_overhead [--reps 3]
On the GPU machine, against servers already running (docs/performance.md has the commands):
    python -m bench.bench_overhead --attach 8000 9410 8001 --model /tmp/llama2-7b-shape \\
        --prompt-words 200 --max-tokens 128 --concurrency 64 256 --requests 512 \\
        --client-processes 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
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

from testsupport.exposition import Samples
from testsupport.net import free_port
from testsupport.processes import start_group, stop_group, wait_url


def stop_all(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        stop_group(process)


def start(cmd: list[str], env: dict, log: Path, ready_url: str) -> subprocess.Popen:
    """A server of its own process group, once `ready_url` answers 200."""
    process = start_group(cmd, log, env)
    try:
        wait_url(ready_url, process, 600, log, interval=1)
    except BaseException:
        stop_group(process)
        raise
    return process


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


@contextlib.contextmanager
def paused(processes: list[subprocess.Popen]):
    for process in processes:
        os.killpg(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGCONT)


# --- the workload ------------------------------------------------------------------------------

async def client_share(api_url: str, model: str, first: int, requests: int, concurrency: int,
                       prompt_words: int, max_tokens: int) -> dict:
    """One client process's share of the workload: requests first .. first+requests-1."""
    semaphore = asyncio.Semaphore(concurrency)
    tokens, ttfts, failed = 0, [], 0
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def one(i: int) -> None:
            nonlocal tokens, failed
            words = " ".join(f"w{(i * 7 + k) % 997}" for k in range(prompt_words))
            payload = {"model": model, "prompt": words, "max_tokens": max_tokens,
                       "ignore_eos": True, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}
            async with semaphore:
                sent = time.perf_counter()
                first = None
                try:
                    async with client.stream("POST", api_url + "/v1/completions",
                                             json=payload) as response:
                        if response.status_code != 200:
                            failed += 1
                            return
                        async for line in response.aiter_lines():
                            if not line.startswith("data: {"):
                                continue
                            chunk = json.loads(line[6:])
                            if first is None and chunk.get("choices"):
                                first = time.perf_counter() - sent
                            if chunk.get("usage"):
                                tokens += chunk["usage"]["completion_tokens"]
                except httpx.HTTPError:  # counted and shown: a failed request is no token
                    failed += 1
                    return
                if first is not None:
                    ttfts.append(first)

        started = time.time()
        await asyncio.gather(*[one(i) for i in range(first, first + requests)])
        ended = time.time()
    return {"tokens": tokens, "ttfts": ttfts, "failed": failed, "started": started,
            "ended": ended}


def run_share(*args) -> dict:
    return asyncio.run(client_share(*args))


class Client:
    """The load generator: `processes` client processes share each workload (one Python
    process streaming at high concurrency is itself the bottleneck: on the H100 at c256 one
    process reached 4,600 tok/s where the server gives 6,900)."""

    def __init__(self, processes: int):
        self.processes = processes
        self.pool = None
        if processes > 1:
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context(
                "spawn"))
            list(self.pool.map(abs, range(processes)))  # started and imported before timing

    def run(self, api_url: str, model: str, requests: int, concurrency: int, prompt_words: int,
            max_tokens: int) -> dict:
        """Output tokens/s (from the responses' usage) and client TTFT of streaming
        completions, over all client processes."""
        n = self.processes
        shares = [(api_url, model, i * requests // n, (i + 1) * requests // n - i * requests // n,
                   max(1, concurrency // n), prompt_words, max_tokens) for i in range(n)]
        if self.pool is None:
            results = [run_share(*shares[0])]
        else:
            results = list(self.pool.map(run_share, *zip(*shares)))
        elapsed = max(r["ended"] for r in results) - min(r["started"] for r in results)
        ttfts = [t for r in results for t in r["ttfts"]]
        return {"tok_s": sum(r["tokens"] for r in results) / elapsed,
                "ttft_p50_ms": statistics.median(ttfts) * 1e3 if ttfts else float("nan"),
                "ttfts_ms": [t * 1e3 for t in ttfts],
                "failed": sum(r["failed"] for r in results)}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


# --- the scraper, in a process of its own ------------------------------------------------------

def scrape_loop(url: str, ready, stop, interval: float, out) -> None:
    """GET `url` over one keep-alive connection (as Prometheus does) until `stop` is set; send
    the milliseconds of each GET back."""
    times: list[float] = []
    with httpx.Client(timeout=30) as client:
        client.get(url)  # connection made, imports done: the measured part starts
        ready.set()
        while not stop.is_set():
            started = time.perf_counter()
            client.get(url).raise_for_status()
            times.append((time.perf_counter() - started) * 1e3)
            time.sleep(interval)
    out.send(times)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def median_ratio_interval(ours: list[float], theirs: list[float], draws: int = 2000,
                          seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap interval of median(ours) / median(theirs): each draw resamples both
    pooled samples with replacement. Narrow where the pooled samples are large."""
    rng = random.Random(seed)
    ratios = sorted(statistics.median(rng.choices(ours, k=len(ours)))
                    / statistics.median(rng.choices(theirs, k=len(theirs)))
                    for _ in range(draws))
    return ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]


def print_ttft_pooled(results: dict[str, list[dict]]) -> dict:
    """Client TTFT p50 over every counted request of all repetitions, per server, and the
    ratio of each server to vLLM alone (and the daemon to plugin mode, where both ran) with
    its bootstrap interval and the per-repetition ratios (the two servers' runs of the same
    repetition). One repetition's median moves with the run's wave pattern; the pooled
    median over thousands of requests does not."""
    pooled = {name: [t for r in reps for t in r["ttfts_ms"]] for name, reps in results.items()}
    pairs = [(name, "vLLM alone") for name in results if name != "vLLM alone"]
    if "daemon" in results and "plugin mode" in results:
        pairs.append(("daemon", "plugin mode"))
    out = {}
    for ours_name, theirs_name in pairs:
        ours, theirs = pooled[ours_name], pooled[theirs_name]
        if not ours or not theirs:
            continue
        ratio = statistics.median(ours) / statistics.median(theirs)
        low, high = median_ratio_interval(ours, theirs)
        paired = [a["ttft_p50_ms"] / b["ttft_p50_ms"]
                  for a, b in zip(results[ours_name], results[theirs_name])]
        print(f"TTFT p50 pooled, {ours_name} / {theirs_name}: {statistics.median(ours):.1f} ms "
              f"(n {len(ours)}) / {statistics.median(theirs):.1f} ms (n {len(theirs)}) = "
              f"{ratio:.4f}, 95 % bootstrap interval {low:.4f}-{high:.4f}; per rep "
              + ", ".join(f"{r:.3f}" for r in paired)
              + f" (median {statistics.median(paired):.4f})")
        out[f"{ours_name} / {theirs_name}"] = {
            "ratio": ratio, "interval": [low, high], "paired": paired,
            "n": [len(ours), len(theirs)]}
    return out


# --- vLLM's own view of the same requests ------------------------------------------------------

# Means per request (or per engine step) from vLLM's own histograms on each server's /metrics,
# read around each repetition: whether a difference in client TTFT is already there when the
# engine sees the request (queue, prefill) or arises in the front end and HTTP.
ENGINE_MEANS = {
    "vLLM TTFT ms": "vllm:time_to_first_token_seconds",
    "queue ms": "vllm:request_queue_time_seconds",
    "prefill ms": "vllm:request_prefill_time_seconds",
    "tokens/step": "vllm:iteration_tokens_total",
}
ENGINE_COUNTERS = {"preempted": "vllm:num_preemptions_total"}


def engine_reading(api_url: str) -> dict[str, float] | None:
    """Sums and counts of ENGINE_MEANS and the ENGINE_COUNTERS now (None if unreadable)."""
    try:
        samples = Samples(httpx.get(api_url + "/metrics", timeout=30).text)
    except (httpx.HTTPError, ValueError):
        return None
    reading = {name: samples.get(name) for name in ENGINE_COUNTERS.values()}
    for family in ENGINE_MEANS.values():
        reading[family + "_sum"] = samples.get(family + "_sum")
        reading[family + "_count"] = samples.get(family + "_count")
    return reading


def engine_delta(before: dict | None, after: dict | None) -> dict[str, float] | None:
    if before is None or after is None:
        return None
    return {name: after[name] - before[name] for name in before}


def print_engine_view(results: dict[str, list[dict]]) -> dict:
    """One row per server: ENGINE_MEANS over all counted repetitions, ENGINE_COUNTERS summed."""
    title = "vLLM's view"
    print(f"{title:<14}" + "".join(f"{label:>14}" for label in ENGINE_MEANS)
          + "".join(f"{label:>11}" for label in ENGINE_COUNTERS) + f"{'steps':>9}")
    out = {}
    for name, reps in results.items():
        deltas = [r["engine"] for r in reps if r.get("engine")]
        if not deltas:
            continue
        total = {key: sum(d[key] for d in deltas) for key in deltas[0]}
        row = {}
        for label, family in ENGINE_MEANS.items():
            count = total[family + "_count"]
            mean = total[family + "_sum"] / count if count else float("nan")
            row[label] = mean * 1e3 if label.endswith("ms") else mean
        for label, family in ENGINE_COUNTERS.items():
            row[label] = total[family]
        row["steps"] = total["vllm:iteration_tokens_total_count"]
        out[name] = row
        print(f"{name:<14}" + "".join(f"{row[label]:>14.2f}" for label in ENGINE_MEANS)
              + "".join(f"{row[label]:>11.0f}" for label in ENGINE_COUNTERS)
              + f"{row['steps']:>9.0f}")
    return out


def daemon_counters(metrics_url: str) -> dict[str, float]:
    """The daemon's render and stat-logger counters now."""
    names = ("vllm_exporter_scrape_duration_seconds_sum",
             "vllm_exporter_scrape_duration_seconds_count",
             "vllm_exporter_stat_logger_seconds_total", "vllm_exporter_stat_logger_records_total")
    samples = Samples(httpx.get(metrics_url, timeout=30).text)
    return {name: samples.get(name) for name in names}


def daemon_costs(before: dict[str, float], after: dict[str, float]) -> tuple[float, float]:
    """(mean render seconds per scrape, mean stat-logger seconds per record) between two
    readings of `daemon_counters`."""
    def mean(total: str, count: str) -> float:
        return (after[total] - before[total]) / max(1.0, after[count] - before[count])

    return (mean("vllm_exporter_scrape_duration_seconds_sum",
                 "vllm_exporter_scrape_duration_seconds_count"),
            mean("vllm_exporter_stat_logger_seconds_total",
                 "vllm_exporter_stat_logger_records_total"))


# --- main ----------------------------------------------------------------------------------------

def start_servers(tmp: Path) -> tuple[dict[str, str], str, list[subprocess.Popen], str]:
    from exporter.default_model import SERVED_NAME, ensure_default_model

    model_dir = str(ensure_default_model())
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    ours_api, ours_metrics, theirs_api = free_port(), free_port(), free_port()
    config = tmp / "daemon.yaml"
    config.write_text(yaml.safe_dump({
        "engine": {"max_model_len": 512}, "api": {"port": ours_api},
        "metrics": {"port": ours_metrics}}))
    processes = [
        start([sys.executable, "-m", "exporter", "serve", "--config", str(config)], env,
              tmp / "daemon.log", f"http://127.0.0.1:{ours_metrics}/-/ready"),
        start([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
               "--served-model-name", SERVED_NAME, "--max-model-len", "512",
               "--host", "127.0.0.1", "--port", str(theirs_api)],
              dict(env, VLLM_PLUGINS="none"), tmp / "vllm.log",
              f"http://127.0.0.1:{theirs_api}/health")]
    urls = {"daemon": f"http://127.0.0.1:{ours_api}",
            "vLLM alone": f"http://127.0.0.1:{theirs_api}"}
    return urls, f"http://127.0.0.1:{ours_metrics}/metrics", processes, SERVED_NAME


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attach", nargs=3, type=int, metavar=("API", "METRICS", "VLLM_API"),
                        help="use running servers: the daemon's API and metrics ports, and "
                             "vLLM alone's API port (nothing is started or paused)")
    parser.add_argument("--also", action="append", default=[], metavar="NAME=API_PORT",
                        help="with --attach: another running server in the comparison (e.g. "
                             "'plugin mode=8002', from bench.ab_servers); repeatable")
    parser.add_argument("--model", help="served model name (default: the embedded model)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16])
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--scrape-interval", type=float, default=0.05)
    parser.add_argument("--client-processes", type=int, default=1,
                        help="client processes sharing the load (use several on a GPU host)")
    parser.add_argument("--scrape-requests", type=int,
                        help="requests of the load run under the scrapers (default --requests; "
                             "0: no scrape run)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    processes: list[subprocess.Popen] = []
    if args.attach:
        api, metrics, theirs = args.attach
        urls = {"daemon": f"http://127.0.0.1:{api}", "vLLM alone": f"http://127.0.0.1:{theirs}"}
        for item in args.also:
            name, _, port = item.rpartition("=")
            urls[name] = f"http://127.0.0.1:{int(port)}"
        metrics_url = f"http://127.0.0.1:{metrics}/metrics"
        model = args.model
    else:
        urls, metrics_url, processes, model = start_servers(
            Path(tempfile.mkdtemp(prefix="bench-overhead-")))
        model = args.model or model
    groups = dict(zip(urls, processes))
    client = Client(args.client_processes)
    report: dict = {"workload": vars(args), "load": {}, "scrapes": {}}
    try:
        for concurrency in args.concurrency:
            results: dict[str, list[dict]] = {name: [] for name in urls}
            report["load"][concurrency] = results  # filled in place, rep by rep
            names = list(urls)
            for rep in range(args.reps + 1):  # rep 0 warms all up and is not counted
                shift = rep % len(names)  # each server takes each place in the order in turn
                for name in names[shift:] + names[:shift]:
                    others = [p for n, p in groups.items() if n != name]
                    with paused(others):
                        before = engine_reading(urls[name])
                        result = client.run(urls[name], model, args.requests, concurrency,
                                            args.prompt_words, args.max_tokens)
                        result["engine"] = engine_delta(before, engine_reading(urls[name]))
                    if rep:
                        results[name].append(result)
                    print(f"rep {rep}{' (warm-up)' if not rep else ''} {name}: "
                          f"{result['tok_s']:.1f} tok/s, TTFT p50 {result['ttft_p50_ms']:.1f} ms, "
                          f"{result['failed']} failed", flush=True)
                    if args.json:  # what a run cut short has measured so far
                        Path(args.json).write_text(json.dumps(report, default=str))
            print(f"\nconcurrency {concurrency}: {args.requests} requests, {args.prompt_words} "
                  f"prompt words, {args.max_tokens} tokens out, {args.reps} interleaved reps")
            print(f"{'server':<14}{'tok/s median':>14}{'min':>10}{'max':>10}"
                  f"{'TTFT p50 ms':>14}{'min':>10}{'max':>10}{'failed':>8}")
            medians = {}
            for name, reps in results.items():
                tok = [r["tok_s"] for r in reps]
                ttft = [r["ttft_p50_ms"] for r in reps]
                medians[name] = (statistics.median(tok), statistics.median(ttft))
                print(f"{name:<14}{medians[name][0]:>14.1f}{min(tok):>10.1f}{max(tok):>10.1f}"
                      f"{medians[name][1]:>14.1f}{min(ttft):>10.1f}{max(ttft):>10.1f}"
                      f"{sum(r['failed'] for r in reps):>8}")
            for name in names:
                if name != "vLLM alone":
                    print(f"ratio {name} / vLLM alone: throughput "
                          f"{medians[name][0] / medians['vLLM alone'][0]:.4f} (target >= 0.995), "
                          f"TTFT p50 {medians[name][1] / medians['vLLM alone'][1]:.4f} "
                          f"(target within 1 %)")
            report.setdefault("ttft_pooled", {})[concurrency] = print_ttft_pooled(results)
            report.setdefault("engine_view", {})[concurrency] = print_engine_view(results)

        if args.scrape_requests == 0:  # the load comparison only
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=1, default=str))
            return
        # Scrape latency under the largest load, from processes of their own (a scraper
        # thread here would share the load generator's GIL), one per endpoint so that a slow
        # endpoint does not thin out the other's samples.
        concurrency = max(args.concurrency)
        context = multiprocessing.get_context("spawn")
        stop = context.Event()
        scrape_urls = {"ours /metrics": metrics_url, "vLLM's /metrics": urls["daemon"] + "/metrics"}
        scrapers = []
        with paused([p for n, p in groups.items() if n != "daemon"]):
            for url in scrape_urls.values():
                receive, send = context.Pipe(duplex=False)
                ready = context.Event()
                scraper = context.Process(target=scrape_loop,
                                          args=(url, ready, stop, args.scrape_interval, send))
                scraper.start()
                scrapers.append((scraper, ready, receive))
            for _, ready, _ in scrapers:
                ready.wait(120)
            before = daemon_counters(metrics_url)
            client.run(urls["daemon"], model, args.scrape_requests or args.requests,
                       concurrency, args.prompt_words, args.max_tokens)
            stop.set()
            times = {name: receive.recv() for name, (_, _, receive) in zip(scrape_urls, scrapers)}
            for scraper, _, _ in scrapers:
                scraper.join(30)
            render, record = daemon_costs(before, daemon_counters(metrics_url))
        report["scrapes"] = times
        report["render_ms"], report["stat_logger_us"] = render * 1e3, record * 1e6
        print(f"\nscrapes under load (concurrency {concurrency}), each endpoint from a process "
              f"of its own")
        print(f"{'endpoint':<18}{'n':>6}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
        for name, values in times.items():
            print(f"{name:<18}{len(values):>6}{percentile(values, 0.5):>10.2f}"
                  f"{percentile(values, 0.99):>10.2f}{max(values):>10.2f}")
        print(f"our render time per scrape in that run (mean, "
              f"vllm_exporter_scrape_duration_seconds): "
              f"{render * 1e3:.3f} ms (target <= 1 ms)")
        print(f"our stat logger per engine step in that run (mean, "
              f"vllm_exporter_stat_logger_seconds_total "
              f"/ records): {record * 1e6:.1f} us")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    finally:
        client.close()
        stop_all(processes)


if __name__ == "__main__":
    main()
