"""Session fixtures: ONE real daemon (real vLLM CPU engine, embedded default model) per session.

Starting an engine costs 30-60 s on these machines, so every test that needs a live engine
shares the `daemon` fixture; tests that must kill or restart an engine start their own
(test_lifecycle.py) and stay few.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from helpers import Samples, free_port, http_get

# issue 4 (alerts): the session Alertmanager + webhook the shared daemon notifies.
from alerting_fixtures import alerting  # noqa: F401,E402  (a session fixture)

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 420  # seconds; a cold start on 2 busy cores can take several minutes
STOP_TIMEOUT = 60  # seconds allowed for a clean SIGTERM shutdown of the shared daemon
# Daemons started with a profiler config accept the profiling routes only with this token; the
# `profile` command reads it from the same variable.
os.environ.setdefault("VLLM_EXPORTER_PROFILE_TOKEN", "test-profile-token")


def daemon_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Daemon:
    process: subprocess.Popen
    api_port: int
    metrics_port: int
    log_path: Path
    config_path: Path
    model: str = "vllm-exporter-default"
    tls: ssl.SSLContext | None = None  # set when the metrics port speaks TLS
    auth: tuple[str, str] | None = None  # basic-auth credentials for the metrics port

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def metrics_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.metrics_port}/metrics"

    def get(self, path: str) -> tuple[int, bytes, dict]:
        """GET a path of the metrics port, with TLS and credentials where configured."""
        headers = {}
        if self.auth:
            pair = base64.b64encode(":".join(self.auth).encode()).decode()
            headers["Authorization"] = f"Basic {pair}"
        return http_get(self.metrics_url.removesuffix("/metrics") + path, headers=headers,
                        context=self.tls)

    def scrape(self) -> Samples:
        status, body, _ = self.get("/metrics")
        assert status == 200, f"GET {self.metrics_url} -> {status}"
        return Samples(body.decode())

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"


def daemon_config(api_port: int, metrics_port: int, **sections) -> dict:
    config = {
        "engine": {"max_model_len": 512, "max_num_seqs": 32, "seed": 0},
        "api": {"host": "127.0.0.1", "port": api_port},
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
        "daemon": {"idle_timeout_seconds": 1.0, "check_interval_seconds": 0.25,
                   "exit_delay_seconds": 3.0, "shutdown_timeout_seconds": 10.0},
        "gpu": {"enabled": True},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def start_daemon(tmp: Path, config: dict, name: str = "daemon",
                 tls: ssl.SSLContext | None = None) -> Daemon:
    config_path = tmp / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = tmp / f"{name}.log"
    log_file = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "exporter", "serve", "--config", str(config_path)],
        stdout=log_file, stderr=subprocess.STDOUT, env=daemon_env(), cwd=ROOT,
        start_new_session=True)
    try:
        daemon = Daemon(process, config["api"]["port"], config["metrics"]["port"], log_path,
                        config_path,
                        config.get("engine", {}).get("served_model_name", Daemon.model), tls)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"daemon exited with {process.returncode} during start-up:"
                                   f"\n{daemon.log_tail()}")
            try:
                if daemon.get("/-/ready")[0] == 200:
                    return daemon
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"daemon not ready after {STARTUP_TIMEOUT} s:\n{daemon.log_tail()}")
    except BaseException:  # whatever went wrong, no daemon is left running
        stop_process_group(process)
        raise


def stop_process_group(process: subprocess.Popen, sig: int = signal.SIGTERM,
                       timeout: float = STOP_TIMEOUT) -> int | None:
    """Signal the daemon; returns its exit code, or None if it had to be killed."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
            return None
    # Whatever the daemon left behind (it should leave nothing) goes too.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return process.returncode


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def daemon(session_tmp: Path, alerting):
    """The shared daemon. Its teardown is itself a test: SIGTERM with requests in flight must
    let them finish (drain, up to the shutdown timeout) and exit 0 in bounded time."""
    api_port, metrics_port = free_port(), free_port()
    # issue 4 (alerts): evaluate the alert rules and notify the session Alertmanager
    d = start_daemon(session_tmp, daemon_config(api_port, metrics_port,
                                                alerts=alerting.daemon_section()))
    yield d
    in_flight = [InFlightStream(d.api_url) for _ in range(3)]
    for stream in in_flight:
        stream.started.wait(60)
    started = time.monotonic()
    code = stop_process_group(d.process)
    took = time.monotonic() - started
    for stream in in_flight:
        stream.join(30)
    assert code == 0, f"shared daemon: SIGTERM gave exit code {code}:\n{d.log_tail()}"
    assert took < STOP_TIMEOUT, f"shared daemon took {took:.1f} s to stop"
    outcomes = [stream.outcome for stream in in_flight]
    assert outcomes == ["length"] * 3, f"in-flight requests at SIGTERM: {outcomes}"


class InFlightStream(threading.Thread):
    """A streaming request that is mid-generation when the daemon is told to stop."""

    def __init__(self, api_url: str):
        super().__init__(daemon=True)
        self.api_url, self.outcome = api_url, "not finished"
        self.started = threading.Event()
        self.start()

    def run(self) -> None:
        payload = {"model": "vllm-exporter-default", "prompt": "drain me", "max_tokens": 200,
                   "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", self.api_url + "/v1/completions", json=payload,
                              timeout=60) as response:
                for line in response.iter_lines():
                    self.started.set()
                    if line.startswith("data: {"):
                        reason = json.loads(line[6:])["choices"][0]["finish_reason"]
                        if reason:
                            self.outcome = reason
        except httpx.HTTPError as exc:
            self.outcome = f"error: {exc!r}"
        finally:
            self.started.set()
