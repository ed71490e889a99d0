"""CPU per request: the daemon and plugin mode against vLLM alone, one server at a time, on the
same load.

Starts vLLM's own OpenAI server (no plugin loaded), the same server with our stat logger loaded
from the entry point (plugin mode) and the daemon in turn on the embedded model;
for each, `--clients` threads send completions back to back for `--seconds` while a scraper GETs
its /metrics once a second, and the script reads the CPU time of the API-server process (vLLM's
front end; in plugin mode and the daemon also our stat logger and shard writer), of the engine
core and of our metrics process from /proc. Prints requests served and CPU per request for each:
with the servers measured one at a time, the CPU each process spends per request is steadier on
a small machine than throughput side by side.

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python -m bench.bench_cpu_per_request [--seconds 30] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

from testsupport.net import free_port
from testsupport.processes import engine_core_pids, start_group, stop_group, wait_url

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / TICK


def metrics_process_pids(server_pid: int) -> list[int]:
    """Our metrics process, which names the process it serves in --root-pid: the daemon's
    child, or in plugin mode the process the front end started and detached (a session of
    its own, so no descendant of the server)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            command = b"\0".join(argv)
            if b"exporter.metrics_process" in argv and \
                    f"--root-pid\0{server_pid}\0".encode() in command:
                found.append(int(entry.name))
    return found


def drive(api_url: str, metrics_url: str, model: str, clients: int, seconds: float) -> int:
    """Completions from `clients` threads for `seconds`, a scrape a second; requests served."""
    served = [0] * clients
    end = time.monotonic() + seconds

    def client(i: int) -> None:
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < end:
                http.post(f"{api_url}/v1/completions", json={
                    "model": model, "prompt": f"client {i} " + "hello world " * 20,
                    "max_tokens": 48, "ignore_eos": True}).raise_for_status()
                served[i] += 1

    def scraper() -> None:
        with httpx.Client(timeout=10) as http:
            while time.monotonic() < end:
                http.get(metrics_url)
                time.sleep(1)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    threads.append(threading.Thread(target=scraper))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(served)


def measure(name: str, command: list[str], env: dict, api: int, metrics_url: str | None,
            args, log: Path) -> dict:
    process = start_group(command, log, env)
    try:
        api_url = f"http://127.0.0.1:{api}"
        wait_url(api_url + "/health", process, 600, log, what=name)
        drive(api_url, metrics_url or api_url + "/metrics", args.model, args.clients, 3)  # warm
        groups = {"front end": [process.pid], "engine": engine_core_pids(process.pid),
                  "metrics process": metrics_process_pids(process.pid)}
        before = {group: cpu_seconds(pids) for group, pids in groups.items()}
        requests = drive(api_url, metrics_url or api_url + "/metrics", args.model,
                         args.clients, args.seconds)
        used = {group: cpu_seconds(pids) - before[group] for group, pids in groups.items()}
        return {"name": name, "requests": requests,
                **{group: seconds / max(1, requests) * 1e3 for group, seconds in used.items()}}
    finally:
        stop_group(process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from exporter.default_model import SERVED_NAME, ensure_default_model

    model_dir = str(ensure_default_model())
    args.model = SERVED_NAME
    tmp = Path(tempfile.mkdtemp(prefix="bench-cpu-per-request-"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    servers = ["vLLM alone", "plugin mode", "daemon"]
    rows = []
    for n in range(args.rounds):
        shift = n % len(servers)  # each server takes each place in the order in turn
        for who in servers[shift:] + servers[:shift]:
            api, metrics = free_port(), free_port()
            vllm = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                    "--model", model_dir, "--served-model-name", SERVED_NAME,
                    "--host", "127.0.0.1", "--port", str(api)]
            metrics_url = f"http://127.0.0.1:{metrics}/metrics"
            log = tmp / f"{who.split()[0]}-{n}.log"
            if who == "vLLM alone":
                row = measure(who, vllm, dict(env, VLLM_PLUGINS="none"), api, None, args, log)
            elif who == "plugin mode":
                row = measure(who, vllm, dict(env, VLLM_EXPORTER_METRICS_PORT=str(metrics)), api,
                              metrics_url, args, log)
            else:
                config = tmp / f"daemon-{n}.yaml"
                config.write_text(yaml.safe_dump({
                    "api": {"host": "127.0.0.1", "port": api},
                    "metrics": {"host": "127.0.0.1", "port": metrics}}))
                row = measure(who, [sys.executable, "-m", "exporter", "serve", "--config",
                                    str(config)], env, api, metrics_url, args, log)
            rows.append(row)
            print(f"round {n} {who:<11} {row['requests']:>6} requests  front end "
                  f"{row['front end']:.2f} ms  engine {row['engine']:.2f} ms  metrics process "
                  f"{row['metrics process']:.3f} ms per request", flush=True)
    print(f"\n{args.clients} clients, {args.seconds:g} s per round, a scrape a second; CPU ms "
          f"per request (means over {args.rounds} rounds)")
    print(f"{'server':<12}{'requests':>10}{'front end':>11}{'engine':>9}{'metrics proc.':>15}")
    means = {}
    for who in servers:
        mine = [r for r in rows if r["name"] == who]
        means[who] = {key: sum(r[key] for r in mine) / len(mine)
                      for key in ("requests", "front end", "engine", "metrics process")}
        m = means[who]
        print(f"{who:<12}{m['requests']:>10.0f}{m['front end']:>11.2f}{m['engine']:>9.2f}"
              f"{m['metrics process']:>15.3f}")
    alone = means["vLLM alone"]
    for who in servers[1:]:
        print(f"{who} / vLLM alone: requests {means[who]['requests'] / alone['requests']:.3f}, "
              f"front-end CPU per request {means[who]['front end'] / alone['front end']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
