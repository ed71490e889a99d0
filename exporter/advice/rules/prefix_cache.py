"""Prefix caching off while TTFT is prefill time, or on and useful but short of KV cache.

Reads enable_prefix_caching from vllm_engine_config_info, vllm_prefix_cache_queries_total and
vllm_prefix_cache_hits_total (the hit ratio over the window), vllm_kv_cache_usage_ratio (peak),
vllm_preemptions_total and the TTFT / prefill histograms.
- Off, and prefill is ttft_share of a TTFT above min_ttft_seconds: turn it on (low confidence:
  it pays only where prompts share prefixes, which an engine without it cannot measure).
- On, hitting at least prefix_hit_ratio, with the KV cache saturated and preempting: cached
  prefixes are evicted for running requests; more KV memory keeps them (gpu_memory_utilization).
"""

from __future__ import annotations

from ..config import AdviceConfig
from ..model import Advice, Evidence
from ..readings import Window
from .common import preempting
from .evidence import mean_of, peak_kv_usage, preemptions

NAME = "prefix_cache"


def evaluate(w: Window, s: AdviceConfig) -> list[Advice]:
    if w.finished() < s.min_requests:
        return []
    caching = w.setting("enable_prefix_caching")
    if caching == 0:
        return _off(w, s)
    if caching == 1:
        return _on(w, s)
    return []


def _off(w: Window, s: AdviceConfig) -> list[Advice]:
    ttft = w.mean("vllm_time_to_first_token_seconds")
    prefill = w.mean("vllm_request_prefill_time_seconds")
    if ttft is None or prefill is None or ttft < s.min_ttft_seconds \
            or prefill < s.ttft_share * ttft:
        return []
    return [Advice(
        w.model, NAME, "enable_prefix_caching", "enable", 0, 1,
        throughput="up", latency="down", memory="none", confidence="low",
        summary=(f"prefix caching is off and {prefill / ttft:.0%} of the mean TTFT "
                 f"({ttft * 1000:,.0f} ms) is prefill: if prompts share prefixes (system prompts, "
                 "conversation history), caching skips their prefill"),
        evidence=(mean_of(w, "vllm_time_to_first_token_seconds", ttft),
                  mean_of(w, "vllm_request_prefill_time_seconds", prefill)))]


def _on(w: Window, s: AdviceConfig) -> list[Advice]:
    queries = w.delta("vllm_prefix_cache_queries_total")
    hits = w.delta("vllm_prefix_cache_hits_total")
    gmu = w.setting("gpu_memory_utilization")
    peak = w.peak("kv_usage")
    if queries <= 0 or hits < s.prefix_hit_ratio * queries or peak < s.kv_saturated_ratio \
            or not preempting(w, s.preemption_ratio) or gmu is None or gmu >= 0.95:
        return []
    return [Advice(
        w.model, NAME, "gpu_memory_utilization", "increase", gmu, round(min(0.95, gmu + 0.05), 2),
        throughput="up", latency="down", memory="up", confidence="medium",
        summary=(f"{hits / queries:.0%} of prompt tokens hit the prefix cache, but the KV cache "
                 f"is full ({peak:.0%}) and preempting: cached prefixes are evicted for running "
                 "requests; a larger KV cache keeps more of them"),
        evidence=(Evidence("vllm_prefix_cache_hits_total / vllm_prefix_cache_queries_total",
                           hits / queries, w.seconds, "hit ratio"),
                  Evidence("vllm_prefix_cache_queries_total", queries, w.seconds, "increase"),
                  peak_kv_usage(w), preemptions(w)))]
