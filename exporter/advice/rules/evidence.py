"""The evidence lines several rules state, written once: the same series, window and note
wherever a rule rests on them.

Values a rule computes itself (a mean it compared, a per-rank capacity) are passed in, so the
evidence states exactly the number the rule decided on.
"""

from __future__ import annotations

from ..model import Evidence
from ..readings import Window


def peak_kv_usage(w: Window) -> Evidence:
    """The fullest the KV cache was in the window (its highest engine rank)."""
    return Evidence("vllm_kv_cache_usage_ratio", w.peak("kv_usage"), w.seconds, "peak")


def peak_running(w: Window) -> Evidence:
    """The largest running batch in the window (summed over engine ranks)."""
    return Evidence("vllm_requests_running", w.peak("running"), w.seconds, "peak")


def preemptions(w: Window) -> Evidence:
    """Sequences preempted in the window."""
    return Evidence("vllm_preemptions_total", w.delta("vllm_preemptions_total"), w.seconds,
                    "increase")


def mean_of(w: Window, histogram: str, value: float) -> Evidence:
    """The mean of a histogram's observations in the window, as the rule took it."""
    return Evidence(histogram, value, w.seconds, "mean")


def mean_context(w: Window, tokens: float) -> Evidence:
    """Prompt + generated tokens of the mean finished request in the window."""
    return Evidence("vllm_request_prompt_tokens + vllm_request_generation_tokens", tokens,
                    w.seconds, "mean context per finished request")


def capacity_per_rank(tokens: float) -> Evidence:
    """The KV cache one engine rank holds, in tokens, now (the latest reading)."""
    return Evidence("vllm_kv_cache_capacity_tokens", tokens, 0, "per engine rank")
