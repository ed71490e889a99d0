"""The rules of advice, the forecast and the advisor's families on scripted readings (no
engine): each rule speaks in the state it detects and stays silent on a healthy engine."""

from __future__ import annotations

import json
import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from exporter.advice.advisor import Advisor, results_json
from exporter.advice.config import AdviceConfig
from exporter.advice.forecast import energy_per_output_token, forecast
from exporter.advice.readings import read, windows
from exporter.advice.rules import (RULE_NAMES, RULES, batch_knee, gpu_memory, kv_headroom,
                                   kv_pressure, prefix_cache, spec_decode, ttft_split)
from exporter.advice.service import AdviceService
from exporter.catalog import families_by_name
from exporter.config import ConfigError, load_config
from testsupport.exposition import Samples

S = AdviceConfig()
CONFIG = {"model": "/m", "quantization": "awq", "kv_cache_dtype": "fp8", "max_num_seqs": "64",
          "gpu_memory_utilization": "0.9", "max_num_batched_tokens": "2048",
          "enable_prefix_caching": "True", "enable_chunked_prefill": "True",
          "data_parallel_size": "1", "num_speculative_tokens": "", "max_model_len": "4096"}


class Engine:
    """Cumulative counters and current gauges of one scripted engine; `reading()` samples it
    the way the metrics process reads its registry."""

    def __init__(self, capacity: float = 100_000, gpus: dict | None = None, **config):
        self.t = 1000.0
        self.config = {**CONFIG, **{k: str(v) for k, v in config.items()}}
        self.capacity = capacity
        self.c: dict[str, float] = {}
        self.running = self.waiting = self.kv = 0.0
        self.gpus = gpus  # gpu -> (total, free, visible, energy)
        self.readings = []
        self.step(0)  # every counter present at 0, as after the engine's first scrape

    def add(self, name: str, value: float) -> None:
        self.c[name] = self.c.get(name, 0.0) + value

    def observe(self, histogram: str, value: float, n: float = 1) -> None:
        self.add(histogram + "_sum", value * n)
        self.add(histogram + "_count", n)

    def step(self, seconds: float = 5, *, running=None, waiting=None, kv=None, finished=0,
             prompt=200, generated=100, ttft=0.05, queue=0.01, prefill=0.03, tokens=None,
             itl=0.01, preempted=0, queries=0, hits=0, drafted=0, accepted=0, drafts=0,
             energy=0.0):
        self.t += seconds
        if running is not None:
            self.running = running
        if waiting is not None:
            self.waiting = waiting
        if kv is not None:
            self.kv = kv
        tokens = finished * generated if tokens is None else tokens
        self.add("vllm_requests_finished_total", finished)
        self.add("vllm_generation_tokens_total", tokens)
        self.add("vllm_prompt_tokens_total", finished * prompt)
        self.add("vllm_preemptions_total", preempted)
        self.add("vllm_prefix_cache_queries_total", queries)
        self.add("vllm_prefix_cache_hits_total", hits)
        self.add("vllm_spec_decode_draft_tokens_total", drafted)
        self.add("vllm_spec_decode_accepted_tokens_total", accepted)
        self.add("vllm_spec_decode_drafts_total", drafts)
        for name, value in (("vllm_time_to_first_token_seconds", ttft),
                            ("vllm_request_queue_time_seconds", queue),
                            ("vllm_request_prefill_time_seconds", prefill),
                            ("vllm_request_prompt_tokens", prompt),
                            ("vllm_request_generation_tokens", generated)):
            self.observe(name, value, finished)
        self.observe("vllm_inter_token_latency_seconds", itl, tokens)
        if self.gpus:
            for total, free, visible, joules in self.gpus.values():
                joules[0] += energy
        return self.sample()

    def samples(self):
        labels = {"model": "m", "engine": "0"}
        for name, value in self.c.items():
            yield name, labels, value
        yield "vllm_requests_running", labels, self.running
        yield "vllm_requests_waiting", labels, self.waiting
        yield "vllm_kv_cache_usage_ratio", labels, self.kv
        yield "vllm_kv_cache_capacity_tokens", labels, self.capacity
        yield "vllm_engine_config_info", {**self.config, "model": "m"}, 1.0
        for gpu, (total, free, visible, joules) in (self.gpus or {}).items():
            g = {"gpu": gpu, "uuid": "GPU-" + gpu, "name": "H100"}
            yield "vllm_gpu_memory_total_bytes", g, total
            yield "vllm_gpu_memory_free_bytes", g, free
            yield "vllm_gpu_engine_visible", {**g, "cuda_index": gpu}, float(visible)
            yield "vllm_gpu_energy_joules_total", g, joules[0]

    def sample(self):
        self.readings.append(read(self.t, self.samples()))
        return self

    def window(self):
        (w,) = windows(self.readings)
        return w


def healthy(engine: Engine | None = None, steps: int = 12) -> Engine:
    """Steady moderate load: a batch well under max_num_seqs, no queue, KV cache half used."""
    e = engine or Engine()
    for i in range(steps):
        e.step(running=8 + i % 3, waiting=0, kv=0.3 + 0.01 * (i % 2), finished=10,
               queries=2000, hits=600)
    return e


