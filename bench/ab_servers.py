"""Start (or stop) the servers that bench_overhead compares, each the same engine with the same
flags: vLLM alone (no plugin), plugin mode (`vllm`'s own server with our stat logger loaded
from the entry point) and the daemon. Comparing plugin mode with vLLM alone isolates what our
stat logger and metrics process cost; the daemon against plugin mode, what the daemon's way of
running vLLM's server adds.

The servers outlive this command (each in a session of its own, pids in --state), so that a
later command, or a later call on a GPU machine, can run the load against them:

    python -m bench.ab_servers start --model /tmp/llama2-7b-shape \\
        --engine load_format=dummy --engine max_model_len=2048 \\
        --engine gpu_memory_utilization=0.30 --engine kv_cache_memory_bytes=10737418240
    python -m bench.bench_overhead --attach 8000 9410 8001 --also "plugin mode=8002" ...
    python -m bench.ab_servers stop

`kv_cache_memory_bytes` gives every engine the same KV cache whatever the others on the GPU
hold (vLLM's profiling otherwise counts them), which also lets the servers start at the same
time (`--parallel`). Ports: daemon API 8000 / metrics 9410, vLLM alone 8001, plugin mode API
8002 / metrics 9420.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from exporter.engine_settings import SETTABLE
from testsupport.processes import start_group, wait_url

SERVERS = {
    # name: (API port, metrics port of ours or None)
    "daemon": (8000, 9410),
    "alone": (8001, None),
    "plugin": (8002, 9420),
}
ENTRY_POINT = "[vllm.stat_logger_plugins]\nvllm_exporter = exporter.plugin:ExporterStatLogger\n"


def vllm_flags(settings: dict[str, str]) -> list[str]:
    return [arg for name, value in settings.items()
            for arg in ("--" + name.replace("_", "-"), value)]


def entry_point_path(state: Path) -> str | None:
    """A folder that makes our entry point visible, where the package is not installed (a
    copy of the tree on a GPU machine); None where it is."""
    found = importlib.metadata.entry_points(group="vllm.stat_logger_plugins")
    if any(e.value.startswith("exporter.plugin") for e in found):
        return None
    info = state / "entry-point" / "vllm_exporter-0.0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-exporter\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text(ENTRY_POINT)
    return str(info.parent)


def commands(name: str, model: str, settings: dict[str, str], state: Path,
             config: str | None) -> tuple[list[str], dict[str, str], str]:
    """(argv, environment, readiness URL) of one server."""
    api, metrics = SERVERS[name]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parent.parent)
    vllm = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--host", "127.0.0.1", "--port", str(api), *vllm_flags(settings)]
    if name == "alone":
        # Our package out of sight: no entry point, nothing importable.
        env["VLLM_PLUGINS"] = "none"
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and
            Path(p).resolve() != Path(root))
        return vllm, env, f"http://127.0.0.1:{api}/health"
    if name == "plugin":
        extra = entry_point_path(state)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, root, env.get("PYTHONPATH"))
                                            if p)
        env["VLLM_EXPORTER_METRICS_PORT"] = str(metrics)
        if config:
            env["VLLM_EXPORTER_CONFIG"] = config
        return vllm, env, f"http://127.0.0.1:{metrics}/-/ready"
    # The daemon's own flags where it has one (it refuses a second value through
    # --engine-arg), --engine-arg for the rest.
    own = {s.name: s.flag for s in SETTABLE}
    argv = [sys.executable, "-m", "exporter", "serve", "--model", model,
            "--port", str(api), "--metrics-port", str(metrics),
            *(arg for k, v in settings.items()
              for arg in ((own[k], v) if k in own else (f"--engine-arg={k}={v}",)))]
    if config:
        argv += ["--config", config]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return argv, env, f"http://127.0.0.1:{metrics}/-/ready"


def kv_cache_line(log: Path) -> str:
    """vLLM's own line on the KV cache it allocated."""
    text = log.read_text(errors="replace") if log.exists() else ""
    found = re.findall(r"KV cache size: [\d,]+ tokens", text)
    return found[-1] if found else "no KV cache line"


def launch(name: str, argv: list[str], env: dict[str, str], state: Path) -> subprocess.Popen:
    process = start_group(argv, state / f"{name}.log", env, cwd=Path(tempfile.gettempdir()))
    (state / f"{name}.pid").write_text(str(process.pid))
    return process


def wait_ready(name: str, process: subprocess.Popen, url: str, started: float,
               deadline: float, state: Path) -> bool:
    log = state / f"{name}.log"
    try:
        wait_url(url, process, max(0.0, deadline - time.time()), log, what=name, interval=1)
    except (RuntimeError, AssertionError) as exc:  # exited, or not ready in time
        print(f"{name}: {exc}", flush=True)
        return False
    print(f"{name}: ready in {time.time() - started:.1f} s ({url}); {kv_cache_line(log)}",
          flush=True)
    return True


def start(args: argparse.Namespace) -> int:
    state = Path(args.state)
    state.mkdir(parents=True, exist_ok=True)
    settings = dict(item.split("=", 1) for item in args.engine)
    deadline = time.time() + args.timeout
    ok = True
    pending = []
    for name in args.servers:
        argv, env, url = commands(name, args.model, settings, state, args.config)
        started = time.time()
        process = launch(name, argv, env, state)
        print(f"{name}: pid {process.pid}: {' '.join(argv)}", flush=True)
        if args.parallel:
            pending.append((name, process, url, started))
        else:
            ok = wait_ready(name, process, url, started, deadline, state) and ok
    for name, process, url, started in pending:
        ok = wait_ready(name, process, url, started, deadline, state) and ok
    return 0 if ok else 1


def stop(args: argparse.Namespace) -> int:
    state = Path(args.state)
    for name in SERVERS:
        pid_file = state / f"{name}.pid"
        if not pid_file.exists():
            continue
        pid = int(pid_file.read_text())
        started = time.time()
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            print(f"{name}: already gone")
            pid_file.unlink()
            continue
        while time.time() - started < 60:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.killpg(pid, signal.SIGKILL)
        print(f"{name}: stopped in {time.time() - started:.1f} s")
        pid_file.unlink()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("start")
    up.add_argument("--model", required=True)
    up.add_argument("--engine", action="append", default=[], metavar="NAME=VALUE",
                    help="an engine setting every server gets (vLLM's flag name with _)")
    up.add_argument("--servers", nargs="+", default=["alone", "plugin", "daemon"],
                    choices=list(SERVERS))
    up.add_argument("--config", help="our config file for plugin mode and the daemon")
    up.add_argument("--parallel", action="store_true",
                    help="start all at once (only with kv_cache_memory_bytes set)")
    up.add_argument("--timeout", type=float, default=540)
    for p in (up, sub.add_parser("stop")):
        p.add_argument("--state", default=os.path.join(tempfile.gettempdir(), "ab-servers"))
    args = parser.parse_args()
    return start(args) if args.command == "start" else stop(args)


if __name__ == "__main__":
    sys.exit(main())
