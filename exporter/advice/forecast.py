"""Capacity forecast and energy per output token, from the same window as the advice.

- KV headroom: tokens the KV cache has left now (capacity x (1 - usage), summed over ranks),
  and how many requests of the window's mean context (prompt + generation) that is.
- Time to saturation: at the window's least-squares growth of KV usage (of the running
  batch), seconds until usage reaches 1 (until the batch reaches max_num_seqs x ranks, after
  which new requests wait); 0 when already there, +Inf when not growing.
- Energy per output token: the increase of vllm_gpu_energy_joules_total over the GPUs the
  engine runs on, divided by the tokens it generated meanwhile. NVML counts a card's whole
  energy, so this is exact where the engine is the card's only user. Absent without NVML
  energy (CPU build, GPUs without the counter) or without tokens.
"""

from __future__ import annotations

import math

from .readings import Window
from .rules.common import batch_limit

FULL = 0.999  # usage at or above this counts as full


def forecast(w: Window) -> dict[str, float]:
    latest = w.latest
    out = {"kv_headroom_tokens": latest.headroom_tokens}
    context = w.mean_context_tokens()
    if context:
        out["kv_headroom_requests"] = latest.headroom_tokens / context
    if latest.capacity_tokens > 0:
        out["kv_full_seconds"] = _time_to(latest.kv_usage, 1.0, w.slope("kv_usage"))
    limit = batch_limit(w)
    if limit:
        out["batch_full_seconds"] = _time_to(latest.running, limit, w.slope("running"))
    return out


def _time_to(value: float, limit: float, slope: float) -> float:
    if value >= limit * FULL:
        return 0.0
    if slope <= 0:
        return math.inf
    return (limit - value) / slope


def energy_per_output_token(w: Window) -> float | None:
    joules, measured = 0.0, False
    for readings in w.engine_gpus().values():
        values = [g.energy_joules for g in readings if not math.isnan(g.energy_joules)]
        for before, after in zip(values, values[1:]):
            joules += after - before if after >= before else after
            measured = True
    tokens = w.delta("vllm_generation_tokens_total")
    if not measured or tokens <= 0:
        return None
    return joules / tokens
