"""The stat logger vLLM calls, in every process that runs an AsyncLLM.

The package registers `ExporterStatLogger` under vLLM's `vllm.stat_logger_plugins` entry point,
so every AsyncLLM constructs it: plain `vllm serve` (one API-server process or many, with or
without data parallelism), and the daemon, which also passes it explicitly.

Each such process gets one `Frontend` (frontend.py) that writes its own shard. The first
front end of a server to take the shard directory's lock starts the server's metrics process
(metrics_process.py), which alone binds the metrics port and renders; the others only write.
Configuration comes from the environment: VLLM_EXPORTER_CONFIG (a YAML file),
VLLM_EXPORTER_METRICS_HOST and VLLM_EXPORTER_METRICS_PORT; under the daemon, from the config the
daemon left in the shard directory.

When one process constructs two instances (entry point + explicit), the first claims the front
end and any later one stays inert (its record() returns at once).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from . import frontend as frontend_module
from .alerts import prepare_alerts
from .config import config_from_environment, load_config
from .vllm_compat import (
    AggregateStatLoggerBase,
    engine_config_labels,
    engine_features,
    find_async_llm,
    finish_reason_name,
    kv_cache_geometry,
    served_model_name,
    watch_async_llm,
)

log = logging.getLogger("exporter.plugin")

def frontend_from_environment() -> frontend_module.Frontend:
    """This process's front end, its shard in the server's shard directory, and the server's
    metrics process started if no other front end has started it."""
    from . import metrics_process

    directory = metrics_process.shard_dir_for_this_server()
    left_by_daemon = directory / metrics_process.CONFIG_NAME
    if left_by_daemon.exists():
        config = load_config(left_by_daemon)
    else:
        config = config_from_environment()
        prepare_alerts(config)  # a bad rule file stops vLLM's start with our message
    fe = frontend_module.Frontend(config, str(directory))
    # With several API servers, vLLM's launcher is the parent of every engine process: GPU
    # memory is attributed to the engine from there.
    several = "PROMETHEUS_MULTIPROC_DIR" in os.environ
    root_pid = os.getppid() if several else os.getpid()

    def keep_metrics_process() -> None:
        metrics_process.ensure_running(directory, "plugin", root_pid)

    keep_metrics_process()
    fe.on_check.append(keep_metrics_process)  # started again if it died
    fe.start()
    frontend_module.install(fe)
    return fe


def this_process_frontend() -> frontend_module.Frontend:
    return frontend_module.current() or frontend_from_environment()


class ExporterStatLogger(AggregateStatLoggerBase):
    """Forwards each engine step's statistics to this process's StatsRecorder."""

    def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None, **_: Any):
        self.vllm_config = vllm_config
        self.engine_indexes = list(engine_indexes or [0])
        fe = this_process_frontend()
        if fe.logger_claimed:
            self._fe = None  # a second instance for the same engine (entry point + explicit)
            self._recorder = None
            return
        fe.logger_claimed = True
        self._fe = fe
        self._recorder = fe.attach_stat_logger(served_model_name(vllm_config),
                                               self.engine_indexes, finish_reason_name)
        # Families of the features this engine's config switches on exist from the start.
        self._recorder.expect(engine_features(vllm_config))
        m = fe.metrics
        self._records = m.stat_logger_records.labels()
        self._seconds = m.stat_logger_seconds.labels()
        self._errors = m.errors.labels("stat_logger")
        self._error_logged = False
        engine = find_async_llm()
        if engine is not None:  # client aborts, unfinished requests, death, shutdown
            watch_async_llm(engine, fe, self._client_aborts)

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0, *args: Any, **kwargs: Any) -> None:
        recorder = self._recorder
        if recorder is None:
            return
        started = time.perf_counter()
        try:
            recorder.record(scheduler_stats, iteration_stats, engine_idx)
        except Exception:  # never let our bookkeeping break vLLM's output loop
            self._failed()
        self._records.inc()
        self._seconds.inc(time.perf_counter() - started)

    def _failed(self) -> None:
        self._errors.inc()
        if not self._error_logged:
            self._error_logged = True
            log.exception("stat logger failed (counted in vllm_exporter_errors_total; "
                          "logged once)")

    def _client_aborts(self, n: int, seconds_in_engine: list[float]) -> None:
        """vLLM's front end aborted n live requests (client gone): count them, and observe
        how long each had been in the engine."""
        try:
            self._fe.count_client_aborts(n)
            self._recorder.record_client_aborts(seconds_in_engine)
        except Exception:
            self._failed()

    def log_engine_initialized(self) -> None:
        if self._fe is None:
            return
        cfg = self.vllm_config
        self._fe.engine_initialized(engine_config_labels(cfg, self._recorder.model),
                                    kv_cache_geometry(cfg))
        if self._fe.serving_when_initialized:
            self._fe.set_engine_state("serving")

    def log(self) -> None:
        pass

    def record_sleep_state(self, sleep: int = 0, level: int = 0, *args: Any,
                           **kwargs: Any) -> None:
        """vLLM put the engine to sleep (sleep=1, at `level`) or woke it (sleep=0)."""
        if self._recorder is None:
            return
        try:
            self._recorder.set_sleep_state(sleep, level)
        except Exception:
            self._failed()

    def record_admission_rejection(self, reason: str, *args: Any, **kwargs: Any) -> None:
        """vLLM's front end refused a request at a queue limit (0.32+)."""
        if self._recorder is None:
            return
        try:
            self._recorder.record_admission_rejection(reason)
        except Exception:
            self._failed()
