"""A real Prometheus on loopback, a fake-NVML GPU collector served over HTTP, and load.

- `Prometheus`: runs the `prometheus` binary (Debian's package) on a free port with a config
  written here, and answers instant and range queries through its HTTP API.
- `serve_fake_gpu()`: the real `exporter.gpu.GpuCollector`, fed by tests/fake_pynvml.py's
  recording of an H200, in its own registry on its own port: the GPU panels' data without a GPU
  and without a second engine.
- `Load`: requests against the daemon's OpenAI API from a background thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry, start_http_server

from helpers import BackgroundLoad, abandoned_request, free_port, http_get, wait_for

PROMETHEUS = shutil.which("prometheus")


class PrometheusError(AssertionError):
    pass


@dataclass
class Prometheus:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        status, body, _ = http_get(f"{self.url}/api/v1/{path}?{query}", timeout=30)
        data = json.loads(body or b"{}")
        if status != 200 or data.get("status") != "success":
            raise PrometheusError(f"{path} {params}: HTTP {status}: "
                                  f"{data.get('errorType')}: {data.get('error')}")
        return data["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.api("query", **params)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",
                        step=f"{step:g}")["result"]

    def targets_up(self) -> dict[str, str]:
        """scrape URL -> health of every active target."""
        return {t["scrapeUrl"]: t["health"] for t in self.api("targets")["activeTargets"]}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_prometheus(tmp: Path, job: str, targets: list[str], rule_files: list[Path] = (),
                     interval: str = "1s") -> Prometheus:
    """Prometheus scraping `targets` (host:port, path /metrics) as one job every `interval`."""
    if PROMETHEUS is None:
        raise RuntimeError("prometheus is not installed (apt-get install prometheus)")
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval,
                   "scrape_timeout": interval},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
    }
    config_path = tmp / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = tmp / "prometheus.log"
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config_path}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    prom = Prometheus(process, port, log_path)

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited: {log_path.read_text()[-2000:]}")
        try:
            return http_get(f"{prom.url}/-/ready", timeout=2)[0] == 200
        except OSError:
            return False

    try:
        wait_for(ready, 60, 0.25, "prometheus to be ready")
    except BaseException:
        prom.stop()
        raise
    return prom


# --- the GPU collector over a fake NVML ---------------------------------------------------------

GIB = 2**30


@dataclass
class FakeGpuServer:
    collector: Any
    fake: Any
    server: Any
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.collector.stop()
        self.server.shutdown()
        self.server.server_close()


def serve_fake_gpu(pcie_throughput: bool = True) -> FakeGpuServer:
    """GpuCollector(fake H200) on a free port; this process plays the engine (3 GiB), another
    pid plays a foreign process (1 GiB); one XID 79 is emitted once the watcher runs."""
    import fake_pynvml
    from exporter.gpu import GpuCollector, GpuConfig

    fake = fake_pynvml.FakeNvml(fake_pynvml.load_recording())
    fake.set_processes(0, [(os.getpid(), 3 * GIB), (2**22 + 1, 1 * GIB)])
    config = GpuConfig(interval_seconds=0.5, slow_interval_seconds=1.0,
                       pcie_throughput=pcie_throughput, xid_events=True, event_wait_ms=50)
    collector = GpuCollector(config, root_pid=os.getpid(), nvml=fake)
    collector.set_memory_budget_ratio(0.9)
    registry = CollectorRegistry()
    registry.register(collector)
    port = free_port()
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    collector.start()
    wait_for(lambda: any(not s.freed for s in fake.event_sets), 10, 0.05, "the XID watcher")
    fake.emit_xid(0, 79)
    return FakeGpuServer(collector, fake, server, port)


# --- load -----------------------------------------------------------------------------------------

# ~280 tokens of the default model: two full KV-cache blocks (128 tokens), so that requests
# sharing it hit the prefix cache.
SHARED_PREFIX = ("You are a helpful assistant for the operators of a large language model "
                 "service. Answer briefly. ") * 5
PROMPTS = ("The quick brown fox jumps over the lazy dog", "Tell me a story about a cat",
           "Prometheus scrapes metrics every few seconds", "Once upon a time",
           "Grafana draws dashboards from queries " * 4)


@dataclass
class Load(BackgroundLoad):
    """Keeps `concurrency` workers sending completions (plain, streamed, and, with `abandons`,
    requests the client abandons) until stopped; counts what finished and what was aborted."""

    api_url: str
    model: str
    concurrency: int = 4
    abandons: bool = True
    finished: int = 0
    aborted: int = 0
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    async def _worker(self, client, index: int) -> None:
        n = 0
        while not self._stop.is_set():
            prompt = PROMPTS[(index + n) % len(PROMPTS)]
            if n % 3 == 1:
                prompt = SHARED_PREFIX + prompt
            max_tokens = (8, 24, 48)[(index + n) % 3]
            try:
                if self.abandons and n % 7 == 3:  # a client that gives up after 0.3 s: an abort at the API
                    outcome = await abandoned_request(client, self.model,
                                                      PROMPTS[(index + n) % len(PROMPTS)],
                                                      timeout=0.3, max_tokens=480)
                    if outcome == "abandoned":
                        self.aborted += 1
                    else:  # a fast engine finished 480 tokens within 0.3 s
                        self.finished += 1
                elif n % 2:
                    stream = await client.completions.create(
                        model=self.model, prompt=prompt, max_tokens=max_tokens, stream=True)
                    async for _chunk in stream:
                        pass
                else:
                    await client.completions.create(model=self.model, prompt=prompt,
                                                    max_tokens=max_tokens)
                self.finished += 1
            except Exception as exc:  # recorded; the test asserts there were none
                self.errors.append(repr(exc))
                await asyncio.sleep(0.5)
            n += 1
