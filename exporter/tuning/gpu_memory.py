"""`tune gpu-memory`: bisection over a memory knob, one engine per candidate, each in a child.

Every candidate starts a whole daemon (`python -m exporter serve`) in its own process group,
waits for it to be ready, verifies it under a short real load, reads the KV-cache capacity it
exports, and stops it. An out-of-memory failure (or any start failure) kills only that child;
the parent never imports vLLM or touches the device.

The search assumes what the guide assumes: settings up to some limit work, settings above it do
not. It tries the high end first (done if it survives), then the low end (nothing to find if
it fails), then halves the interval between the highest survivor and the lowest failure until
it is narrower than the tolerance or the start budget is spent.

Knobs: gpu_memory_utilization (the engine flag; on GPUs the fraction of device memory, on the
CPU build the fraction of the NUMA node's memory) and kv_cache_space_gib (the CPU build's
VLLM_CPU_KVCACHE_SPACE, whole GiB, which overrides gpu_memory_utilization there).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from . import daemon_view
from .bench import run_bench, served_model
from .errors import UsageError
from .loadgen import LoadSpec
from .report import size, table
from .workload import Workload

STOP_TIMEOUT = 60.0


@dataclass(frozen=True)
class Knob:
    name: str
    integer: bool
    minimum: float
    maximum: float | None
    default_tolerance: float


KNOBS = {
    "gpu_memory_utilization": Knob("gpu_memory_utilization", False, 0.01, 1.0, 0.02),
    "kv_cache_space_gib": Knob("kv_cache_space_gib", True, 1, None, 1),
}


@dataclass
class Candidate:
    value: float
    survived: bool = False
    stage: str = ""  # where it ended: start, load, ok
    reason: str = ""
    capacity_tokens: float | None = None
    capacity_bytes: float | None = None
    requests_ok: int = 0
    start_seconds: float | None = None  # launch -> ready
    seconds: float | None = None  # launch -> stopped
    log: str = ""


@dataclass
class SearchSettings:
    knob: Knob
    low: float
    high: float
    tolerance: float
    max_starts: int = 8
    base_config: dict = field(default_factory=dict)
    start_timeout: float = 600.0
    verify_requests: int = 16
    verify_concurrency: int = 8
    log_dir: Path | None = None
    progress: bool = True


def check_settings(s: SearchSettings) -> None:
    k = s.knob
    if not k.minimum <= s.low < s.high:
        raise UsageError(f"--low/--high: need {k.minimum} <= low < high, got {s.low}, {s.high}")
    if k.maximum is not None and s.high > k.maximum:
        raise UsageError(f"--high: {k.name} is at most {k.maximum}, got {s.high}")
    if k.integer and (s.low != int(s.low) or s.high != int(s.high)):
        raise UsageError(f"{k.name} takes whole numbers (GiB)")
    if s.tolerance <= 0 or s.max_starts < 2:
        raise UsageError("--tolerance must be > 0 and --max-starts >= 2")


def search(settings: SearchSettings, workload: Workload) -> dict:
    check_settings(settings)
    tried: list[Candidate] = []

    def attempt(value: float) -> bool:
        _say(settings, f"starting an engine with {settings.knob.name}={_fmt(value)} "
                       f"({len(tried) + 1} of at most {settings.max_starts})")
        candidate = run_candidate(value, settings, workload, len(tried))
        tried.append(candidate)
        _say(settings, f"{settings.knob.name}={_fmt(value)}: "
                       + ("survived" if candidate.survived else f"failed ({candidate.reason})"))
        return candidate.survived

    good = bad = None
    if attempt(settings.high):
        good = settings.high
    elif attempt(settings.low):
        good, bad = settings.low, settings.high
        while bad - good > settings.tolerance and len(tried) < settings.max_starts:
            middle = _middle(good, bad, settings.knob)
            if middle in (good, bad):
                break
            if attempt(middle):
                good = middle
            else:
                bad = middle
    else:
        bad = settings.low
    best = next((c for c in tried if c.survived and c.value == good), None)
    return {
        "knob": settings.knob.name,
        "low": settings.low, "high": settings.high, "tolerance": settings.tolerance,
        "candidates": [asdict(c) for c in tried],
        "best": asdict(best) if best else None,
        "lowest_failure": bad,
        "converged": good is not None and (bad is None or bad - good <= settings.tolerance),
    }


def _middle(good: float, bad: float, knob: Knob) -> float:
    if knob.integer:
        return float((int(good) + int(bad)) // 2)
    return round((good + bad) / 2, 4)


def _fmt(value: float) -> str:
    return f"{value:g}"


def _say(settings: SearchSettings, text: str) -> None:
    if settings.progress:
        print(f"tune gpu-memory: {text}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def candidate_config(base: dict, knob: Knob, value: float, api_port: int,
                     metrics_port: int) -> tuple[dict, dict[str, str]]:
    """The child's config and environment for one candidate value."""
    config = yaml.safe_load(yaml.safe_dump(base)) or {}  # a deep copy
    config.setdefault("api", {}).update({"host": "127.0.0.1", "port": api_port})
    config.setdefault("metrics", {}).update({"host": "127.0.0.1", "port": metrics_port})
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if knob.name == "gpu_memory_utilization":
        config.setdefault("engine", {})["gpu_memory_utilization"] = float(value)
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override the fraction on CPU
    else:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(int(value))
    return config, env


