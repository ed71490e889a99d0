"""KV headroom never used while requests queue at a full batch: raise max_num_seqs.

Reads vllm_requests_running (peak, against max_num_seqs x data-parallel ranks),
vllm_requests_waiting, vllm_kv_cache_usage_ratio (peak), vllm_request_queue_time_seconds and
the length histograms. When the batch is full, requests wait, and the KV cache never passed
kv_unused_ratio, the batch limit holds the engine back, not memory. The suggestion covers the
demand seen (running + waiting, rounded up to 8), bounded by what the measured KV capacity
holds at the observed mean context.
"""

from __future__ import annotations

from ..config import AdviceConfig
from ..model import Advice, Evidence
from ..readings import Window
from .common import batch_limit, peak_demand, ranks, round_up_8, seqs_that_fit
from .evidence import capacity_per_rank, mean_context, mean_of, peak_kv_usage, peak_running

NAME = "kv_cache_headroom"


def evaluate(w: Window, s: AdviceConfig) -> list[Advice]:
    limit, current = batch_limit(w), w.setting("max_num_seqs")
    context, queue = w.mean_context_tokens(), w.mean("vllm_request_queue_time_seconds")
    if (w.finished() < s.min_requests or not limit or not context or not queue
            or w.peak("running") < limit or w.peak("waiting") <= 0
            or w.peak("kv_usage") > s.kv_unused_ratio):
        return []
    per_rank = w.latest.capacity_tokens / ranks(w)
    fit = seqs_that_fit(per_rank, context)
    demand = peak_demand(w) / ranks(w)
    suggested = min(fit, round_up_8(demand))
    if suggested < 1.25 * current:
        return []
    ttft = w.mean("vllm_time_to_first_token_seconds")
    return [Advice(
        w.model, NAME, "max_num_seqs", "increase", current, suggested,
        throughput="up", latency="mixed", memory="none",
        confidence="high" if ttft and queue >= s.ttft_share * ttft else "medium",
        summary=(f"the batch was full ({w.peak('running'):.0f} running) and requests waited "
                 f"{queue * 1000:,.0f} ms on average, while the KV cache never passed "
                 f"{w.peak('kv_usage'):.0%}: {suggested} sequences of {context:,.0f} tokens "
                 f"fit (TTFT down, inter-token latency up with the bigger batch)"),
        evidence=(
            peak_running(w),
            Evidence("vllm_requests_waiting", w.peak("waiting"), w.seconds, "peak"),
            peak_kv_usage(w),
            mean_of(w, "vllm_request_queue_time_seconds", queue),
            capacity_per_rank(per_rank),
            mean_context(w, context),
        ))]
