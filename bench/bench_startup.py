"""Start-up time: the daemon against vLLM alone, on equal caches, side by side in one run.

Each repetition starts vLLM's own OpenAI server (no plugin loaded) and the daemon on the same
model, one after the other and in alternating order, and times from launch to vLLM's `/health`
answering 200 on each API port and, for the daemon, to our `/-/ready`. A first, uncounted round
warms the caches both use (Python bytecode, torch.compile and kernel caches), so the counted
rounds compare like with like; `--cold-cache-dir DIR` instead points both at a fresh, empty
cache folder (VLLM_CACHE_ROOT, TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR) for every start, to
time cold starts alike.

Also printed for the daemon: when its log first shows vLLM's engine process starting
(`EngineCore` or `Started engine process`), i.e. how long the daemon takes before vLLM's own
start-up begins.

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python -m bench.bench_startup [--reps 3]
On the GPU machine (the recipe in ../shared/gpu/probe/ brings CUDA vLLM):
    python3 -m bench.bench_startup --model /tmp/llama2-7b-shape --engine-arg load_format=dummy \
        --gpu-memory-utilization 0.40 --reps 2
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from testsupport.net import free_port
from testsupport.processes import start_group, stop_group

ENGINE_STARTED = re.compile(rb"EngineCore|Started engine process|engine core")


def wait_ok(url: str, process: subprocess.Popen, began: float, timeout: float,
            log: Path | None = None, stamps: list | None = None) -> float:
    """Seconds from `began` until GET `url` answers 200; samples `log`'s size into `stamps`
    meanwhile, so that its lines can be timed afterwards."""
    while time.monotonic() - began < timeout:
        if log is not None and stamps is not None:
            stamps.append((time.monotonic() - began, log.stat().st_size))
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return time.monotonic() - began
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def first_line_time(log: Path, pattern: re.Pattern, stamps: list[tuple[float, int]]) -> float:
    """When the log first grew past a line matching `pattern` (from the sampled log sizes)."""
    match = pattern.search(log.read_bytes())
    if not match:
        return float("nan")
    return next((t for t, size in stamps if size >= match.end()), float("nan"))


def timed_start(command: list[str], env: dict, log: Path, health_url: str, timeout: float,
                ready_url: str | None = None) -> dict:
    """Launch, time /health (and `ready_url`) and the engine process's first log line, stop."""
    began = time.monotonic()
    process = start_group(command, log, env)
    stamps: list[tuple[float, int]] = []
    try:
        result = {"health": wait_ok(health_url, process, began, timeout, log, stamps)}
        if ready_url:
            result["ready"] = wait_ok(ready_url, process, began, timeout)
        result["engine_process"] = first_line_time(log, ENGINE_STARTED, stamps)
        return result
    finally:
        stop_group(process)


def time_vllm_alone(args, model: str, env: dict, tmp: Path, n: int) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--served-model-name", "startup", "--host", "127.0.0.1", "--port", str(port),
               *args.vllm_args]
    return timed_start(command, dict(env, VLLM_PLUGINS="none"), tmp / f"alone-{n}.log",
                       f"http://127.0.0.1:{port}/health", args.timeout)


def time_daemon(args, model: str, env: dict, tmp: Path, n: int) -> dict:
    api, metrics = free_port(), free_port()
    engine: dict = {"model": model, "served_model_name": "startup", **args.engine}
    config = tmp / f"daemon-{n}.yaml"
    config.write_text(yaml.safe_dump({"engine": engine, "api": {"host": "127.0.0.1",
                                                                "port": api},
                                      "metrics": {"host": "127.0.0.1", "port": metrics}}))
    return timed_start([sys.executable, "-m", "exporter", "serve", "--config", str(config)],
                       env, tmp / f"daemon-{n}.log", f"http://127.0.0.1:{api}/health",
                       args.timeout, ready_url=f"http://127.0.0.1:{metrics}/-/ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the embedded model)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--gpu-memory-utilization", type=float)
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra engine setting for both (e.g. load_format=dummy)")
    parser.add_argument("--cold-cache-dir", type=Path,
                        help="a fresh cache folder per start instead of a warm-up round")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()

    from exporter.default_model import ensure_default_model

    model = args.model or str(ensure_default_model())
    args.engine = {"max_model_len": args.max_model_len}
    args.vllm_args = ["--max-model-len", str(args.max_model_len)]
    if args.gpu_memory_utilization:
        args.engine["gpu_memory_utilization"] = args.gpu_memory_utilization
        args.vllm_args += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    for item in args.engine_arg:
        key, _, value = item.partition("=")
        args.engine.setdefault("extra_args", {})[key] = value
        args.vllm_args += [f"--{key.replace('_', '-')}", value]
    tmp = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    def cache_env(n: int, who: str) -> dict:
        if args.cold_cache_dir is None:
            return env
        root = args.cold_cache_dir / f"{who}-{n}"
        return dict(env, VLLM_CACHE_ROOT=str(root / "vllm"),
                    TORCHINDUCTOR_CACHE_DIR=str(root / "inductor"),
                    TRITON_CACHE_DIR=str(root / "triton"))

    rounds = {"vLLM alone": [], "daemon": []}
    first = 1 if args.cold_cache_dir else 0  # round 0 warms the caches and is not counted
    for n in range(first, args.reps + 1):
        order = ("vLLM alone", "daemon") if n % 2 else ("daemon", "vLLM alone")
        for who in order:
            timer = time_vllm_alone if who == "vLLM alone" else time_daemon
            result = timer(args, model, cache_env(n, who), tmp, n)
            if n >= 1:
                rounds[who].append(result)
            print(f"round {n}{' (warm-up)' if n == 0 and not args.cold_cache_dir else ''} "
                  f"{who:<11} " + "  ".join(f"{k} {v:.1f} s" for k, v in result.items()),
                  flush=True)
    med = {who: {key: statistics.median(r[key] for r in results) for key in results[0]}
           for who, results in rounds.items()}
    alone, daemon = med["vLLM alone"], med["daemon"]
    print(f"\n{'medians, s':<12}{'engine process':>16}{'/health':>10}{'/-/ready':>10}"
          f"   ({'cold' if args.cold_cache_dir else 'warm'} caches)")
    print(f"{'vLLM alone':<12}{alone['engine_process']:>16.1f}{alone['health']:>10.1f}"
          f"{'-':>10}")
    print(f"{'daemon':<12}{daemon['engine_process']:>16.1f}{daemon['health']:>10.1f}"
          f"{daemon['ready']:>10.1f}")
    engine_gap = daemon["engine_process"] - alone["engine_process"]
    print(f"daemon - vLLM alone: engine process {engine_gap:+.1f} s, "
          f"/health {daemon['health'] - alone['health']:+.1f} s, /-/ready "
          f"{daemon['ready'] - alone['health']:+.1f} s (target: within 2 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
