"""The exporter's core, shared by daemon mode and plugin mode.

A `Runtime` owns our registry and metric families, the metrics server, the GPU collector and
one side thread (the idle watchdog and engine health check). The stat logger in plugin.py finds
the process's runtime through `current()`; in plugin mode (vLLM's own server) it creates one
from the environment.

Data flows one way: the stat logger writes metrics; the side thread and the scrapes only read
them (or reset engine-state gauges the engine itself left stale); nothing here calls into vLLM's
scheduling.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, disable_created_metrics

from . import __version__
from .config import Config
from .gpu import GpuCollector
from .metrics import ERROR_COMPONENTS, EngineMetrics
from .metrics_server import MetricsServer
from .stats import StatsRecorder
from .web_config import load_web_config

log = logging.getLogger("exporter.runtime")

ENGINE_STATES = ("starting", "serving", "stopping", "dead")

_current: "Runtime | None" = None
_current_lock = threading.Lock()


def current() -> "Runtime | None":
    return _current


def install(runtime: "Runtime | None") -> None:
    global _current
    with _current_lock:
        _current = runtime


class Runtime:
    def __init__(self, config: Config, mode: str, vllm_version: str = "unknown"):
        self.config = config
        self.mode = mode  # "daemon" | "plugin"
        disable_created_metrics()  # `_created` series double the exposition for no use here
        self.registry = CollectorRegistry(auto_describe=True)
        self.metrics = EngineMetrics(self.registry, buckets=config.buckets())
        self.metrics.build_info.labels(__version__, vllm_version, platform.python_version(),
                                       mode).set(1)
        for component in ERROR_COMPONENTS:
            self.metrics.errors.labels(component)
        for result in ("success", "failure"):  # present at 0, so increase() sees the first one
            self.metrics.config_reloads.labels(result)
        for reason in ("concurrency", "connections", "too_large"):
            self.metrics.scrapes_rejected.labels(reason)
        for label in ("engine", "adapter", "gpu"):
            self.metrics.label_overflow.labels(label)
        self.model = config.engine.served_model_name or "unknown"
        self.recorder: StatsRecorder | None = None
        self.engine_state = "starting"
        self.unfinished_requests: Callable[[], int] | None = None
        self.engine_dead: Callable[[], bool] | None = None
        self.server: MetricsServer | None = None
        self.gpu: GpuCollector | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.logger_claimed = False
        # Called (on the thread that saw it) once the engine is found dead, e.g. to evaluate
        # and deliver the alerts at once rather than at the next tick.
        self.on_engine_death: list[Callable[[], None]] = []

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
                                    request_timeout_seconds=listen.request_timeout_seconds)
        self.server.start()

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
            self.gpu = GpuCollector(self.config.gpu, root_pid=os.getpid(),
                                    on_label_overflow=overflow.inc)
            self.registry.register(self.gpu)
            self.gpu.start()
        self._thread = threading.Thread(target=self._side_loop, name="exporter-side-loop",
                                        daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", self.config.metrics.host, self.server.port)

    def attach_stat_logger(self, model: str, engine_indexes: list[int],
                           reason_name: Callable[[Any], str] = str) -> StatsRecorder:
        """Called once by the stat logger vLLM constructs; binds the per-engine children."""
        self.model = model
        self.recorder = StatsRecorder(self.metrics, model, engine_indexes, reason_name,
                                      self.config.slo.objectives,
                                      max_engines=self.config.daemon.max_engines,
                                      max_lora_adapters=self.config.daemon.max_lora_adapters)
        self.set_engine_state(self.engine_state)
        return self.recorder

    def engine_initialized(self, config_labels: dict[str, str], geometry: dict[str, float],
                           gpu_memory_utilization: float | None) -> None:
        self.metrics.engine_config_info.labels(**config_labels).set(1)
        if self.recorder is not None:
            self.recorder.set_capacity(geometry)
        if self.gpu is not None and gpu_memory_utilization:
            self.gpu.set_memory_budget_ratio(gpu_memory_utilization)

    def set_engine_serving(self) -> None:
        self.set_engine_state("serving")

    def set_engine_state(self, state: str) -> None:
        """Publish the engine's state: vllm_engine_up (1 only while serving) and
        vllm_engine_state (one series per state, 1 for the current one)."""
        self.engine_state = state
        self.metrics.engine_up.labels(self.model).set(1 if state == "serving" else 0)
        for name in ENGINE_STATES:
            self.metrics.engine_state.labels(self.model, name).set(1 if name == state else 0)
        if state == "dead":
            for callback in self.on_engine_death:
                callback()

    def watch_engine(self, unfinished_requests: Callable[[], int],
                     engine_dead: Callable[[], bool]) -> None:
        """Daemon mode: the side loop reads the front end's request count and engine health."""
        self.unfinished_requests = unfinished_requests
        self.engine_dead = engine_dead

    def count_client_aborts(self, n: int) -> None:
        self.metrics.requests_aborted.labels(self.model).inc(n)

    # --- health ------------------------------------------------------------------------------
    def health(self) -> tuple[bool, bool, str]:
        healthy = self.engine_state in ("starting", "serving")
        return healthy, self.engine_state == "serving", self.engine_state

    def mark_engine_dead(self) -> None:
        if self.engine_state in ("starting", "serving"):
            log.error("the engine died; metrics stay up with vllm_engine_up 0")
            self.set_engine_state("dead")

    def mark_stopping(self) -> None:
        if self.engine_state == "dead":
            return
        self.set_engine_state("stopping")

    # --- the side loop -----------------------------------------------------------------------
    def _side_loop(self) -> None:
        interval = self.config.daemon.check_interval_seconds
        while not self._stop.wait(interval):
            self.check_engine_health()
            self.check_idle()

    def check_engine_health(self) -> None:
        if self.engine_dead is None or self.engine_state not in ("starting", "serving"):
            return
        try:
            if self.engine_dead():
                self.mark_engine_dead()
        except Exception:
            log.exception("engine health check failed")
            self.metrics.errors.labels("engine_health").inc()

    def check_idle(self) -> None:
        """Reset stale engine-state gauges once the engine is idle.

        vLLM's engine steps continuously while it holds any request and emits no statistics
        when it has none, so after the last request is aborted its running/waiting/KV gauges
        keep their last values. Idle here means: no step for `idle_timeout_seconds` and (in
        daemon mode) no unfinished request at the front end. A stalled engine that still holds
        requests keeps its last values, so queue and stall alerts stay true.
        """
        recorder = self.recorder
        if recorder is None:
            return
        try:
            unfinished = self.unfinished_requests() if self.unfinished_requests else None
            if unfinished is not None:
                self.metrics.frontend_requests_unfinished.labels(self.model).set(unfinished)
            if not recorder.state_nonzero:
                return
            idle_for = time.monotonic() - recorder.last_step_monotonic
            if idle_for >= self.config.daemon.idle_timeout_seconds and not unfinished:
                recorder.reset_engine_state()
                self.metrics.idle_resets.inc()
        except Exception:
            log.exception("idle check failed")
            self.metrics.errors.labels("idle_watchdog").inc()

    # --- shutdown ----------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        if self.gpu is not None:
            self.gpu.stop()
        if self.server is not None:
            self.server.stop()
