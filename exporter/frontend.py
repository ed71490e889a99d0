"""What one vLLM front-end process holds: its shard, the stat recorder, the engine's state.

Every process that runs an AsyncLLM (the daemon in its single-API-server shape, each of
`vllm serve`'s API-server processes in plugin mode or behind the daemon) has one `Frontend`.
It writes only into its own shard (shard.py); the metrics process reads and renders. Besides the
stat logger's hot path it runs one side thread that reads the engine client every
`daemon.check_interval_seconds`: requests still unfinished (in total and per engine rank) and
whether the engine died.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from .config import Config
from .metrics import ENGINE_STATES
from .shard import ShardMetrics, ShardWriter
from .stats import StatsRecorder

log = logging.getLogger("exporter.frontend")

_current: "Frontend | None" = None
_current_lock = threading.Lock()


def current() -> "Frontend | None":
    """This process's front end, once the daemon or the first stat logger made it."""
    return _current


def install(frontend: "Frontend | None") -> None:
    global _current
    with _current_lock:
        _current = frontend


class Frontend:
    def __init__(self, config: Config, directory: str, role: str = "frontend",
                 on_state: Callable[[str], None] | None = None):
        self.config = config
        self.writer = ShardWriter(directory, role)
        self.metrics = ShardMetrics(self.writer, config.buckets())
        self.model = config.engine.served_model_name or "unknown"
        self.recorder: StatsRecorder | None = None
        self.engine_state: str | None = None  # published once set
        self.logger_claimed = False
        # Plugin mode: serving once vLLM says the engine is initialised. The daemon instead
        # waits for vLLM's /health to answer (daemon.py) and sets it itself.
        self.serving_when_initialized = True
        # Called on the side thread at each check (plugin mode: restart the metrics process).
        self.on_check: list[Callable[[], None]] = []
        self._on_state = on_state
        self._unfinished: Callable[[], tuple[int, dict[int, int]]] | None = None
        self._engine_dead: Callable[[], bool] | None = None
        self._engine_children: dict[int, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- what the stat logger and the daemon call ------------------------------------------
    def attach_stat_logger(self, model: str, engine_indexes: list[int],
                           reason_name: Callable[[Any], str] = str) -> StatsRecorder:
        """Called once by the stat logger vLLM constructs; binds the per-engine children."""
        self.model = model
        daemon = self.config.daemon
        self.recorder = StatsRecorder(self.metrics, model, engine_indexes, reason_name,
                                      self.config.slo.objectives,
                                      max_engines=daemon.max_engines,
                                      max_lora_adapters=daemon.max_lora_adapters)
        for index in engine_indexes:
            self._engine_children[index] = self.metrics.engine_requests_unfinished.labels(
                model, str(index))
        # Present at 0 before the first abort, so that rate() and increase() see the first one.
        self.metrics.requests_aborted.labels(model)
        self.set_engine_state(self.engine_state or "starting")
        return self.recorder

    def engine_initialized(self, config_labels: dict[str, str],
                           geometry: dict[str, float]) -> None:
        info = self.metrics.engine_config_info
        info.labels(*(config_labels.get(name, "") for name in info.spec.labels)).set(1)
        if self.recorder is not None:
            self.recorder.set_capacity(geometry)

    def set_engine_state(self, state: str) -> None:
        """Publish this process's view of the engine's state (one series per state, 1 for the
        current one); the metrics process merges the views (aggregate.py)."""
        if self.engine_state == "dead" and state != "dead":
            return  # a later shutdown does not hide a death
        self.engine_state = state
        for name in ENGINE_STATES:
            self.metrics.engine_state.labels(self.model, name).set(1 if name == state else 0)
        if self._on_state is not None:
            self._on_state(state)

    def mark_engine_dead(self) -> None:
        if self.engine_state in (None, "starting", "serving"):
            log.error("the engine died; metrics stay up with vllm_engine_up 0")
            self.set_engine_state("dead")

    def mark_stopping(self) -> None:
        if self.engine_state != "dead":
            self.set_engine_state("stopping")

    def count_client_aborts(self, n: int) -> None:
        self.metrics.requests_aborted.labels(self.model).inc(n)

    def watch_engine(self, unfinished: Callable[[], tuple[int, dict[int, int]]],
                     engine_dead: Callable[[], bool]) -> None:
        """`unfinished()` -> (requests the front end holds, {engine rank: in flight});
        `engine_dead()` -> whether the engine client has failed."""
        self._unfinished = unfinished
        self._engine_dead = engine_dead

    # --- the side thread -------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="exporter-frontend",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.writer.close()

    def _loop(self) -> None:
        interval = self.config.daemon.check_interval_seconds
        while not self._stop.wait(interval):
            self.check()

    def check(self) -> None:
        self.check_engine_health()
        self.publish_unfinished()
        for hook in self.on_check:
            try:
                hook()
            except Exception:
                log.exception("front-end check hook failed")

    def check_engine_health(self) -> None:
        if self._engine_dead is None or self.engine_state not in ("starting", "serving"):
            return
        try:
            if self._engine_dead():
                self.mark_engine_dead()
        except Exception:
            log.exception("engine health check failed")
            self.metrics.errors.labels("engine_health").inc()

    def publish_unfinished(self) -> None:
        if self._unfinished is None:
            return
        try:
            total, by_engine = self._unfinished()
            self.metrics.frontend_requests_unfinished.labels(self.model).set(total)
            for index, child in list(self._engine_children.items()):
                child.set(by_engine.get(index, 0))
        except Exception:
            log.exception("reading the front end's unfinished requests failed")
            self.metrics.errors.labels("idle_watchdog").inc()
