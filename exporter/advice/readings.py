"""The live metrics the advisor reads, sampled over time, and the window the rules see.

A `Reading` is one sample of the wanted series (from the metrics process's registry, or from a
scrape of /metrics in `vllm-exporter advise`), folded per model: counters and histogram sums
and counts summed over engine ranks, the running batch and the queue summed, KV-cache usage
taken at its highest rank. A `Window` is a model's readings over the last `window_seconds`;
the rules only ever see windows, so they run the same on live samples and on scripted ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

COUNTERS = ("vllm_generation_tokens_total", "vllm_prompt_tokens_total",
            "vllm_preemptions_total", "vllm_prefix_cache_queries_total",
            "vllm_prefix_cache_hits_total", "vllm_spec_decode_drafts_total",
            "vllm_spec_decode_draft_tokens_total", "vllm_spec_decode_accepted_tokens_total",
            "vllm_requests_finished_total")
HISTOGRAMS = ("vllm_time_to_first_token_seconds", "vllm_inter_token_latency_seconds",
              "vllm_request_queue_time_seconds", "vllm_request_prefill_time_seconds",
              "vllm_request_prompt_tokens", "vllm_request_generation_tokens")
GAUGES = ("vllm_requests_running", "vllm_requests_waiting", "vllm_kv_cache_usage_ratio",
          "vllm_kv_cache_capacity_tokens")
CONFIG_INFO = "vllm_engine_config_info"
GPU_SERIES = ("vllm_gpu_memory_total_bytes", "vllm_gpu_memory_free_bytes",
              "vllm_gpu_engine_visible", "vllm_gpu_energy_joules_total")
# Sample names, as a restricted registry or a parsed scrape names them.
WANTED = frozenset((*COUNTERS, *GAUGES, CONFIG_INFO, *GPU_SERIES,
                    *(h + suffix for h in HISTOGRAMS for suffix in ("_sum", "_count"))))


@dataclass
class ModelReading:
    t: float
    values: dict[str, float] = field(default_factory=dict)  # counters, histogram sums/counts
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0  # the highest over engine ranks
    capacity_tokens: float = 0.0  # summed over engine ranks
    headroom_tokens: float = 0.0  # sum over ranks of capacity x (1 - usage)
    config: dict[str, str] = field(default_factory=dict)


@dataclass
class GpuReading:
    total_bytes: float = math.nan
    free_bytes: float = math.nan
    engine_visible: bool | None = None  # None: the collector does not say
    energy_joules: float = math.nan


@dataclass
class Reading:
    t: float
    models: dict[str, ModelReading]
    gpus: dict[str, GpuReading]


def read(t: float, samples: Iterable[tuple[str, dict[str, str], float]]) -> Reading:
    """Fold (sample name, labels, value) triples into one reading per model."""
    models: dict[str, ModelReading] = {}
    per_engine: dict[tuple[str, str], dict[str, float]] = {}
    gpus: dict[str, GpuReading] = {}
    for name, labels, value in samples:
        if name not in WANTED or math.isnan(value):
            continue
        if name in GPU_SERIES:
            gpu = gpus.setdefault(labels.get("gpu", "?"), GpuReading())
            if name == "vllm_gpu_memory_total_bytes":
                gpu.total_bytes = value
            elif name == "vllm_gpu_memory_free_bytes":
                gpu.free_bytes = value
            elif name == "vllm_gpu_engine_visible":
                gpu.engine_visible = value >= 1
            else:
                gpu.energy_joules = value
            continue
        model = labels.get("model")
        if model is None:
            continue
        m = models.setdefault(model, ModelReading(t))
        if name == CONFIG_INFO:
            if not m.config:
                m.config = dict(labels)
        elif name in GAUGES:
            per_engine.setdefault((model, labels.get("engine", "0")), {})[name] = value
        else:
            m.values[name] = m.values.get(name, 0.0) + value
    for (model, _), gauges in per_engine.items():
        m = models[model]
        usage = gauges.get("vllm_kv_cache_usage_ratio", 0.0)
        capacity = gauges.get("vllm_kv_cache_capacity_tokens", 0.0)
        m.running += gauges.get("vllm_requests_running", 0.0)
        m.waiting += gauges.get("vllm_requests_waiting", 0.0)
        m.kv_usage = max(m.kv_usage, usage)
        m.capacity_tokens += capacity
        m.headroom_tokens += capacity * max(0.0, 1.0 - usage)
    return Reading(t, models, gpus)


class Window:
    """One model's readings over the window (oldest first), with what the rules ask of them."""

    def __init__(self, model: str, readings: list[ModelReading],
                 gpus: list[dict[str, GpuReading]] | None = None):
        if len(readings) < 2:
            raise ValueError("a window needs at least two readings")
        self.model = model
        self.readings = readings
        self.gpus = gpus or [{} for _ in readings]

    @property
    def latest(self) -> ModelReading:
        return self.readings[-1]

    @property
    def seconds(self) -> float:
        return self.readings[-1].t - self.readings[0].t

    @property
    def config(self) -> dict[str, str]:
        return self.latest.config

    def setting(self, name: str) -> float | None:
        """An engine setting from vllm_engine_config_info as a number (booleans 0/1)."""
        raw = self.config.get(name)
        if raw is None or raw == "":
            return None
        if raw.lower() in ("true", "false"):
            return 1.0 if raw.lower() == "true" else 0.0
        try:
            return float(raw)
        except ValueError:
            return None

    def delta(self, name: str) -> float:
        """A counter's increase over the window (resets: the new value counts from 0)."""
        total, previous = 0.0, None
        for r in self.readings:
            value = r.values.get(name)
            if value is None:
                continue
            if previous is not None:
                total += value - previous if value >= previous else value
            previous = value
        return total

    def has(self, name: str) -> bool:
        return any(name in r.values for r in self.readings)

    def mean(self, histogram: str) -> float | None:
        """Mean of a histogram's observations inside the window (None: no observation)."""
        count = self.delta(histogram + "_count")
        return self.delta(histogram + "_sum") / count if count > 0 else None

    def finished(self) -> float:
        return self.delta("vllm_requests_finished_total")

    def peak(self, attribute: str) -> float:
        return max(getattr(r, attribute) for r in self.readings)

    def slope(self, attribute: str) -> float:
        """Least-squares growth per second of a gauge over the window."""
        ts = [r.t for r in self.readings]
        ys = [getattr(r, attribute) for r in self.readings]
        t_mean, y_mean = sum(ts) / len(ts), sum(ys) / len(ys)
        var = sum((t - t_mean) ** 2 for t in ts)
        if var == 0:
            return 0.0
        return sum((t - t_mean) * (y - y_mean) for t, y in zip(ts, ys)) / var

    def mean_context_tokens(self) -> float | None:
        """Prompt + generated tokens of the mean finished request in the window."""
        prompt = self.mean("vllm_request_prompt_tokens")
        generated = self.mean("vllm_request_generation_tokens")
        if prompt is None or generated is None:
            return None
        return prompt + generated

    def intervals(self):
        """(batch size, generated tokens/s, mean ITL or None) between consecutive readings
        where the engine generated tokens: the batch is the mean of the two readings."""
        out = []
        for a, b in zip(self.readings, self.readings[1:]):
            dt = b.t - a.t
            tokens = _increase(a, b, "vllm_generation_tokens_total")
            if dt <= 0 or tokens <= 0:
                continue
            count = _increase(a, b, "vllm_inter_token_latency_seconds_count")
            itl = (_increase(a, b, "vllm_inter_token_latency_seconds_sum") / count
                   if count > 0 else None)
            out.append(((a.running + b.running) / 2, tokens / dt, itl))
        return out

    def engine_gpus(self) -> dict[str, list[GpuReading]]:
        """The readings of each GPU the engine runs on (every GPU when the collector does not
        say which), oldest first."""
        by_gpu: dict[str, list[GpuReading]] = {}
        for reading in self.gpus:
            for index, gpu in reading.items():
                by_gpu.setdefault(index, []).append(gpu)
        visible = {i: rs for i, rs in by_gpu.items() if rs[-1].engine_visible}
        if visible or any(rs[-1].engine_visible is False for rs in by_gpu.values()):
            return visible
        return by_gpu


def _increase(a: ModelReading, b: ModelReading, name: str) -> float:
    before, after = a.values.get(name), b.values.get(name)
    if before is None or after is None:
        return 0.0
    return after - before if after >= before else after


def windows(readings: list[Reading]) -> list[Window]:
    """One window per model present in the newest reading and at least one earlier one."""
    if len(readings) < 2:
        return []
    out = []
    for model in readings[-1].models:
        mine = [(r.models[model], r.gpus) for r in readings if model in r.models]
        if len(mine) >= 2:
            out.append(Window(model, [m for m, _ in mine], [g for _, g in mine]))
    return out