def only(advice, rule):
    assert [a.rule for a in advice] == [rule] * len(advice) and advice, advice
    return advice


# --- silence -----------------------------------------------------------------------------------

def test_every_rule_is_silent_on_a_healthy_engine():
    w = healthy().window()
    for rule in RULES:
        assert rule.evaluate(w, S) == [], rule.NAME


def test_every_rule_is_silent_on_too_little_evidence():
    e = Engine()
    for _ in range(3):  # 15 finished requests < min_requests, however bad they look
        e.step(running=64, waiting=40, kv=1.0, finished=5, preempted=5, ttft=3, queue=2.5)
    for rule in RULES:
        assert rule.evaluate(e.window(), S) == [], rule.NAME


# --- KV cache --------------------------------------------------------------------------------

def test_kv_pressure_suggests_the_max_num_seqs_the_capacity_holds():
    e = Engine(capacity=10_000, max_num_seqs=64)
    for _ in range(10):
        e.step(running=20, waiting=5, kv=0.98, finished=5, preempted=2, prompt=300, generated=200)
    (a,) = only(kv_pressure.evaluate(e.window(), S), "kv_cache_pressure")
    # 10,000 tokens x 0.95 / 500 tokens per request = 19, rounded down to a multiple of 8
    assert (a.parameter, a.action, a.current, a.suggested) == ("max_num_seqs", "decrease", 64, 16)
    assert a.confidence == "high" and a.latency == "down"
    evidence = {e.series: e.value for e in a.evidence}
    assert evidence["vllm_preemptions_total"] == 20
    assert evidence["vllm_kv_cache_usage_ratio"] == 0.98
    assert math.isclose(a.evidence[0].window_seconds, 50)


def test_kv_pressure_with_max_num_seqs_that_fits_asks_for_memory_without_nvml():
    e = Engine(capacity=100_000, max_num_seqs=16)
    for _ in range(10):
        e.step(running=16, kv=0.99, finished=5, preempted=1, prompt=3000, generated=1000)
    (a,) = kv_pressure.evaluate(e.window(), S)
    assert (a.parameter, a.current, a.suggested, a.confidence) == \
        ("gpu_memory_utilization", 0.9, 0.95, "low")


def test_kv_pressure_is_silent_without_preemptions():
    e = Engine(capacity=10_000)
    for _ in range(10):
        e.step(running=20, kv=0.99, finished=5)
    assert kv_pressure.evaluate(e.window(), S) == []


def test_kv_headroom_raises_max_num_seqs_to_the_demand_when_the_batch_limit_holds_it_back():
    e = Engine(capacity=1_000_000, max_num_seqs=32)
    for _ in range(10):
        e.step(running=32, waiting=16, kv=0.05, finished=10, queue=0.8, ttft=1.0)
    (a,) = only(kv_headroom.evaluate(e.window(), S), "kv_cache_headroom")
    assert (a.parameter, a.action, a.current, a.suggested) == ("max_num_seqs", "increase", 32, 48)
    assert a.confidence == "high" and a.throughput == "up"


def test_kv_headroom_is_bounded_by_the_measured_capacity_and_silent_when_kv_is_used():
    e = Engine(capacity=20_000, max_num_seqs=8)
    for _ in range(10):
        e.step(running=8, waiting=100, kv=0.3, finished=10, queue=0.8, ttft=1.0)
    (a,) = kv_headroom.evaluate(e.window(), S)
    # demand 108 -> 112, but 20,000 tokens x 0.95 hold 63 contexts of 300: 56 (a multiple of 8)
    assert a.suggested == 56
    e2 = Engine(capacity=20_000, max_num_seqs=8)
    for _ in range(10):
        e2.step(running=8, waiting=100, kv=0.8, finished=10, queue=0.8, ttft=1.0)
    assert kv_headroom.evaluate(e2.window(), S) == []


# --- TTFT split, prefix cache, speculative decoding, GPU memory -------------------------------

def test_queue_dominated_ttft_at_capacity_suggests_replicas():
    e = Engine(capacity=10_000, max_num_seqs=64)
    for _ in range(10):
        e.step(running=12, waiting=24, kv=0.95, finished=10, ttft=2.0, queue=1.8, prefill=0.1)
    (a,) = only(ttft_split.evaluate(e.window(), S), "ttft_split")
    assert (a.parameter, a.current, a.suggested, a.confidence) == ("replicas", 1, 3, "high")


def test_queue_dominated_ttft_behind_the_batch_limit_is_left_to_kv_headroom():
    e = Engine(capacity=1_000_000, max_num_seqs=32)
    for _ in range(10):
        e.step(running=32, waiting=16, kv=0.05, finished=10, ttft=1.0, queue=0.8)
    assert ttft_split.evaluate(e.window(), S) == []
    assert kv_headroom.evaluate(e.window(), S)


