"""`profile`: a PyTorch profiler trace of the running engine, through vLLM's own hooks.

vLLM's API server has POST /start_profile and /stop_profile when its engine was started with a
profiler config (`--profiler-config '{"profiler": "torch", "torch_profiler_dir": DIR}'`; with
this daemon: engine.extra_args.profiler_config in the config file). The engine worker and the
API front end then write gzipped Chrome traces named after the session's prefix into DIR, on
the daemon's host. This command starts a session with a unique prefix (bounded to
--max-steps engine steps so a busy engine cannot write a trace of unbounded size), optionally
drives load, stops it, waits for the files and copies them out as plain Chrome trace JSON
(open them in chrome://tracing or ui.perfetto.dev). The engine keeps serving throughout.

Who can trigger it: the routes live on the API port only; the metrics port (what Prometheus
scrapes) exposes nothing that starts a profile. vLLM's --api-key does NOT cover these routes
(its middleware guards /v1 paths only); api_middleware.ProfileGuard is the middleware that
does. `probe_guard` reports whether the routes answer without a token, and the command sends
`Authorization: Bearer TOKEN` when given one.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

from .bench import run_bench, served_model
from .errors import UsageError
from .loadgen import LoadSpec
from .workload import Workload

NOT_ENABLED = ("the engine was started without a profiler, so the API has no /start_profile: "
               "start the daemon with engine.extra_args.profiler_config: {profiler: torch, "
               "torch_profiler_dir: /absolute/dir, torch_profiler_with_stack: false} "
               "(see docs/tuning.md)")


def _post(url: str, body: dict | None, token: str | None, timeout: float = 600.0) -> int:
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError) as exc:
        raise UsageError(f"{url} is not reachable: {getattr(exc, 'reason', exc)}") from None


def probe_guard(api_url: str) -> str:
    """'disabled', 'guarded' or 'open', with a request that cannot start anything.

    A start request whose body fails validation: a guard rejects it first (401/403), an
    unguarded route rejects the body (422), a server without the route says 404.
    """
    status = _post(api_url.rstrip("/") + "/start_profile", {"profile_prefix": 0}, None, 30)
    if status == 404:
        return "disabled"
    if status in (401, 403):
        return "guarded"
    return "open"


def run_profile(api_url: str, trace_dir: str, out_dir: str, seconds: float, *,
                token: str | None = None, api_key: str | None = None, max_steps: int = 200,
                load_concurrency: int = 0, workload: Workload | None = None,
                wait_timeout: float = 300.0, progress: bool = True) -> dict:
    if seconds <= 0:
        raise UsageError(f"--seconds must be > 0, got {seconds}")
    if max_steps < 0:
        raise UsageError(f"--max-steps must be >= 0, got {max_steps}")
    traces = Path(trace_dir)
    if not traces.is_dir():
        raise UsageError(f"--trace-dir {trace_dir} is not a directory on this host: it must be "
                         "the daemon's torch_profiler_dir")
    model = served_model(api_url, api_key)
    guard = probe_guard(api_url)
    if guard == "disabled":
        raise UsageError(NOT_ENABLED)
    base = api_url.rstrip("/")
    prefix = f"vllm-exporter-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    body = {"profile_prefix": prefix}
    if max_steps:
        body["max_iterations"] = max_steps
    status = _post(base + "/start_profile", body, token)
    if status == 401:
        raise UsageError("the daemon refused to start a profile (401): give the right --token "
                         "(or VLLM_EXPORTER_PROFILE_TOKEN)")
    if status == 403:
        raise UsageError("the daemon refuses every profiling request (403): it has no "
                         "profiling token configured (VLLM_EXPORTER_PROFILE_TOKEN)")
    if status != 200:
        raise UsageError(f"POST /start_profile answered {status}; is a profile already running?")
    requests_ok = 0
    try:
        if load_concurrency and workload is not None:
            report = run_bench(api_url, None, workload,
                               LoadSpec(concurrency=load_concurrency, duration=seconds),
                               model=model, api_key=api_key, progress=progress,
                               label="profile load")
            requests_ok = report["client"]["requests_ok"]
        else:
            time.sleep(seconds)
    finally:
        stop_status = _post(base + "/stop_profile", None, token)
    if stop_status != 200:
        raise UsageError(f"POST /stop_profile answered {stop_status}")
    files = _wait_for_traces(traces, prefix, wait_timeout)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for source in files:
        target = out / source.name.removesuffix(".gz")
        events = _copy_trace(source, target)
        written.append({"path": str(target), "source": str(source), "events": events,
                        "bytes": target.stat().st_size})
    return {"model": model, "prefix": prefix, "seconds": seconds, "max_steps": max_steps,
            "guard": guard, "requests_during_profile": requests_ok, "traces": written}


def _is_trace(path: Path, prefix: str) -> bool:
    return path.name.startswith(prefix + "_") and ".pt.trace.json" in path.name


def _wait_for_traces(trace_dir: Path, prefix: str, timeout: float) -> list[Path]:
    """The session's trace files once complete (the engine writes them after the stop).

    A file is tried only once its size has not changed for one poll, then parsed.
    """
    deadline = time.monotonic() + timeout
    sizes: dict[Path, int] = {}
    while time.monotonic() < deadline:
        found = sorted(p for p in trace_dir.iterdir() if _is_trace(p, prefix))
        current = {p: p.stat().st_size for p in found}
        settled = found and all(sizes.get(p) == n > 0 for p, n in current.items())
        if settled and _has_engine_trace(found) and all(_complete(p) for p in found):
            return found
        sizes = current
        time.sleep(1.0)
    raise UsageError(f"no complete trace for {prefix} in {trace_dir} after {timeout:.0f} s "
                     "(is --trace-dir the daemon's torch_profiler_dir?)")


def _has_engine_trace(found: list[Path]) -> bool:
    """The front end's trace comes first; wait for the engine worker's (rankN) too."""
    return any("async_llm" not in p.name for p in found)


def _complete(path: Path) -> bool:
    try:
        _load(path)
        return True
    except (OSError, EOFError, ValueError):
        return False


def _load(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def _copy_trace(source: Path, target: Path) -> int:
    """Write the trace uncompressed; returns its number of events."""
    data = _load(source)
    if source.suffix == ".gz":
        with gzip.open(source, "rb") as f_in, open(target, "wb") as f_out:
            shutil.copyfileobj(f_in, f_out)
    else:
        shutil.copyfile(source, target)
    return len(data.get("traceEvents", []))
