"""Speculative decoding whose drafts are rarely accepted: fewer draft tokens, or none.

Reads vllm_spec_decode_draft_tokens_total, vllm_spec_decode_accepted_tokens_total and
vllm_spec_decode_drafts_total over the window (at least min_draft_tokens drafted), and
num_speculative_tokens from vllm_engine_config_info. Each draft token costs a verification
slot in the target model's step; below spec_min_acceptance the slots cost more than the
accepted tokens save. Where about one token per draft is still accepted, fewer draft tokens
keep that gain; below half the threshold, speculation is turned off (0).
"""

from __future__ import annotations

import math

from ..config import AdviceConfig
from ..model import Advice, Evidence
from ..readings import Window

NAME = "spec_decode"


def evaluate(w: Window, s: AdviceConfig) -> list[Advice]:
    drafted = w.delta("vllm_spec_decode_draft_tokens_total")
    if drafted < s.min_draft_tokens:
        return []
    accepted = w.delta("vllm_spec_decode_accepted_tokens_total")
    acceptance = accepted / drafted
    if acceptance >= s.spec_min_acceptance:
        return []
    drafts = w.delta("vllm_spec_decode_drafts_total")
    per_draft = accepted / drafts if drafts > 0 else 0.0
    current = w.setting("num_speculative_tokens")
    evidence = (Evidence("vllm_spec_decode_accepted_tokens_total / "
                         "vllm_spec_decode_draft_tokens_total", acceptance, w.seconds,
                         "acceptance rate"),
                Evidence("vllm_spec_decode_draft_tokens_total", drafted, w.seconds, "increase"),
                Evidence("vllm_spec_decode_accepted_tokens_total / vllm_spec_decode_drafts_total",
                         per_draft, w.seconds, "accepted tokens per draft"))
    fewer = max(1, math.ceil(per_draft))
    if acceptance >= s.spec_min_acceptance / 2 and current and fewer < current:
        return [Advice(
            w.model, NAME, "num_speculative_tokens", "decrease", current, fewer,
            throughput="up", latency="down", memory="none", confidence="medium",
            summary=(f"only {acceptance:.0%} of draft tokens are accepted ({per_draft:.2f} per "
                     f"draft of {current:.0f}): drafting {fewer} keeps the accepted ones and "
                     "stops verifying the rest"),
            evidence=evidence)]
    return [Advice(
        w.model, NAME, "num_speculative_tokens", "disable", current, 0,
        throughput="up", latency="down", memory="down", confidence="medium",
        summary=(f"only {acceptance:.0%} of draft tokens are accepted: speculation costs more "
                 "verification than it saves; serve without it"),
        evidence=evidence)]