def test_prefill_dominated_ttft_raises_the_step_budget():
    e = Engine(max_num_batched_tokens=512)
    for _ in range(10):
        e.step(running=4, kv=0.2, finished=10, prompt=1000, ttft=0.5, queue=0.02, prefill=0.45)
    (a,) = ttft_split.evaluate(e.window(), S)
    assert (a.parameter, a.current, a.suggested) == ("max_num_batched_tokens", 512, 2048)
    e = Engine(max_num_batched_tokens=512, enable_chunked_prefill=False)
    for _ in range(10):
        e.step(running=4, kv=0.2, finished=10, prompt=1000, ttft=0.5, queue=0.02, prefill=0.45)
    assert ttft_split.evaluate(e.window(), S) == []


def test_fast_ttft_gets_no_ttft_advice():
    e = Engine()
    for _ in range(10):
        e.step(running=4, waiting=4, kv=0.9, finished=10, ttft=0.1, queue=0.09)
    assert ttft_split.evaluate(e.window(), S) == []


def test_prefix_caching_off_with_prefill_dominated_ttft_is_suggested_on():
    e = Engine(enable_prefix_caching=False)
    for _ in range(10):
        e.step(running=4, kv=0.2, finished=10, ttft=0.5, queue=0.02, prefill=0.45)
    (a,) = only(prefix_cache.evaluate(e.window(), S), "prefix_cache")
    assert (a.parameter, a.action, a.current, a.suggested, a.confidence) == \
        ("enable_prefix_caching", "enable", 0, 1, "low")


def test_useful_prefix_cache_short_of_kv_asks_for_more_memory():
    e = Engine(capacity=100_000, max_num_seqs=16)
    for _ in range(10):
        e.step(running=16, kv=0.97, finished=10, preempted=1, queries=3000, hits=1500)
    (a,) = prefix_cache.evaluate(e.window(), S)
    assert (a.parameter, a.current, a.suggested) == ("gpu_memory_utilization", 0.9, 0.95)
    assert {x.series: x.value for x in a.evidence}[
        "vllm_prefix_cache_hits_total / vllm_prefix_cache_queries_total"] == 0.5
    e = Engine(capacity=100_000, max_num_seqs=16)  # the same without hits: silent
    for _ in range(10):
        e.step(running=16, kv=0.97, finished=10, preempted=1, queries=3000, hits=30)
    assert prefix_cache.evaluate(e.window(), S) == []


def test_rarely_accepted_speculation_is_turned_down_or_off():
    e = Engine(num_speculative_tokens=4, speculative_method="ngram")
    for _ in range(10):
        e.step(running=4, finished=10, drafted=400, accepted=20, drafts=100)
    (a,) = only(spec_decode.evaluate(e.window(), S), "spec_decode")
    assert (a.action, a.current, a.suggested) == ("disable", 4, 0)
    e = Engine(num_speculative_tokens=4, speculative_method="ngram")
    for _ in range(10):
        e.step(running=4, finished=10, drafted=400, accepted=80, drafts=100)
    (a,) = spec_decode.evaluate(e.window(), S)
    assert (a.action, a.current, a.suggested) == ("decrease", 4, 1)
    e = Engine(num_speculative_tokens=4, speculative_method="ngram")
    for _ in range(10):
        e.step(running=4, finished=10, drafted=400, accepted=280, drafts=100)
    assert spec_decode.evaluate(e.window(), S) == []


GiB = 2**30


def gpus(free_gib: float, visible: bool = True) -> dict:
    return {"0": (80 * GiB, free_gib * GiB, visible, [1000.0])}


def test_free_gpu_memory_while_the_kv_cache_is_short_raises_gpu_memory_utilization():
    e = Engine(capacity=100_000, max_num_seqs=16, gpus=gpus(16))
    for _ in range(10):
        e.step(running=16, kv=0.99, finished=10, preempted=1, prompt=3000)
    (a,) = only(gpu_memory.evaluate(e.window(), S), "gpu_memory_unused")
    assert (a.current, a.suggested) == (0.9, 0.95)  # 0.9 + 0.2 free - 0.05, capped at 0.95
    assert kv_pressure.evaluate(e.window(), S) == []  # NVML sizes it: no second opinion
    e = Engine(capacity=100_000, max_num_seqs=16, gpus=gpus(16))
    healthy(e)  # free memory, but nothing needs it
    assert gpu_memory.evaluate(e.window(), S) == []
    e = Engine(capacity=100_000, max_num_seqs=16, gpus=gpus(16, visible=False))
    for _ in range(10):  # another engine's GPU
        e.step(running=16, kv=0.99, finished=10, preempted=1, prompt=3000)
    assert gpu_memory.evaluate(e.window(), S) == []


# --- the batch-size knee -----------------------------------------------------------------------

def knee_engine(shape: list[tuple[int, float, float]], max_num_seqs: int = 32) -> Engine:
    """Three sample intervals at each (batch, tokens/s, ITL)."""
    e = Engine(max_num_seqs=max_num_seqs)
    for batch, tps, itl in shape:
        e.step(running=batch)  # the first interval at this batch mixes two sizes
        for _ in range(3):
            e.step(5, running=batch, tokens=tps * 5, itl=itl)
    return e


