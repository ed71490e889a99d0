"""The daemon (`python -m exporter serve`) as a process: its config, its start-up, its ports."""

from __future__ import annotations

import base64
import os
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from .exposition import Samples
from .net import http_get
from .processes import log_tail, start_group, stop_group, wait_url

STARTUP_TIMEOUT = 420  # seconds; a cold start on 2 busy cores can take several minutes
STOP_TIMEOUT = 60  # seconds allowed for a clean SIGTERM shutdown
DEFAULT_MODEL = "vllm-exporter-default"


def daemon_env() -> dict[str, str]:
    """This process's environment, with a small KV cache (1 GiB) unless one is set."""
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
    model: str = DEFAULT_MODEL
    tls: ssl.SSLContext | None = None  # set when the metrics port speaks TLS
    auth: tuple[str, str] | None = None  # basic-auth credentials for the metrics port

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def metrics_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.metrics_port}/metrics"

    def _headers(self) -> dict[str, str]:
        if not self.auth:
            return {}
        return {"Authorization": "Basic " + base64.b64encode(":".join(self.auth).encode()).decode()}

    def get(self, path: str) -> tuple[int, bytes, dict]:
        """GET a path of the metrics port, with TLS and credentials where configured."""
        return http_get(self.metrics_url.removesuffix("/metrics") + path, headers=self._headers(),
                        context=self.tls)

    def scrape(self) -> Samples:
        status, body, _ = self.get("/metrics")
        assert status == 200, f"GET {self.metrics_url} -> {status}"
        return Samples(body.decode())

    def log_tail(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM; the exit code, or None if it had to be killed after `timeout` s."""
        return stop_group(self.process, timeout=timeout)


def daemon_config(api_port: int, metrics_port: int, **sections) -> dict:
    """The tests' daemon config: a small engine, quick idle and exit timers, the given ports;
    `sections` are merged over it (one dict per top-level section)."""
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


def start_daemon(directory: Path, config: dict, name: str = "daemon",
                 tls: ssl.SSLContext | None = None, auth: tuple[str, str] | None = None,
                 env: dict | None = None) -> Daemon:
    """Write `config` to DIRECTORY/NAME.yaml, start the daemon (log: NAME.log) and return once
    its /-/ready answers 200. Whatever goes wrong, no daemon is left running."""
    config_path = directory / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = directory / f"{name}.log"
    process = start_group([sys.executable, "-m", "exporter", "serve", "--config",
                           str(config_path)], log_path, env or daemon_env())
    model = config.get("engine", {}).get("served_model_name", DEFAULT_MODEL)
    daemon = Daemon(process, config["api"]["port"], config["metrics"]["port"], log_path,
                    config_path, model, tls, auth)
    try:
        wait_url(daemon.metrics_url.removesuffix("/metrics") + "/-/ready", process,
                 STARTUP_TIMEOUT, log_path, what=f"the daemon {name} ready", interval=1,
                 headers=daemon._headers(), context=tls)
    except BaseException:
        stop_group(process)
        raise
    return daemon
