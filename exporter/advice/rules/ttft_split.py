"""Time to first token dominated by queue time (capacity) or by prefill time (step budget).

Reads the means over the window of vllm_time_to_first_token_seconds,
vllm_request_queue_time_seconds and vllm_request_prefill_time_seconds (finished requests),
vllm_requests_running / vllm_requests_waiting and the engine's max_num_batched_tokens.
- Queue time >= ttft_share of TTFT: the engine is short of capacity. Where the batch is full
  but the KV cache idle, kv_cache_headroom already says "raise max_num_seqs" and this rule
  stays silent; otherwise it suggests servers like this one: the peak demand (running +
  waiting) over the peak batch.
- Prefill time >= ttft_share of TTFT with chunked prefill on and a step budget below twice
  the mean prompt: a prompt takes several steps to prefill; a larger max_num_batched_tokens
  prefills it in fewer (TTFT down, inter-token latency of the others up).
Silent while mean TTFT is below min_ttft_seconds.
"""

from __future__ import annotations

import math

from ..config import AdviceConfig
from ..model import Advice, Evidence
from ..readings import Window
from .common import batch_limit, peak_demand
from .evidence import mean_of, peak_running

NAME = "ttft_split"


def evaluate(w: Window, s: AdviceConfig) -> list[Advice]:
    ttft = w.mean("vllm_time_to_first_token_seconds")
    if w.finished() < s.min_requests or ttft is None or ttft < s.min_ttft_seconds:
        return []
    queue = w.mean("vllm_request_queue_time_seconds") or 0.0
    prefill = w.mean("vllm_request_prefill_time_seconds") or 0.0
    base = (mean_of(w, "vllm_time_to_first_token_seconds", ttft),
            mean_of(w, "vllm_request_queue_time_seconds", queue),
            mean_of(w, "vllm_request_prefill_time_seconds", prefill))
    if queue >= s.ttft_share * ttft:
        return _capacity(w, s, ttft, queue, base)
    if prefill >= s.ttft_share * ttft:
        return _step_budget(w, ttft, prefill, base)
    return []


def _capacity(w: Window, s: AdviceConfig, ttft: float, queue: float,
              base: tuple[Evidence, ...]) -> list[Advice]:
    limit = batch_limit(w)
    served = w.peak("running")
    if limit and served >= limit and w.peak("kv_usage") <= s.kv_unused_ratio:
        return []  # the batch limit, not the engine, holds it back: kv_cache_headroom
    demand = peak_demand(w)
    if served <= 0 or demand <= served:
        return []
    suggested = math.ceil(demand / served)
    if suggested < 2:
        return []
    return [Advice(
        w.model, NAME, "replicas", "increase", 1, suggested,
        throughput="up", latency="down", memory="up",
        confidence="high" if queue >= 0.8 * ttft else "medium",
        summary=(f"{queue / ttft:.0%} of the mean TTFT ({ttft * 1000:,.0f} ms) is queue time "
                 f"with the engine at capacity ({served:.0f} running, {demand:.0f} wanted): "
                 f"about {suggested} servers like this one would serve the peak without a queue"),
        evidence=base + (peak_running(w),
                         Evidence("vllm_requests_running + vllm_requests_waiting", demand,
                                  w.seconds, "peak")))]


def _step_budget(w: Window, ttft: float, prefill: float,
                 base: tuple[Evidence, ...]) -> list[Advice]:
    budget = w.setting("max_num_batched_tokens")
    prompt = w.mean("vllm_request_prompt_tokens")
    if w.setting("enable_chunked_prefill") != 1 or not budget or not prompt:
        return []
    suggested = 2 ** math.ceil(math.log2(2 * prompt))
    if suggested <= budget:
        return []
    return [Advice(
        w.model, NAME, "max_num_batched_tokens", "increase", budget, suggested,
        throughput="none", latency="mixed", memory="up", confidence="medium",
        summary=(f"{prefill / ttft:.0%} of the mean TTFT ({ttft * 1000:,.0f} ms) is prefill and "
                 f"the mean prompt ({prompt:,.0f} tokens) is more than half the step budget of "
                 f"{budget:,.0f} tokens: TTFT down, inter-token latency up while prompts prefill"),
        evidence=base + (mean_of(w, "vllm_request_prompt_tokens", prompt),))]