def test_the_knee_is_where_throughput_stops_growing_while_itl_still_grows():
    e = knee_engine([(1, 100, 0.010), (2, 190, 0.0105), (4, 360, 0.011), (8, 380, 0.021),
                     (16, 385, 0.041)])
    assert [g[0] for g in batch_knee.groups(e.window(), 3)] == [1, 2, 4, 8, 16]
    (a,) = only(batch_knee.evaluate(e.window(), S), "batch_size_knee")
    assert (a.parameter, a.action, a.current, a.suggested, a.confidence) == \
        ("max_num_seqs", "decrease", 32, 4, "medium")


def test_no_knee_while_throughput_scales_or_never_scaled_or_too_few_sizes():
    scaling = [(1, 100, 0.010), (2, 190, 0.0105), (4, 360, 0.011), (8, 700, 0.012),
               (16, 1300, 0.014)]
    flat = [(1, 100, 0.010), (2, 102, 0.02), (4, 103, 0.04), (8, 104, 0.08)]
    two = [(1, 100, 0.010), (2, 190, 0.0105)]
    for shape in (scaling, flat, two):
        assert batch_knee.evaluate(knee_engine(shape).window(), S) == [], shape
    knee_at_limit = [(1, 100, 0.010), (2, 190, 0.0105), (4, 360, 0.011), (8, 380, 0.021),
                     (16, 385, 0.041)]
    assert batch_knee.evaluate(knee_engine(knee_at_limit, max_num_seqs=4).window(), S) == []


# --- the evidence of every piece of advice -----------------------------------------------------

def without(e: Engine, *families: str) -> Engine:
    """The engine's readings as an exporter that never saw these families reads them."""
    for r in e.readings:
        for m in r.models.values():
            for name in [n for n in m.values if n.startswith(families)]:
                del m.values[name]
    return e


def pressed(e: Engine) -> Engine:
    for _ in range(10):
        e.step(running=20, waiting=5, kv=0.98, finished=5, preempted=2, prompt=300, generated=200)
    return e


def short_of_kv(e: Engine) -> Engine:
    for _ in range(10):
        e.step(running=16, kv=0.99, finished=5, preempted=1, prompt=3000, generated=1000)
    return e


def batch_limited(e: Engine) -> Engine:
    for _ in range(10):
        e.step(running=32, waiting=40, kv=0.05, finished=10, queue=0.8, ttft=1.0)
    return e


def prefill_bound(e: Engine) -> Engine:
    for _ in range(10):
        e.step(running=4, kv=0.2, finished=10, prompt=1000, ttft=0.5, queue=0.02, prefill=0.45)
    return e


def speculating(accepted: float) -> Engine:
    e = Engine(num_speculative_tokens=4, speculative_method="ngram")
    for _ in range(10):
        e.step(running=4, finished=10, drafted=400, accepted=accepted, drafts=100)
    return e


def queued(e: Engine) -> Engine:
    for _ in range(10):
        e.step(running=12, waiting=24, kv=0.95, finished=10, ttft=2.0, queue=1.8, prefill=0.1)
    return e


def caching(e: Engine) -> Engine:
    for _ in range(10):
        e.step(running=16, kv=0.97, finished=10, preempted=1, queries=3000, hits=1500)
    return e


