"""The `advice:` section of the config file: the advisor's cadence, window and thresholds."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AdviceConfig:
    # Run the advisor in the metrics process (vllm_advice_* / vllm_forecast_* families and the
    # /advice page). It only reads metrics; nothing is ever applied to the engine.
    enabled: bool = True
    # How often the live metrics are sampled and the rules evaluated.
    interval_seconds: float = 5.0
    # The window every rule looks back over (the samples kept in memory).
    window_seconds: float = 300.0
    # Finished requests the window must hold before a rule that reads request latencies or
    # lengths may speak (fewer: too little evidence, silence).
    min_requests: int = 20
    # KV cache: usage at or above this is saturated; preemptions per finished request at or
    # above preemption_ratio count as preempting.
    kv_saturated_ratio: float = 0.9
    preemption_ratio: float = 0.02
    # KV headroom: a peak usage at or below this while the batch is full and requests wait
    # means max_num_seqs, not memory, limits the engine.
    kv_unused_ratio: float = 0.5
    # TTFT split: the share of mean TTFT that queue (or prefill) time must reach, and the mean
    # TTFT below which no TTFT advice is given (fast enough either way).
    ttft_share: float = 0.5
    min_ttft_seconds: float = 0.2
    # Prefix cache: hit ratio at or above which the cache is worth keeping resident.
    prefix_hit_ratio: float = 0.2
    # Speculative decoding: acceptance below this (over at least min_draft_tokens) does not
    # pay for the drafts.
    spec_min_acceptance: float = 0.3
    min_draft_tokens: int = 200
    # GPU memory: the fraction of a card left free, above which raising
    # gpu_memory_utilization is suggested (only while the KV cache is short).
    gpu_unused_ratio: float = 0.1
    # Batch-size knee: throughput growth between two batch sizes below which it has stopped
    # growing (and ITL growth above which latency still grows), and the sample intervals each
    # batch size needs.
    knee_gain: float = 0.1
    knee_min_samples: int = 3
    # The output-health canary (canary.py): one greedy request of canary_prompt to the
    # daemon's own API every canary_interval_seconds, compared with the engine's first
    # answer. 0: off (the default).
    canary_interval_seconds: float = 0.0
    canary_prompt: str = "The quick brown fox jumps over the lazy dog. Once upon a time"
    canary_max_tokens: int = 16

    def problems(self) -> list[tuple[str, str]]:
        out = []
        for name in ("interval_seconds", "window_seconds", "min_ttft_seconds"):
            if getattr(self, name) <= 0:
                out.append((name, f"must be > 0, got {getattr(self, name)}"))
        if self.window_seconds < 2 * self.interval_seconds:
            out.append(("window_seconds", f"must be at least 2 x interval_seconds "
                                          f"({2 * self.interval_seconds:g}), got "
                                          f"{self.window_seconds:g}"))
        for name in ("kv_saturated_ratio", "kv_unused_ratio", "ttft_share", "prefix_hit_ratio",
                     "spec_min_acceptance", "gpu_unused_ratio", "preemption_ratio"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                out.append((name, f"must be in (0, 1], got {value}"))
        if self.kv_unused_ratio >= self.kv_saturated_ratio:
            out.append(("kv_unused_ratio", f"must be below kv_saturated_ratio "
                                           f"({self.kv_saturated_ratio}), got "
                                           f"{self.kv_unused_ratio}"))
        if self.knee_gain <= 0:
            out.append(("knee_gain", f"must be > 0, got {self.knee_gain}"))
        if self.canary_interval_seconds < 0:
            out.append(("canary_interval_seconds", f"must be >= 0 (0: off), got "
                                                   f"{self.canary_interval_seconds}"))
        if not self.canary_prompt.strip():
            out.append(("canary_prompt", "must not be empty"))
        for name in ("min_requests", "min_draft_tokens", "knee_min_samples",
                     "canary_max_tokens"):
            if getattr(self, name) < 1:
                out.append((name, f"must be >= 1, got {getattr(self, name)}"))
        return out
