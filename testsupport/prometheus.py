"""Real Prometheus and Alertmanager processes on loopback (Debian's packages), each on a free
port it reports, with its config and data in a folder of its own."""

from __future__ import annotations

import json
import shutil
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

from .net import free_port, http_get
from .processes import log_tail, start_group, stop_group, wait_url

PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
PROMTOOL = shutil.which("promtool")


class ManagedServer:
    """A server binary run as a process group on 127.0.0.1:`port`; start() returns once
    `ready_path` answers 200. The port is chosen before the start, so that a client can be
    pointed at a server that is not up yet."""

    def __init__(self, argv: list[str], port: int, directory: Path, ready_path: str = "/-/ready"):
        self.argv, self.port, self.directory, self.ready_path = argv, port, directory, ready_path
        self.log_path = directory / "log.txt"
        self.process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> "ManagedServer":
        self.process = start_group(self.argv, self.log_path)
        try:
            wait_url(self.url + self.ready_path, self.process, timeout, self.log_path,
                     what=f"{Path(self.argv[0]).name} ready", interval=0.1)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process, timeout=15)
        self.process = None

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)


class PrometheusError(AssertionError):
    pass


class Prometheus(ManagedServer):
    """Prometheus, with its HTTP API's instant and range queries."""

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


def scrape_job(name: str, targets: list[str], **options: Any) -> dict:
    """A scrape config for `targets` (host:port, path /metrics); `options` as Prometheus
    names them (scheme, tls_config, basic_auth ...)."""
    return {"job_name": name, "static_configs": [{"targets": list(targets)}], **options}


def make_prometheus(directory: Path, jobs: list[dict], rule_files: list[Path] = (),
                    alertmanager_url: str | None = None, interval: str = "1s") -> Prometheus:
    """Prometheus (not started) scraping and evaluating every `interval`, with its config, data
    and log in `directory`; alerts go to `alertmanager_url` (resent every second)."""
    if PROMETHEUS is None:
        raise RuntimeError("prometheus is not installed (apt-get install prometheus)")
    directory.mkdir(parents=True, exist_ok=True)
    config: dict = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval,
                   "scrape_timeout": interval},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": jobs,
    }
    if alertmanager_url:
        host = alertmanager_url.split("://", 1)[1].rstrip("/")
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [host]}]}]}
    config_path = directory / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [PROMETHEUS, f"--config.file={config_path}", f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--rules.alert.resend-delay=1s",
            "--log.level=warn"]
    return Prometheus(argv, port, directory)


def start_prometheus(directory: Path, job: str, targets: list[str], rule_files: list[Path] = (),
                     interval: str = "1s", alertmanager_url: str | None = None) -> Prometheus:
    """Prometheus scraping `targets` as one job, started and ready."""
    return make_prometheus(directory, [scrape_job(job, targets)], rule_files, alertmanager_url,
                           interval).start()


def alertmanager_config(webhook_url: str) -> dict:
    """Every alert its own group (so that alerts from two paths arrive separately), to the
    webhook after 1 s (group wait and interval), resolved ones included."""
    return {
        "route": {"receiver": "webhook", "group_by": ["..."], "group_wait": "1s",
                  "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{"name": "webhook",
                       "webhook_configs": [{"url": webhook_url, "send_resolved": True}]}],
    }


def make_alertmanager(directory: Path, webhook_url: str, port: int | None = None) -> ManagedServer:
    """Alertmanager (not started) notifying `webhook_url`, its files in `directory`."""
    if ALERTMANAGER is None:
        raise RuntimeError("prometheus-alertmanager is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "alertmanager.yml"
    config.write_text(yaml.safe_dump(alertmanager_config(webhook_url)))
    port = port or free_port()
    # The empty cluster address keeps it from listening on 0.0.0.0:9094 for peers.
    argv = [ALERTMANAGER, f"--config.file={config}", f"--storage.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
            "--log.level=warn"]
    return ManagedServer(argv, port, directory)