KNEE = [(1, 100, 0.010), (2, 190, 0.0105), (4, 360, 0.011), (8, 380, 0.021), (16, 385, 0.041)]
EVIDENCE_CASES = {
    "kv_pressure decrease": (kv_pressure, lambda: pressed(Engine(capacity=10_000))),
    "kv_pressure decrease, two ranks": (
        kv_pressure, lambda: short_of_kv(Engine(max_num_seqs=16, data_parallel_size=2))),
    "kv_pressure memory": (kv_pressure, lambda: short_of_kv(Engine(max_num_seqs=16))),
    "kv_pressure memory, no lengths": (kv_pressure, lambda: without(
        pressed(Engine(capacity=10_000)), "vllm_request_prompt_tokens",
        "vllm_request_generation_tokens")),
    "kv_headroom, two ranks": (kv_headroom, lambda: batch_limited(
        Engine(capacity=1_000_000, max_num_seqs=16, data_parallel_size=2))),
    "ttft_split replicas": (ttft_split, lambda: queued(Engine(capacity=10_000))),
    "ttft_split step budget": (ttft_split,
                               lambda: prefill_bound(Engine(max_num_batched_tokens=512))),
    "ttft_split step budget, no queue time": (ttft_split, lambda: without(
        prefill_bound(Engine(max_num_batched_tokens=512)), "vllm_request_queue_time_seconds")),
    "prefix_cache off": (prefix_cache,
                         lambda: prefill_bound(Engine(enable_prefix_caching=False))),
    "prefix_cache on": (prefix_cache, lambda: caching(Engine(max_num_seqs=16))),
    "spec_decode disable": (spec_decode, lambda: speculating(20)),
    "spec_decode decrease": (spec_decode, lambda: speculating(80)),
    "gpu_memory": (gpu_memory, lambda: short_of_kv(Engine(max_num_seqs=16, gpus=gpus(16)))),
    "batch_knee": (batch_knee, lambda: knee_engine(KNEE)),
}
# Each case: the evidence of each piece of advice, as (series, value, window, note).
CONTEXT = "vllm_request_prompt_tokens + vllm_request_generation_tokens"
PER_CONTEXT = "mean context per finished request"
ACCEPTANCE = "vllm_spec_decode_accepted_tokens_total / vllm_spec_decode_draft_tokens_total"
PER_DRAFT = "vllm_spec_decode_accepted_tokens_total / vllm_spec_decode_drafts_total"
KNEE_TPS, KNEE_ITL = "rate(vllm_generation_tokens_total)", "vllm_inter_token_latency_seconds"
EXPECTED_EVIDENCE = {
    "kv_pressure decrease": [[
        ("vllm_preemptions_total", 20, 50.0, "increase"),
        ("vllm_requests_finished_total", 50, 50.0, "increase"),
        ("vllm_kv_cache_usage_ratio", 0.98, 50.0, "peak"),
        ("vllm_kv_cache_capacity_tokens", 10000, 0, "per engine rank"),
        (CONTEXT, 500, 50.0, PER_CONTEXT)]],
    "kv_pressure decrease, two ranks": [[
        ("vllm_preemptions_total", 10, 50.0, "increase"),
        ("vllm_requests_finished_total", 50, 50.0, "increase"),
        ("vllm_kv_cache_usage_ratio", 0.99, 50.0, "peak"),
        ("vllm_kv_cache_capacity_tokens", 50000, 0, "per engine rank"),
        (CONTEXT, 4000, 50.0, PER_CONTEXT)]],
    "kv_pressure memory": [[
        ("vllm_preemptions_total", 10, 50.0, "increase"),
        ("vllm_requests_finished_total", 50, 50.0, "increase"),
        ("vllm_kv_cache_usage_ratio", 0.99, 50.0, "peak"),
        ("vllm_kv_cache_capacity_tokens", 100000, 0, "per engine rank"),
        (CONTEXT, 4000, 50.0, PER_CONTEXT)]],
    "kv_pressure memory, no lengths": [[
        ("vllm_preemptions_total", 20, 50.0, "increase"),
        ("vllm_requests_finished_total", 50, 50.0, "increase"),
        ("vllm_kv_cache_usage_ratio", 0.98, 50.0, "peak"),
        ("vllm_kv_cache_capacity_tokens", 10000, 0, "per engine rank")]],
    "kv_headroom, two ranks": [[
        ("vllm_requests_running", 32, 50.0, "peak"),
        ("vllm_requests_waiting", 40, 50.0, "peak"),
        ("vllm_kv_cache_usage_ratio", 0.05, 50.0, "peak"),
        ("vllm_request_queue_time_seconds", 0.8, 50.0, "mean"),
        ("vllm_kv_cache_capacity_tokens", 500000, 0, "per engine rank"),
        (CONTEXT, 300, 50.0, PER_CONTEXT)]],
    "ttft_split replicas": [[
        ("vllm_time_to_first_token_seconds", 2, 50.0, "mean"),
        ("vllm_request_queue_time_seconds", 1.8, 50.0, "mean"),
        ("vllm_request_prefill_time_seconds", 0.1, 50.0, "mean"),
        ("vllm_requests_running", 12, 50.0, "peak"),
        ("vllm_requests_running + vllm_requests_waiting", 36, 50.0, "peak")]],
    "ttft_split step budget": [[
        ("vllm_time_to_first_token_seconds", 0.5, 50.0, "mean"),
        ("vllm_request_queue_time_seconds", 0.02, 50.0, "mean"),
        ("vllm_request_prefill_time_seconds", 0.45, 50.0, "mean"),
        ("vllm_request_prompt_tokens", 1000, 50.0, "mean")]],
    "ttft_split step budget, no queue time": [[
        ("vllm_time_to_first_token_seconds", 0.5, 50.0, "mean"),
        ("vllm_request_queue_time_seconds", 0, 50.0, "mean"),  # absent: stated as 0
        ("vllm_request_prefill_time_seconds", 0.45, 50.0, "mean"),
        ("vllm_request_prompt_tokens", 1000, 50.0, "mean")]],
    "prefix_cache off": [[
        ("vllm_time_to_first_token_seconds", 0.5, 50.0, "mean"),
        ("vllm_request_prefill_time_seconds", 0.45, 50.0, "mean")]],
    "prefix_cache on": [[
        ("vllm_prefix_cache_hits_total / vllm_prefix_cache_queries_total", 0.5, 50.0,
         "hit ratio"),
        ("vllm_prefix_cache_queries_total", 30000, 50.0, "increase"),
        ("vllm_kv_cache_usage_ratio", 0.97, 50.0, "peak"),
        ("vllm_preemptions_total", 10, 50.0, "increase")]],
    "spec_decode disable": [[
        (ACCEPTANCE, 0.05, 50.0, "acceptance rate"),
        ("vllm_spec_decode_draft_tokens_total", 4000, 50.0, "increase"),
        (PER_DRAFT, 0.2, 50.0, "accepted tokens per draft")]],
    "spec_decode decrease": [[
        (ACCEPTANCE, 0.2, 50.0, "acceptance rate"),
        ("vllm_spec_decode_draft_tokens_total", 4000, 50.0, "increase"),
        (PER_DRAFT, 0.8, 50.0, "accepted tokens per draft")]],
    "gpu_memory": [[
        ("vllm_gpu_memory_free_bytes / vllm_gpu_memory_total_bytes", 0.2, 0,
         "the engine's tightest GPU"),
        ("vllm_kv_cache_usage_ratio", 0.99, 50.0, "peak"),
        ("vllm_preemptions_total", 10, 50.0, "increase")]],
    "batch_knee": [[
        (KNEE_TPS + " at batch <= 4", 360, 100.0, "median over sample intervals"),
        (KNEE_TPS + " at batch <= 16", 385, 100.0, "median over sample intervals"),
        (KNEE_ITL + " at batch <= 4", 0.011, 100.0, "median of interval means"),
        (KNEE_ITL + " at batch <= 16", 0.041, 100.0, "median of interval means")]],
}


