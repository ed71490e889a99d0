"""The metrics side of the exporter: registry, metrics port, GPU collector, side loop.

A `Runtime` runs in the metrics process (metrics_process.py), apart from every vLLM front end,
so a scrape never waits on a front end's event loop or GIL. Its registry holds the metrics
process's own families and a `ShardCollector` that merges the shards every front-end process
writes (shard.py, aggregate.py). Its side loop decides which engine ranks are idle, notices the
engine's death (alerts are evaluated at once) and feeds the GPU collector the engine's memory
budget from the config the front ends published.

`Runtime` also carries a local `Frontend` with its own shard: the families the metrics process
itself counts (errors, idle resets, GPU label overflow) go there, and tests and benchmarks drive a
whole front end through it in one process (`attach_stat_logger`, `watch_engine`, ...; install
`rt.frontend` with `frontend.install` and vLLM's stat loggers attach to it).

Data flows one way: front ends write shards; the metrics process only reads them.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
import threading
import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, disable_created_metrics

from . import __version__
from .aggregate import ShardCollector, ShardSet
from .alerts.hooks import AlertHooks
from .config import Config
from .families import metric_family
from .frontend import Frontend
from .gpu import GpuCollector
from .metrics import (
    ENGINE_CONFIG_LABELS,
    ERROR_COMPONENTS,
    STATE_SEVERITY,
    EngineMetrics,
    spec,
)
from .metrics_server import MetricsServer
from .stats import StatsRecorder
from .web_config import load_web_config

log = logging.getLogger("exporter.runtime")

__all__ = ["Runtime"]

PROCESS_ROLES = ("frontend", "daemon", "metrics")


class Families:
    """The metrics process's own families and its shard's, under one set of attribute names."""

    def __init__(self, *sources: Any):
        self._sources = sources

    def __getattr__(self, name: str) -> Any:
        for source in self._sources:
            if hasattr(source, name):
                return getattr(source, name)
        raise AttributeError(name)


class ProcessesCollector:
    """vllm_exporter_processes, from the shards as they are at the scrape."""

    def __init__(self, shards: ShardSet):
        self.shards = shards
        self.spec = spec("vllm_exporter_processes")

    def describe(self):
        return [metric_family(self.spec)]

    def collect(self):
        # The shards as the ShardCollector (registered before this one, and rendered first on
        # the fast path) or the side loop last refreshed them.
        counts = self.shards.processes()
        family = metric_family(self.spec)
        for role in PROCESS_ROLES:
            for state in ("live", "exited"):
                family.add_metric([role, state], counts.get((role, state), 0))
        yield family


class Runtime:
    def __init__(self, config: Config, mode: str, vllm_version: str = "unknown",
                 shard_dir: str | None = None, role: str = "daemon",
                 root_pid: int | None = None):
        self.config = config
        self.mode = mode  # "daemon" | "plugin"
        # `_created` series double the exposition for no use here. Process-wide in
        # prometheus-client, which is why this runs only where no vLLM registry lives.
        disable_created_metrics()
        self._own_dir = shard_dir is None
        self.shard_dir = shard_dir or tempfile.mkdtemp(prefix="vllm-exporter-")
        self.root_pid = root_pid or os.getpid()
        self.registry = CollectorRegistry(auto_describe=True)
        self.server_metrics = EngineMetrics(self.registry, buckets=config.buckets())
        self.frontend = Frontend(config, self.shard_dir, role=role, on_state=self._local_state)
        self.frontend.serving_when_initialized = mode == "plugin"
        self.metrics = Families(self.server_metrics, self.frontend.metrics)
        self.shards = ShardSet(self.shard_dir)
        self.collector = ShardCollector(self.shards)
        self.registry.register(self.collector)
        self.registry.register(ProcessesCollector(self.shards))
        self.metrics.build_info.labels(__version__, vllm_version, platform.python_version(),
                                       mode).set(1)
        for component in ERROR_COMPONENTS:
            self.metrics.errors.labels(component)
        self.metrics.idle_resets.labels()
        for result in ("success", "failure"):  # present at 0, so increase() sees the first one
            self.metrics.config_reloads.labels(result)
        for reason in ("concurrency", "connections", "too_large"):
            self.metrics.scrapes_rejected.labels(reason)
        for label in ("engine", "adapter", "gpu"):
            self.metrics.label_overflow.labels(label)
        self.server: MetricsServer | None = None
        self.gpu: GpuCollector | None = None
        self._budget_ratio: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dead_models: set[str] = set()
        # Called (on the thread that saw it) once the engine is found dead, e.g. to evaluate
        # and deliver the alerts at once rather than at the next tick.
        self.on_engine_death: list[Callable[[], None]] = []

    # --- the local front end (tests, benchmarks, and the families this process counts) ----
    @property
    def model(self) -> str:
        return self.frontend.model

    @model.setter
    def model(self, value: str) -> None:
        self.frontend.model = value

    @property
    def recorder(self) -> StatsRecorder | None:
        return self.frontend.recorder

    @property
    def logger_claimed(self) -> bool:
        return self.frontend.logger_claimed

    @logger_claimed.setter
    def logger_claimed(self, value: bool) -> None:
        self.frontend.logger_claimed = value

    def attach_stat_logger(self, model: str, engine_indexes: list[int],
                           reason_name: Callable[[Any], str] = str) -> StatsRecorder:
        return self.frontend.attach_stat_logger(model, engine_indexes, reason_name)

    def engine_initialized(self, config_labels: dict[str, str],
                           geometry: dict[str, float]) -> None:
        self.frontend.engine_initialized(config_labels, geometry)
        self.update_gpu_budget()

    def set_engine_serving(self) -> None:
        self.frontend.set_engine_state("serving")

    def set_engine_state(self, state: str) -> None:
        self.frontend.set_engine_state(state)

    def mark_engine_dead(self) -> None:
        self.frontend.mark_engine_dead()

    def mark_stopping(self) -> None:
        self.frontend.mark_stopping()

    def watch_engine(self, unfinished: Callable[[], Any], engine_dead: Callable[[], bool]) -> None:
        self.frontend.watch_engine(unfinished, engine_dead)

    def count_client_aborts(self, n: int) -> None:
        self.frontend.count_client_aborts(n)

    def check_engine_health(self) -> None:
        self.frontend.check_engine_health()

    def _local_state(self, state: str) -> None:
        if state == "dead":
            self._report_death(self.frontend.model)

    # --- start-up ----------------------------------------------------------------------------
    def bind_metrics_port(self) -> None:
        """Bind the metrics port and serve it at once (raises OSError if it is taken): while
        the engine loads, /-/ready answers 503 and /metrics shows vllm_engine_up 0.

        The web config file is read here (ConfigError if it is invalid), before the bind."""
        listen = self.config.metrics
        web_config = load_web_config(listen.web_config_file)
        self.server = MetricsServer(listen.host, listen.port, self.registry, self.metrics,
                                    self.health, web_config,
                                    max_concurrent_requests=listen.max_concurrent_requests,
                                    max_connections=listen.max_connections,
                                    request_timeout_seconds=listen.request_timeout_seconds,
                                    shards=self.collector)
        self.server.start()

    def alert_hooks(self) -> AlertHooks:
        """What the alerting service needs from this process (call after the metrics port is
        bound, so that its routes and port are known)."""
        hooks: dict[str, Any] = dict(on_engine_death=self.on_engine_death.append,
                                     count_error=self.metrics.errors.labels("alerts").inc)
        if self.server is not None:
            hooks.update(metrics_port=self.server.port, add_route=self.server.add_route,
                         add_renderer=self.server.add_renderer)
        return AlertHooks(**hooks)

    def reload_web_config(self) -> bool:
        """Re-read the web config file (SIGHUP). An invalid file leaves the old one active."""
        path = self.config.metrics.web_config_file
        if self.server is None or path is None:
            log.info("reload requested; no web config file is configured, nothing to reload")
            return False
        try:
            web_config = load_web_config(path)
        except Exception as exc:  # ConfigError, or anything unexpected: keep serving as before
            log.error("web config reload failed, the previous configuration stays active: %s",
                      exc)
            self.metrics.config_reloads.labels("failure").inc()
            return False
        self.server.set_web_config(web_config)
        self.metrics.config_reloads.labels("success").inc()
        log.info("web config reloaded from %s (TLS %s, %d basic-auth users)", path,
                 "on" if web_config.tls else "off", len(web_config.users))
        return True

    def start(self) -> None:
        if self.server is None:
            self.bind_metrics_port()
        if self.config.gpu.enabled:
            overflow = self.metrics.label_overflow.labels("gpu")
            self.gpu = GpuCollector(self.config.gpu, root_pid=self.root_pid,
                                    on_label_overflow=overflow.inc)
            self.registry.register(self.gpu)
            self.server.add_renderer(self.gpu)
            self.gpu.start()
        self._thread = threading.Thread(target=self._side_loop, name="exporter-side-loop",
                                        daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", self.config.metrics.host, self.server.port)

    # --- the engine as every front end sees it ---------------------------------------------
    @property
    def engine_state(self) -> str:
        """The engine's merged state (the most severe over models); starting before any
        front end has reported."""
        states = self.collector.engine_state()
        if not states:
            return "starting"
        return max(states.values(), key=lambda state: STATE_SEVERITY.get(state, 0))

    def health(self) -> tuple[bool, bool, str]:
        state = self.engine_state
        return state in ("starting", "serving"), state == "serving", state

    # --- the side loop -----------------------------------------------------------------------
    def _side_loop(self) -> None:
        interval = self.config.daemon.check_interval_seconds
        while not self._stop.wait(interval):
            for step in (self.frontend.check, self.check_idle, self.check_death,
                         self.update_gpu_budget):
                try:
                    step()
                except Exception:  # one failing step must not end the loop
                    log.exception("side loop: %s failed", step.__name__)
                    self.metrics.errors.labels("idle_watchdog").inc()

    def check_death(self) -> None:
        """Alerts are evaluated at once when a front end reports the engine dead."""
        for model, state in self.collector.engine_state().items():
            if state == "dead":
                self._report_death(model)

    def _report_death(self, model: str) -> None:
        if model in self._dead_models:
            return
        self._dead_models.add(model)
        for callback in self.on_engine_death:
            callback()

    def check_idle(self, now: float | None = None) -> None:
        """Render stale engine-state gauges as 0 once an engine rank is idle.

        vLLM's engine steps continuously while it holds any request and emits no statistics
        when it has none, so after a rank's last request is aborted its running/waiting/KV
        gauges keep their last values. A rank is idle after no step for
        `idle_timeout_seconds` while no front end has a request in flight to it (per rank,
        summed over every API-server process). A rank that still has requests keeps its last
        values, so the queue and stall alerts stay true for it alone.
        """
        try:
            collector = self.collector
            shards = self.shards.refresh()
            stamps = collector.engine_stamps(shards)
            idle = collector.idle_engines()
            gauges = [collector.gauge_values(name, shards, stamps) for name in
                      ("vllm_requests_running", "vllm_requests_waiting",
                       "vllm_kv_cache_usage_ratio")]
            unfinished = collector.gauge_values("vllm_engine_requests_unfinished", shards)
            now = time.time() if now is None else now
            timeout = self.config.daemon.idle_timeout_seconds
            for key, (stamp, _) in stamps.items():
                if key in idle and idle[key] >= stamp:
                    continue
                if not any(values.get(key) for values in gauges):
                    continue
                if now - stamp >= timeout and not unfinished.get(key):
                    collector.mark_idle(key, stamp)
                    self.metrics.idle_resets.inc()
        except Exception:
            log.exception("idle check failed")
            self.metrics.errors.labels("idle_watchdog").inc()

    def update_gpu_budget(self) -> None:
        """What vLLM may take of each GPU: its gpu_memory_utilization, from the config info."""
        if self.gpu is None:
            return
        column = ENGINE_CONFIG_LABELS.index("gpu_memory_utilization")
        for labels in self.collector.gauge_values("vllm_engine_config_info"):
            try:
                ratio = float(labels[column])
            except ValueError:
                continue
            if ratio != self._budget_ratio:
                self._budget_ratio = ratio
                self.gpu.set_memory_budget_ratio(ratio)
            return

    def live_writers(self) -> int:
        """Processes other than this one that still write shards (front ends, the daemon)."""
        me = os.getpid()
        return sum(1 for shard in self.shards.refresh() if shard.live and shard.pid != me)

    # --- shutdown ----------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        if self.gpu is not None:
            self.gpu.stop()
        if self.server is not None:
            self.server.stop()
        self.frontend.stop()
        if self._own_dir:
            shutil.rmtree(self.shard_dir, ignore_errors=True)
