"""The stat logger vLLM calls, in both modes.

Daemon mode: `vllm-exporter serve` installs a Runtime and passes this class to AsyncLLM.
Plugin mode: the package registers this class under vLLM's `vllm.stat_logger_plugins` entry
point, so every AsyncLLM (e.g. vLLM's own OpenAI server) constructs it; with no runtime installed
it builds one from the environment (VLLM_EXPORTER_CONFIG, VLLM_EXPORTER_METRICS_HOST,
VLLM_EXPORTER_METRICS_PORT) and opens the metrics port.

In daemon mode vLLM also loads the entry point, so two instances are constructed for one engine:
the first claims the runtime, any later one stays inert (its record() returns at once).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from . import runtime as runtime_module
from .alerts import prepare_alerts
from .config import load_config
from .vllm_compat import (
    VLLM_VERSION,
    AggregateStatLoggerBase,
    engine_config_labels,
    finish_reason_name,
    gpu_memory_utilization,
    kv_cache_geometry,
    served_model_name,
)

log = logging.getLogger("exporter.plugin")

ENV_CONFIG = "VLLM_EXPORTER_CONFIG"
ENV_METRICS_HOST = "VLLM_EXPORTER_METRICS_HOST"
ENV_METRICS_PORT = "VLLM_EXPORTER_METRICS_PORT"


def runtime_from_environment() -> runtime_module.Runtime:
    overrides: dict[str, Any] = {}
    if os.environ.get(ENV_METRICS_HOST):
        overrides["metrics.host"] = os.environ[ENV_METRICS_HOST]
    if os.environ.get(ENV_METRICS_PORT):
        port = os.environ[ENV_METRICS_PORT]
        if not port.isdigit():
            from .config import ConfigError

            raise ConfigError(ENV_METRICS_PORT, "metrics.port", f"must be a port number, got {port!r}")
        overrides["metrics.port"] = int(port)
    config = load_config(os.environ.get(ENV_CONFIG) or None, overrides)
    alerts = prepare_alerts(config)  # a bad rule file stops vLLM's start with our message
    rt = runtime_module.Runtime(config, mode="plugin", vllm_version=VLLM_VERSION)
    rt.start()
    runtime_module.install(rt)
    if alerts is not None:
        alerts.start(rt)
    return rt


class ExporterStatLogger(AggregateStatLoggerBase):
    """Forwards each engine step's statistics to the runtime's StatsRecorder."""

    def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None, **_: Any):
        self.vllm_config = vllm_config
        self.engine_indexes = list(engine_indexes or [0])
        rt = runtime_module.current() or runtime_from_environment()
        if rt.logger_claimed:
            self._rt = None  # a second instance for the same engine (entry point + explicit)
            self._recorder = None
            return
        rt.logger_claimed = True
        self._rt = rt
        self._recorder = rt.attach_stat_logger(served_model_name(vllm_config),
                                               self.engine_indexes, finish_reason_name)
        m = rt.metrics
        self._records = m.stat_logger_records
        self._seconds = m.stat_logger_seconds
        self._errors = m.errors.labels("stat_logger")
        self._error_logged = False

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0, *args: Any, **kwargs: Any) -> None:
        recorder = self._recorder
        if recorder is None:
            return
        started = time.perf_counter()
        try:
            recorder.record(scheduler_stats, iteration_stats, engine_idx)
        except Exception:  # never let our bookkeeping break vLLM's output loop
            self._errors.inc()
            if not self._error_logged:
                self._error_logged = True
                log.exception("stat logger failed (counted in vllm_exporter_errors_total; "
                              "logged once)")
        self._records.inc()
        self._seconds.inc(time.perf_counter() - started)

    def log_engine_initialized(self) -> None:
        if self._rt is None:
            return
        cfg = self.vllm_config
        self._rt.engine_initialized(engine_config_labels(cfg, self._recorder.model),
                                    kv_cache_geometry(cfg), gpu_memory_utilization(cfg))
        if self._rt.mode == "plugin":
            self._rt.set_engine_serving()

    def log(self) -> None:
        pass

    def record_sleep_state(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_admission_rejection(self, reason: str) -> None:
        pass