@pytest.mark.parametrize("case", sorted(EVIDENCE_CASES))
def test_every_piece_of_advice_states_its_evidence(case):
    """Series, value (as /advice writes it), window and note of each piece of evidence: the
    /advice page and `advise` print exactly these."""
    rule, engine = EVIDENCE_CASES[case]
    advice = rule.evaluate(engine().window(), S)
    stated = [[(x["series"], x["value"], x["window_seconds"], x.get("note", ""))
               for x in a.to_json()["evidence"]] for a in advice]
    assert stated == EXPECTED_EVIDENCE[case]


def test_the_evidence_of_every_rule_is_pinned():
    assert {rule.NAME for rule, _ in EVIDENCE_CASES.values()} == set(RULE_NAMES)
    assert set(EVIDENCE_CASES) == set(EXPECTED_EVIDENCE)


# --- forecast and energy -----------------------------------------------------------------------

def test_forecast_extrapolates_the_window_growth():
    e = Engine(capacity=10_000, max_num_seqs=64)
    for i in range(1, 11):
        e.step(10, running=2 * i, kv=0.05 * i, finished=10, prompt=150, generated=50)
    f = forecast(e.window())
    assert math.isclose(f["kv_headroom_tokens"], 5000)
    assert math.isclose(f["kv_headroom_requests"], 25)  # 5,000 tokens / 200 per request
    assert math.isclose(f["kv_full_seconds"], 0.5 / 0.005, rel_tol=1e-6)  # usage +0.005/s
    assert math.isclose(f["batch_full_seconds"], 44 / 0.2, rel_tol=1e-6)  # 20 of 64, +0.2/s


def test_forecast_is_zero_when_full():
    e = Engine(capacity=10_000, max_num_seqs=8)
    for _ in range(5):
        e.step(running=8, kv=1.0, finished=10)
    f = forecast(e.window())
    assert f["kv_full_seconds"] == 0 and f["batch_full_seconds"] == 0


def test_energy_per_output_token_from_the_engines_gpus():
    e = Engine(gpus=gpus(10))
    for _ in range(4):
        e.step(running=4, finished=10, generated=100, energy=2000.0)
    assert math.isclose(energy_per_output_token(e.window()), 2.0)  # 8,000 J / 4,000 tokens
    assert energy_per_output_token(healthy().window()) is None  # no NVML: absent


# --- the advisor, its families and page --------------------------------------------------------

def test_advisor_keeps_one_window_and_reports_silent_rules():
    advisor = Advisor(AdviceConfig(window_seconds=30, interval_seconds=5))
    e = healthy()
    for r in e.readings:
        advisor.add(r)
    assert advisor.readings[-1].t - advisor.readings[0].t <= 30 + 5
    (result,) = advisor.evaluate()
    assert result.advice == [] and result.silent == list(RULE_NAMES)
    body = results_json([result], advisor.settings, 1.0)
    assert body["applied"] is False and body["models"][0]["advice"] == []
    json.dumps(body)


def test_a_broken_rule_is_counted_and_the_others_still_speak(monkeypatch):
    failed = []
    advisor = Advisor(S, on_error=failed.append)
    monkeypatch.setattr(batch_knee, "evaluate", lambda w, s: 1 / 0)
    e = Engine(capacity=10_000, max_num_seqs=64)
    for _ in range(10):
        e.step(running=20, waiting=5, kv=0.98, finished=5, preempted=2, prompt=300, generated=200)
    for r in e.readings:
        advisor.add(r)
    (result,) = advisor.evaluate()
    assert failed == ["batch_size_knee"]
    assert "kv_cache_pressure" in {a.rule for a in result.advice}


