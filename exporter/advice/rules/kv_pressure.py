"""KV cache saturated, with preemptions: fewer sequences at once (or more KV memory).

Reads vllm_preemptions_total and vllm_requests_finished_total (preemptions per finished
request), vllm_kv_cache_usage_ratio (peak), vllm_kv_cache_capacity_tokens and the prompt and
generation length histograms (mean context per request). Each preemption throws a sequence's
KV away and recomputes it later, so the batch asks for more KV than the cache holds: a
max_num_seqs that the measured capacity holds at the observed context stops it. Where
max_num_seqs already fits, the contexts are longer than the cache: more KV memory (low
confidence; the gpu_memory_unused rule says how much where NVML shows free memory).
"""

from __future__ import annotations

from ..config import AdviceConfig
from ..model import Advice, Evidence
from ..readings import Window
from .common import preempting, ranks, seqs_that_fit
from .evidence import capacity_per_rank, mean_context, peak_kv_usage, preemptions

NAME = "kv_cache_pressure"


def evaluate(w: Window, s: AdviceConfig) -> list[Advice]:
    finished = w.finished()
    if finished < s.min_requests or not preempting(w, s.preemption_ratio):
        return []
    preempted = w.delta("vllm_preemptions_total")
    peak = w.peak("kv_usage")
    context = w.mean_context_tokens()
    capacity = w.latest.capacity_tokens / ranks(w)
    evidence = (
        preemptions(w),
        Evidence("vllm_requests_finished_total", finished, w.seconds, "increase"),
        peak_kv_usage(w),
        capacity_per_rank(capacity),
    )
    current = w.setting("max_num_seqs")
    strong = preempted >= 0.1 * finished and peak >= s.kv_saturated_ratio
    if context and capacity > 0 and current:
        fit = seqs_that_fit(capacity, context)
        evidence += (mean_context(w, context),)
        if fit < current:
            return [Advice(
                w.model, NAME, "max_num_seqs", "decrease", current, fit,
                throughput="mixed", latency="down", memory="none",
                confidence="high" if strong else "medium",
                summary=(f"{preempted:.0f} preemptions for {finished:.0f} finished requests: "
                         f"{capacity:,.0f} KV tokens hold {fit} sequences of the mean "
                         f"{context:,.0f}-token context, not {current:.0f}"),
                evidence=evidence)]
    if w.engine_gpus():
        return []  # the gpu_memory_unused rule sizes the memory from what NVML sees
    gmu = w.setting("gpu_memory_utilization")
    if gmu is None or gmu >= 0.95:
        return []
    return [Advice(
        w.model, NAME, "gpu_memory_utilization", "increase", gmu, round(min(0.95, gmu + 0.05), 2),
        throughput="up", latency="down", memory="up", confidence="low",
        summary=(f"{preempted:.0f} preemptions although max_num_seqs fits the mean context: "
                 "the contexts need more KV cache than it holds"),
        evidence=evidence)]