def run_candidate(value: float, settings: SearchSettings, workload: Workload,
                  number: int) -> Candidate:
    candidate = Candidate(value)
    api_port, metrics_port = _free_port(), _free_port()
    config, env = candidate_config(settings.base_config, settings.knob, value, api_port,
                                   metrics_port)
    work = Path(tempfile.mkdtemp(prefix="vllm-exporter-tune-"))
    log_dir = settings.log_dir or work
    log_dir.mkdir(parents=True, exist_ok=True)
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = log_dir / f"candidate-{number}-{_fmt(value)}.log"
    candidate.log = str(log_path)
    started = time.monotonic()
    with open(log_path, "wb") as log_file:
        child = subprocess.Popen([sys.executable, "-m", "exporter", "serve", "--config",
                                  str(config_path)], stdout=log_file, stderr=subprocess.STDOUT,
                                 env=env, start_new_session=True)
    try:
        if not _wait_ready(child, metrics_port, settings.start_timeout):
            candidate.stage = "start"
            candidate.reason = (_failure_reason(log_path) if child.poll() is not None
                                else f"not ready after {settings.start_timeout:.0f} s")
            return candidate
        candidate.start_seconds = time.monotonic() - started
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        snapshot = daemon_view.scrape(metrics_url)
        candidate.capacity_tokens = snapshot.value("vllm_kv_cache_capacity_tokens")
        candidate.capacity_bytes = snapshot.value("vllm_kv_cache_capacity_bytes")
        api_url = f"http://127.0.0.1:{api_port}"
        # Ready means the API socket listens; on a busy machine its app can take a while
        # longer to answer the first request.
        model = _wait_for_api(api_url, child, settings.start_timeout)
        report = run_bench(api_url, None, workload, model=model,
                           load=LoadSpec(concurrency=settings.verify_concurrency,
                                         requests=settings.verify_requests),
                           progress=settings.progress, label=f"verify {_fmt(value)}")
        candidate.requests_ok = report["client"]["requests_ok"]
        alive = child.poll() is None and _ready(metrics_port)
        candidate.stage = "load"
        if report["client"]["requests_failed"] or not alive:
            candidate.reason = ("the engine died under load: " + _failure_reason(log_path)
                                if not alive else
                                f"{report['client']['requests_failed']} requests failed: "
                                + "; ".join(report["client"]["errors"]))
            return candidate
        candidate.stage, candidate.survived = "ok", True
        return candidate
    except UsageError as exc:  # the child's API or metrics went away mid-check
        candidate.stage = candidate.stage or "load"
        candidate.reason = str(exc)
        return candidate
    finally:
        _stop(child)
        candidate.seconds = round(time.monotonic() - started, 1)


def _wait_for_api(api_url: str, child: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return served_model(api_url, timeout=30.0)
        except UsageError:
            if child.poll() is not None or time.monotonic() >= deadline:
                raise
            time.sleep(1.0)


def _ready(metrics_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/-/ready",
                                    timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def _wait_ready(child: subprocess.Popen, metrics_port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            return False
        if _ready(metrics_port):
            return True
        time.sleep(1.0)
    return False


def _stop(child: subprocess.Popen) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever is left."""
    try:
        os.killpg(child.pid, signal.SIGTERM)
        child.wait(STOP_TIMEOUT)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


# Root causes first: vLLM's last error line is usually "Engine core initialization failed.
# See root cause above", which explains nothing.
ROOT_CAUSE = re.compile(r"((OutOfMemoryError|MemoryError|ValueError|CUDA error)\b.*"
                        r"|\w*Error: .*memory.*|.*out of memory.*)", re.IGNORECASE)
ANY_ERROR = re.compile(r"(\w*(Error|Exception)\b.*|vllm-exporter: .*)")


def _failure_reason(log_path: Path) -> str:
    """The most telling error line of the child's log."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    for pattern in (ROOT_CAUSE, ANY_ERROR):
        for line in reversed(lines):
            match = pattern.search(line)
            if match and "Traceback" not in line:
                return _unwrap(match.group(0).strip())[:300]
    return lines[-1].strip()[:300] if lines else "exited without output"


def _unwrap(reason: str) -> str:
    """vLLM re-raises a worker's error as "...Worker failed with error '<the error>', ..."."""
    inner = re.search(r"failed with error '(.+?)'(,|$)", reason)
    return inner.group(1) if inner else reason


def format_search(result: dict) -> str:
    rows = [[_fmt(c["value"]), "yes" if c["survived"] else "no", c["stage"],
             int(c["capacity_tokens"]) if c["capacity_tokens"] is not None else None,
             size(c["capacity_bytes"]) if c["capacity_bytes"] else None, c["seconds"],
             c["reason"][:120] or "-"] for c in result["candidates"]]
    lines = [table([result["knob"], "survived", "stage", "KV tokens", "KV size", "seconds",
                    "reason"], rows, text_columns=(1, 2, 6))]
    best = result["best"]
    if best is None:
        lines.append(f"no candidate survived, not even {result['knob']}={_fmt(result['low'])}")
    else:
        lines.append(f"highest surviving {result['knob']}: {_fmt(best['value'])} "
                     f"(KV cache {int(best['capacity_tokens'] or 0):,} tokens"
                     + (f", {size(best['capacity_bytes'])})" if best["capacity_bytes"] else ")"))
        if not result["converged"]:
            lines.append(f"the start budget ran out: the limit lies between "
                         f"{_fmt(best['value'])} and {_fmt(result['lowest_failure'])}")
    return "\n".join(lines)