def engine_registry(registry: CollectorRegistry | None = None) -> tuple[CollectorRegistry, dict]:
    """A registry with the engine families the advisor reads, as the metrics process has."""
    registry = registry or CollectorRegistry()
    labels = ("model", "engine")
    made = {
        "running": Gauge("vllm_requests_running", "r", labels, registry=registry),
        "waiting": Gauge("vllm_requests_waiting", "w", labels, registry=registry),
        "kv": Gauge("vllm_kv_cache_usage_ratio", "k", labels, registry=registry),
        "capacity": Gauge("vllm_kv_cache_capacity_tokens", "c", labels, registry=registry),
        "finished": Counter("vllm_requests_finished_total", "f", labels + ("finish_reason",),
                            registry=registry),
        "preempted": Counter("vllm_preemptions_total", "p", labels, registry=registry),
        "tokens": Counter("vllm_generation_tokens_total", "t", labels, registry=registry),
        "config": Gauge("vllm_engine_config_info", "i", tuple(CONFIG), registry=registry),
    }
    for name in ("vllm_request_prompt_tokens", "vllm_request_generation_tokens"):
        made[name] = (Gauge(name + "_sum", "s", labels, registry=registry),
                      Gauge(name + "_count", "n", labels, registry=registry))
    made["config"].labels(**{**CONFIG, "model": "m", "max_num_seqs": "64"}).set(1)
    made["capacity"].labels("m", "0").set(10_000)
    return registry, made


def test_service_publishes_families_and_the_advice_page():
    registry, m = engine_registry()
    routes = {}
    service = AdviceService(AdviceConfig(min_requests=5))
    service.start(registry, add_route=lambda path, route, _: routes.update({path: route}),
                  thread=False)
    t = 1000.0
    for i in range(4):
        m["running"].labels("m", "0").set(20)
        m["kv"].labels("m", "0").set(0.97)
        m["finished"].labels("m", "0", "length").inc(10 * (i > 0))
        m["preempted"].labels("m", "0").inc(3 * (i > 0))
        for name, per in (("vllm_request_prompt_tokens", 300), ("vllm_request_generation_tokens",
                                                                200)):
            m[name][0].labels("m", "0").set(per * 10 * i)
            m[name][1].labels("m", "0").set(10 * i)
        service.tick(t + 5 * i)
    s = Samples(generate_latest(registry).decode())
    info = [labels for labels, _ in s.series("vllm_advice_info")]
    assert {"model": "m", "rule": "kv_cache_pressure", "parameter": "max_num_seqs",
            "action": "decrease", "throughput": "mixed", "latency": "down", "memory": "none",
            "confidence": "high"} in info
    key = dict(model="m", rule="kv_cache_pressure", parameter="max_num_seqs")
    assert s.get("vllm_advice_current_value", **key) == 64
    assert s.get("vllm_advice_suggested_value", **key) == 16
    assert s.get("vllm_advice_rule_active", model="m", rule="kv_cache_pressure") == 1
    assert s.get("vllm_advice_rule_active", model="m", rule="spec_decode") == 0
    assert s.get("vllm_forecast_kv_cache_headroom_tokens", model="m") == pytest.approx(300)
    assert s.get("vllm_exporter_advice_evaluations_total") == 4
    status, content_type, body = routes["/advice"]()
    page = json.loads(body)
    assert status == 200 and content_type == "application/json"
    (model,) = page["models"]
    (advice,) = [a for a in model["advice"] if a["rule"] == "kv_cache_pressure"]
    assert advice["suggested"] == 16 and advice["evidence"][0]["value"] == 9


def test_every_published_label_is_declared_and_bounded():
    specs = families_by_name()
    for name in ("vllm_advice_info", "vllm_advice_current_value", "vllm_advice_suggested_value",
                 "vllm_advice_rule_active", "vllm_forecast_kv_cache_full_seconds",
                 "vllm_energy_per_output_token_joules"):
        assert name in specs
    assert set(specs["vllm_advice_info"].labels) == {
        "model", "rule", "parameter", "action", "throughput", "latency", "memory", "confidence"}


def test_advice_config_errors_name_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    for body, field in (("advice: {window_seconds: 5, interval_seconds: 5}",
                         "advice.window_seconds"),
                        ("advice: {kv_unused_ratio: 0.95}", "advice.kv_unused_ratio"),
                        ("advice: {min_requests: 0}", "advice.min_requests"),
                        ("advice: {nope: 1}", "advice.nope")):
        path.write_text(body)
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(str(path))
    assert load_config(None).advice.enabled


