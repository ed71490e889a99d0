"""The rules of advice: one module per rule, each with NAME and
`evaluate(window, settings) -> list[Advice]` (readings.Window, config.AdviceConfig). What
several rules share: common.py (sizing, limits) and evidence.py (the evidence they state).

A rule is silent unless its evidence is in the window: a false piece of advice is a bug, like
a false page.
"""

from __future__ import annotations

from . import (batch_knee, gpu_memory, kv_headroom, kv_pressure, prefix_cache, spec_decode,
               ttft_split)

RULES = (kv_pressure, kv_headroom, batch_knee, ttft_split, prefix_cache, spec_decode,
         gpu_memory)
RULE_NAMES = tuple(rule.NAME for rule in RULES)

__all__ = ["RULES", "RULE_NAMES"]
