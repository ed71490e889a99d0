"""Microseconds per GPU collection tick, per GPU, and which NVML calls dominate.

    python3 -m bench.bench_gpu_tick [--ticks 2000] [--fake]
        [--child-alloc-gib 10] [--expect-other-gib 4] [--exposition PATH] [--json PATH]

With a real NVML it measures the real thing; without one (or with --fake) it replays
tests/data/nvml_h200.json through testsupport/fake_pynvml.py, and the figures then show only the
collector's own Python cost. --child-alloc-gib starts a torch process below this one that holds
that much GPU memory, so the ticks run with an engine-like process on the GPU and the exposition
must show it under owner="engine" (anything else on the GPU under owner="other").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

from prometheus_client import CollectorRegistry, generate_latest

from exporter.gpu import GpuCollector, GpuConfig

GIB = 2**30
ALLOCATE = (
    "import sys, torch\n"
    "x = torch.empty(int(float(sys.argv[1]) * 2**30), dtype=torch.uint8, device='cuda')\n"
    "x.fill_(1); torch.cuda.synchronize()\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"  # hold the memory until the parent closes our stdin
)


def real_or_fake_nvml(force_fake: bool) -> tuple[Any, str]:
    if not force_fake:
        try:
            import pynvml
            pynvml.nvmlInit()
            pynvml.nvmlShutdown()
            return pynvml, "real NVML"
        except Exception as exc:
            print(f"no usable NVML ({type(exc).__name__}: {exc}); using the fake", flush=True)
    from testsupport import fake_pynvml
    return fake_pynvml.FakeNvml(fake_pynvml.load_recording()), "fake NVML (tests/data)"


class TimedNvml:
    """Wraps an NVML module and adds up the time spent in each function."""

    def __init__(self, nvml: Any):
        self._nvml = nvml
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._nvml, name)
        if not callable(attr) or isinstance(attr, type):
            return attr

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                self.calls[name] = self.calls.get(name, 0) + 1
        return timed


def start_child(gib: float) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", ALLOCATE, str(gib)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = child.stdout.readline().strip()
    if line != "ready":
        raise SystemExit(f"the allocating child did not get ready (said {line!r})")
    print(f"child pid {child.pid} holds {gib} GiB on the GPU", flush=True)
    return child


def time_ticks(collector: GpuCollector, ticks: int) -> list[float]:
    durations = []
    for _ in range(ticks):
        start = time.perf_counter()
        collector.sample_once()
        durations.append(time.perf_counter() - start)
    return durations


def summarize(durations: list[float], gpus: int) -> dict:
    us = sorted(d * 1e6 for d in durations)
    return {
        "ticks": len(us),
        "gpus": gpus,
        "median_us_per_tick": round(statistics.median(us), 1),
        "p90_us_per_tick": round(us[int(len(us) * 0.9)], 1),
        "max_us_per_tick": round(us[-1], 1),
        "median_us_per_tick_per_gpu": round(statistics.median(us) / gpus, 1),
    }


def call_breakdown(nvml: Any, root_pid: int, config: GpuConfig, ticks: int) -> list[dict]:
    """Run ticks through TimedNvml (XID thread off: it is not part of a tick)."""
    timed = TimedNvml(nvml)
    config.xid_events = False
    collector = GpuCollector(config, root_pid=root_pid, nvml=timed)
    collector.sample_once()  # open: init, enumeration, first /proc scan
    timed.seconds.clear()
    timed.calls.clear()
    time_ticks(collector, ticks)
    collector.stop()
    rows = [{"call": name,
             "calls_per_tick": round(timed.calls[name] / ticks, 2),
             "us_per_call": round(seconds / timed.calls[name] * 1e6, 2),
             "us_per_tick": round(seconds / ticks * 1e6, 2)}
            for name, seconds in timed.seconds.items() if name != "nvmlShutdown"]
    return sorted(rows, key=lambda row: -row["us_per_tick"])


def regular_config() -> GpuConfig:
    """The default call set, with the slow group kept out of the timed ticks."""
    return GpuConfig(slow_interval_seconds=1e9)


def slow_every_tick_config() -> GpuConfig:
    """The default call set plus the slow group on every tick (one GPU: every tick)."""
    return GpuConfig(interval_seconds=1e-9, slow_interval_seconds=1e-9)


def pcie_cost(nvml: Any, repeats: int = 5) -> float:
    """nvmlDeviceGetPcieThroughput (opt-in, kept off every tick) timed alone on GPU 0."""
    nvml.nvmlInit()
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(0)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            nvml.nvmlDeviceGetPcieThroughput(handle, nvml.NVML_PCIE_UTIL_TX_BYTES)
            times.append(time.perf_counter() - start)
        return round(statistics.median(times) * 1e6, 1)
    finally:
        nvml.nvmlShutdown()


def gpu_processes(nvml: Any, collector: GpuCollector) -> list[dict]:
    """Every compute process NVML lists, with the owner the collector gives its pid."""
    nvml.nvmlInit()
    try:
        rows = []
        for index in range(nvml.nvmlDeviceGetCount()):
            procs = nvml.nvmlDeviceGetComputeRunningProcesses(
                nvml.nvmlDeviceGetHandleByIndex(index))
            is_engine = collector.engine_processes.owners(proc.pid for proc in procs)
            rows.extend({"gpu": index, "pid": proc.pid, "bytes": proc.usedGpuMemory,
                         "owner": "engine" if is_engine[proc.pid] else "other"}
                        for proc in procs)
        return rows
    finally:
        nvml.nvmlShutdown()


def attribution(exposition: str) -> dict[str, float]:
    """owner -> bytes, summed over GPUs, from vllm_gpu_process_memory_used_bytes lines."""
    owners: dict[str, float] = {}
    for line in exposition.splitlines():
        if line.startswith("vllm_gpu_process_memory_used_bytes{"):
            owner = line.split('owner="', 1)[1].split('"', 1)[0]
            owners[owner] = owners.get(owner, 0.0) + float(line.rsplit(" ", 1)[1])
    return owners


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=2000, help="regular ticks to time")
    parser.add_argument("--slow-ticks", type=int, default=50,
                        help="ticks to time with the slow group in each")
    parser.add_argument("--fake", action="store_true", help="replay the recording, even on a GPU")
    parser.add_argument("--child-alloc-gib", type=float, default=0.0)
    parser.add_argument("--expect-other-gib", type=float, default=0.0,
                        help="fail unless owner=other holds at least this much")
    parser.add_argument("--budget-ratio", type=float, default=0.9)
    parser.add_argument("--exposition", metavar="PATH")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()

    nvml, kind = real_or_fake_nvml(args.fake)
    print(f"{kind}; root pid {os.getpid()}", flush=True)
    child = start_child(args.child_alloc_gib) if args.child_alloc_gib else None
    root = os.getpid()
    try:
        collector = GpuCollector(regular_config(), root_pid=root, nvml=nvml)
        start = time.perf_counter()
        collector.sample_once()  # NVML init, enumeration, first slow group, /proc scan
        first_tick_us = (time.perf_counter() - start) * 1e6
        collector.set_memory_budget_ratio(args.budget_ratio)
        registry = _registry(collector)
        gpus = max(1, sum(1 for line in generate_latest(registry).decode().splitlines()
                          if line.startswith("vllm_gpu_up{")))
        regular = summarize(time_ticks(collector, args.ticks), gpus)
        start = time.perf_counter()
        exposition = generate_latest(registry).decode()
        scrape_us = (time.perf_counter() - start) * 1e6
        collector.stop()

        slow_collector = GpuCollector(slow_every_tick_config(), root_pid=root, nvml=nvml)
        slow_collector.sample_once()
        slow = summarize(time_ticks(slow_collector, args.slow_ticks), gpus)
        slow_collector.stop()

        regular_calls = call_breakdown(nvml, root, regular_config(), max(args.ticks // 4, 1))
        slow_calls = call_breakdown(nvml, root, slow_every_tick_config(), args.slow_ticks)
        processes = gpu_processes(nvml, collector)
        pcie = pcie_cost(nvml) if kind == "real NVML" else None
    finally:
        if child is not None:
            child.stdin.close()
            child.wait(timeout=30)

    defaults = GpuConfig()
    slow_group_us = slow["median_us_per_tick"] - regular["median_us_per_tick"]
    report = {
        "nvml": kind, "first_tick_us": round(first_tick_us, 1),
        "regular": regular, "slow_every_tick": slow,
        "slow_group_us_per_gpu": round(slow_group_us, 1),
        "busy_us_per_second_per_gpu": round(
            regular["median_us_per_tick_per_gpu"] / defaults.interval_seconds
            + slow_group_us / defaults.slow_interval_seconds, 1),
        "scrape_us": round(scrape_us, 1),
        "regular_calls": regular_calls, "slow_calls": slow_calls, "pcie_us_per_call": pcie,
        "processes": processes, "attribution_bytes": attribution(exposition)}
    _print_report(report)
    if args.exposition:
        Path(args.exposition).write_text(exposition)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return _check_attribution(report, args.child_alloc_gib, args.expect_other_gib)


def _registry(collector: GpuCollector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def _print_report(report: dict) -> None:
    regular, slow = report["regular"], report["slow_every_tick"]
    print(f"first tick (NVML init, enumeration, slow group, /proc scan): "
          f"{report['first_tick_us']:.0f} us")
    print(f"default tick: {regular['ticks']} ticks on {regular['gpus']} GPU(s): median "
          f"{regular['median_us_per_tick']} us/tick, p90 {regular['p90_us_per_tick']} us, max "
          f"{regular['max_us_per_tick']} us; median per GPU {regular['median_us_per_tick_per_gpu']}"
          f" us")
    print(f"tick with the slow group: {slow['ticks']} ticks: median {slow['median_us_per_tick']}"
          f" us/tick, p90 {slow['p90_us_per_tick']} us; slow group alone "
          f"{report['slow_group_us_per_gpu']} us per GPU")
    print(f"with the defaults (1 s ticks, slow group every 5 s): "
          f"{report['busy_us_per_second_per_gpu']} us of sampler time per second per GPU")
    print(f"one scrape (render only): {report['scrape_us']:.0f} us")
    for title, rows in (("default tick", report["regular_calls"]),
                        ("tick with the slow group", report["slow_calls"])):
        print(f"NVML calls in a {title} (through a timing wrapper):")
        print(f"  {'call':45s} {'calls/tick':>10s} {'us/call':>9s} {'us/tick':>9s}")
        for row in rows:
            print(f"  {row['call']:45s} {row['calls_per_tick']:10.2f} {row['us_per_call']:9.2f} "
                  f"{row['us_per_tick']:9.2f}")
    if report["pcie_us_per_call"] is not None:
        print(f"nvmlDeviceGetPcieThroughput (opt-in): {report['pcie_us_per_call']} us per call")
    for proc in report["processes"]:
        print(f"NVML process: gpu {proc['gpu']} pid {proc['pid']} {proc['bytes']} bytes "
              f"-> owner={proc['owner']}")
    for owner, value in sorted(report["attribution_bytes"].items()):
        print(f"vllm_gpu_process_memory_used_bytes owner={owner}: {value / GIB:.2f} GiB")


def _check_attribution(report: dict, engine_gib: float, other_gib: float) -> int:
    owners = report["attribution_bytes"]
    failed = []
    if engine_gib and owners.get("engine", 0) < engine_gib * GIB:
        failed.append(f"engine holds {owners.get('engine', 0) / GIB:.2f} GiB < {engine_gib}")
    if other_gib and owners.get("other", 0) < other_gib * GIB:
        failed.append(f"other holds {owners.get('other', 0) / GIB:.2f} GiB < {other_gib}")
    for problem in failed:
        print(f"ATTRIBUTION FAILED: {problem}")
    if (engine_gib or other_gib) and not failed:
        print("ATTRIBUTION OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
