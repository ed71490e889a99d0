"""GPU memory the engine leaves unused on its cards while its KV cache is short.

Reads vllm_gpu_memory_free_bytes and vllm_gpu_memory_total_bytes of the GPUs the engine runs
on (vllm_gpu_engine_visible), gpu_memory_utilization from vllm_engine_config_info, and the
KV-cache pressure signals (vllm_preemptions_total per finished request, or a saturated
vllm_kv_cache_usage_ratio with requests waiting). Free memory alone is no advice (an engine
that does not need more KV cache is fine); free memory while the KV cache is short is. The
suggestion takes the free share of the tightest card, less a 5-point margin, capped at 0.95.
Absent without NVML (CPU build).
"""

from __future__ import annotations

import math

from ..config import AdviceConfig
from ..model import Advice, Evidence
from ..readings import Window
from .common import preempting
from .evidence import peak_kv_usage, preemptions

NAME = "gpu_memory_unused"


def evaluate(w: Window, s: AdviceConfig) -> list[Advice]:
    gmu = w.setting("gpu_memory_utilization")
    short = preempting(w, s.preemption_ratio) or (
        w.peak("kv_usage") >= s.kv_saturated_ratio and w.peak("waiting") > 0)
    if gmu is None or not short or w.finished() < s.min_requests:
        return []
    ratios = [g[-1].free_bytes / g[-1].total_bytes for g in w.engine_gpus().values()
              if g[-1].total_bytes > 0 and not math.isnan(g[-1].free_bytes)]
    if not ratios or min(ratios) < s.gpu_unused_ratio:
        return []
    free = min(ratios)
    suggested = min(0.95, math.floor((gmu + free - 0.05) * 100) / 100)
    if suggested < gmu + 0.02:
        return []
    return [Advice(
        w.model, NAME, "gpu_memory_utilization", "increase", gmu, suggested,
        throughput="up", latency="down", memory="up", confidence="medium",
        summary=(f"the KV cache is short (preemptions or saturated with a queue) while "
                 f"{free:.0%} of the engine's tightest GPU is free: a larger "
                 "gpu_memory_utilization turns it into KV cache"),
        evidence=(Evidence("vllm_gpu_memory_free_bytes / vllm_gpu_memory_total_bytes", free, 0,
                           "the engine's tightest GPU"),
                  peak_kv_usage(w), preemptions(w)))]
