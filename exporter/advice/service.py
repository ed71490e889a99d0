"""The advisor's thread in the metrics process: sample, evaluate, publish.

Every `advice.interval_seconds` it reads the wanted samples from the metrics process's own
registry (the merged shards and the GPU collector; never vLLM's event loop), evaluates the
rules over the window, publishes the vllm_advice_* / vllm_forecast_* families (rendered once
per evaluation) and the /advice page. Nothing here raises into the process: errors are logged
and counted in vllm_exporter_advice_errors_total.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry

from ..exposition import PublishedFamilies
from ..families import create_client, metric_family
from .advisor import Advisor, ModelResult, results_json
from .canary import Canary
from .config import AdviceConfig
from .families import ADVICE_FAMILIES
from .readings import WANTED, read
from .rules import RULE_NAMES

log = logging.getLogger("exporter.advice")

SPECS = {spec.name: spec for spec in ADVICE_FAMILIES}
COUNTERS = ("vllm_exporter_advice_evaluations_total", "vllm_exporter_advice_errors_total")
CANARY = ("vllm_canary_token_match_ratio", "vllm_canary_logprob_drift",
          "vllm_canary_requests_total")  # prometheus-client objects, set as answers arrive
FORECASTS = {"kv_headroom_tokens": "vllm_forecast_kv_cache_headroom_tokens",
             "kv_headroom_requests": "vllm_forecast_kv_cache_headroom_requests",
             "kv_full_seconds": "vllm_forecast_kv_cache_full_seconds",
             "batch_full_seconds": "vllm_forecast_batch_full_seconds"}


def render_families(results: list[ModelResult]) -> list:
    """The published families for one evaluation's results."""
    made = {name: metric_family(spec) for name, spec in SPECS.items()
            if name not in COUNTERS + CANARY}
    for r in results:
        for a in r.advice:
            key = [r.model, a.rule, a.parameter]
            made["vllm_advice_info"].add_metric(
                key + [a.action, a.throughput, a.latency, a.memory, a.confidence], 1)
            if a.current is not None:
                made["vllm_advice_current_value"].add_metric(key, a.current)
            made["vllm_advice_suggested_value"].add_metric(key, a.suggested)
        active = {a.rule for a in r.advice}
        for rule in RULE_NAMES:
            made["vllm_advice_rule_active"].add_metric([r.model, rule], int(rule in active))
        for key, name in FORECASTS.items():
            if key in r.forecast:
                made[name].add_metric([r.model], r.forecast[key])
        if r.energy_per_output_token is not None and math.isfinite(r.energy_per_output_token):
            made["vllm_energy_per_output_token_joules"].add_metric(
                [r.model, r.config.get("quantization", ""), r.config.get("kv_cache_dtype", "")],
                r.energy_per_output_token)
    return list(made.values())


class AdviceService:
    def __init__(self, settings: AdviceConfig, api_url: str | None = None):
        """`api_url`: the daemon's own API, for the canary (None: no canary)."""
        self.settings = settings
        self.api_url = api_url
        self.canary: Canary | None = None
        self.advisor = Advisor(settings, on_error=self._count_error)
        self._lock = threading.Lock()
        self._results: list[ModelResult] = []
        self._evaluated_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.registry: CollectorRegistry | None = None

    def start(self, registry: CollectorRegistry,
              add_route: Callable[[str, Any, str], None] = lambda *_: None,
              add_renderer: Callable[[Any], None] = lambda _: None, thread: bool = True) -> None:
        """Sample `registry` (where the advisor's families go too) from now on; thread=False
        leaves the ticks to the caller."""
        self.registry = registry
        self.evaluations = create_client(SPECS[COUNTERS[0]], registry)
        self.errors = create_client(SPECS[COUNTERS[1]], registry)
        for rule in (*RULE_NAMES, "sample", "forecast"):
            self.errors.labels(rule)
        self.published = PublishedFamilies()
        registry.register(self.published)
        add_renderer(self.published)
        add_route("/advice", self.advice_json,
                  "tuning advice read from the live metrics (JSON; never applied)")
        if self.settings.canary_interval_seconds > 0 and self.api_url:
            self._start_canary(registry)
        if thread:
            self._thread = threading.Thread(target=self._run, name="advisor", daemon=True)
            self._thread.start()
        log.info("advisor: sampling every %gs over a %gs window", self.settings.interval_seconds,
                 self.settings.window_seconds)

    def _start_canary(self, registry: CollectorRegistry) -> None:
        match, drift, requests = (create_client(SPECS[name], registry) for name in CANARY)

        def on_result(model: str, ratio: float | None, change: float | None) -> None:
            requests.labels(model, "ok" if ratio is not None else "failed").inc()
            if ratio is not None:
                match.labels(model).set(ratio)
                drift.labels(model).set(change)

        s = self.settings
        self.canary = Canary(self.api_url, s.canary_prompt, s.canary_max_tokens,
                             s.canary_interval_seconds, on_result)
        self.canary.start()
        log.info("output-health canary: every %gs against %s", s.canary_interval_seconds,
                 self.api_url)

    def stop(self) -> None:
        if self.canary is not None:
            self.canary.stop()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.interval_seconds):
            try:
                self.tick(time.time())
            except Exception:
                log.exception("advisor tick failed")
                self._count_error("sample")

    def tick(self, now: float) -> None:
        restricted = self.registry.restricted_registry(WANTED)
        samples = ((s.name, s.labels, s.value) for family in restricted.collect()
                   for s in family.samples)
        self.advisor.add(read(now, samples))
        results = self.advisor.evaluate()
        self.published.publish(render_families(results))
        with self._lock:
            self._results, self._evaluated_at = results, now
        self.evaluations.inc()

    def _count_error(self, rule: str) -> None:
        if self.registry is not None:
            self.errors.labels(rule).inc()

    def advice_json(self) -> tuple[int, str, bytes]:
        with self._lock:
            body = results_json(self._results, self.settings, self._evaluated_at)
        return 200, "application/json", json.dumps(body, indent=1).encode()