def test_the_gpu_collectors_readings_reach_the_advisor():
    """Through the real GPU collector (fake NVML, the recorded H200): free memory and energy
    per generated token."""
    import os

    from exporter.gpu import GpuCollector, GpuConfig
    from testsupport import fake_pynvml

    fake = fake_pynvml.FakeNvml(fake_pynvml.load_recording())
    registry = CollectorRegistry()
    clock = [1000.0]
    collector = GpuCollector(GpuConfig(xid_events=False), root_pid=os.getpid(), nvml=fake,
                             clock=lambda: clock[0])
    registry.register(collector)
    registry, m = engine_registry(registry)
    service = AdviceService(AdviceConfig())
    service.start(registry, thread=False)
    try:
        start = 5_000_000  # mJ
        for i in range(3):
            fake.set_value(0, "nvmlDeviceGetTotalEnergyConsumption", start + i * 1_000_000)
            clock[0] += 3600  # the slow group (energy) is due again
            collector.sample_once()
            m["tokens"].labels("m", "0").inc(500 * (i > 0))
            service.tick(1000.0 + 5 * i)
        reading = service.advisor.readings[-1]
        (gpu,) = reading.gpus.values()
        assert gpu.total_bytes > 0 and 0 <= gpu.free_bytes <= gpu.total_bytes
        (result,) = service.advisor.evaluate()
        assert result.energy_per_output_token == pytest.approx(2.0)  # 2,000 J / 1,000 tokens
        s = Samples(generate_latest(registry).decode())
        assert s.get("vllm_energy_per_output_token_joules", model="m", quantization="awq",
                     kv_cache_dtype="fp8") == pytest.approx(2.0)
    finally:
        collector.stop()


# --- the output-health canary ------------------------------------------------------------------

def test_canary_compares_each_answer_with_the_first():
    from exporter.advice.canary import Answer, compare

    first = Answer(("a", "b", "c", "d"), (-0.1, -0.2, -0.3, -0.4))
    assert compare(first, first) == (1.0, 0.0)
    drifted = Answer(("a", "b", "c", "d"), (-0.1, -0.25, -0.3, -0.4))
    assert compare(first, drifted) == (1.0, pytest.approx(0.05))
    diverged = Answer(("a", "b", "x", "y"), (-0.1, -0.2, -5.0, -1.0))
    assert compare(first, diverged) == (0.5, pytest.approx(0.0))


def test_canary_against_an_api_publishes_its_families():
    import http.server
    import threading

    answers = [["a", "b", "c", "d"], ["a", "b", "c", "d"], ["a", "x", "c", "d"]]

    class Api(http.server.BaseHTTPRequestHandler):
        def _send(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            self._send({"data": [{"id": "m"}]})

        def do_POST(self):  # noqa: N802
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert request["temperature"] == 0 and request["model"] == "m"
            tokens = answers.pop(0)
            self._send({"choices": [{"logprobs": {"tokens": tokens,
                                                  "token_logprobs": [-0.5] * len(tokens)}}]})

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    registry = CollectorRegistry()
    service = AdviceService(AdviceConfig(canary_interval_seconds=3600),
                            api_url=f"http://127.0.0.1:{server.server_address[1]}")
    try:
        service.start(registry, thread=False)
        for expected in (1.0, 1.0, 0.25):
            service.canary.probe()
            s = Samples(generate_latest(registry).decode())
            assert s.get("vllm_canary_token_match_ratio", model="m") == expected
        assert s.get("vllm_canary_requests_total", model="m", result="ok") == 3
        assert s.get("vllm_canary_logprob_drift", model="m") == 0
    finally:
        service.stop()
        server.shutdown()
    service = AdviceService(AdviceConfig(canary_interval_seconds=3600),
                            api_url="http://127.0.0.1:1")
    service.start(CollectorRegistry(), thread=False)
    service.canary.probe()  # nothing listens: counted nowhere (no model known), no exception
    service.stop()
    assert AdviceService(AdviceConfig()).canary is None  # off by default


def test_advise_reads_a_prometheus_server_and_prints_readably():
    import http.server
    import threading
    import urllib.parse

    from exporter.advice.cli import format_advice, from_prometheus

    labels = {"instance": "h:9410", "model": "m", "rule": "kv_cache_pressure",
              "parameter": "max_num_seqs"}
    results = {
        "vllm_advice_info": [{"metric": {**labels, "__name__": "vllm_advice_info",
                                         "action": "decrease", "throughput": "mixed",
                                         "latency": "down", "memory": "none",
                                         "confidence": "high"}, "value": [0, "1"]}],
        "vllm_advice_current_value": [{"metric": labels, "value": [0, "64"]}],
        "vllm_advice_suggested_value": [{"metric": labels, "value": [0, "16"]}],
    }

    class Prom(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)["query"][0]
            data = json.dumps({"status": "success", "data": {"resultType": "vector",
                                                             "result": results[query]}}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Prom)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        body = from_prometheus(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
    (model,) = body["models"]
    (a,) = model["advice"]
    assert (a["current"], a["suggested"], a["action"]) == (64, 16, "decrease")
    text = format_advice(body)
    assert "model m on h:9410" in text
    assert "[high] max_num_seqs: 64 -> 16 (decrease; throughput mixed, latency down, " \
           "memory none)  rule kv_cache_pressure" in text
    assert text.endswith("advice is never applied: change the settings yourself and restart "
                         "the engine")
