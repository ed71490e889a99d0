"""The batch-size knee, measured live: where decode throughput stops growing with the batch
while inter-token latency still grows.

Reads, between consecutive samples of the window, the increase of
vllm_generation_tokens_total per second, the mean of vllm_inter_token_latency_seconds (its
_sum and _count increases) and vllm_requests_running (the batch: the mean of the two samples).
Intervals are grouped by batch size in powers of two (1, 2, 3-4, 5-8, ...); a group needs
knee_min_samples intervals and its medians stand for it. The knee is the first group after
which throughput grows by less than knee_gain from each group to the next, while ITL grows by
more than knee_gain up to the largest group, and before which throughput did grow (so an
engine whose throughput never scaled is not given a knee). Batches past the knee buy latency
and nothing else: max_num_seqs at the knee's upper bound.
"""

from __future__ import annotations

import math
import statistics

from ..config import AdviceConfig
from ..model import Advice, Evidence
from ..readings import Window

NAME = "batch_size_knee"


def groups(w: Window, min_samples: int) -> list[tuple[int, float, float, int]]:
    """(batch upper bound, median tokens/s, median ITL, intervals) per power-of-two group."""
    by_group: dict[int, list[tuple[float, float]]] = {}
    for batch, tps, itl in w.intervals():
        if batch < 1 or itl is None or itl <= 0:
            continue
        bound = 2 ** math.ceil(math.log2(batch) - 1e-9)
        by_group.setdefault(bound, []).append((tps, itl))
    return [(bound, statistics.median(t for t, _ in points),
             statistics.median(i for _, i in points), len(points))
            for bound, points in sorted(by_group.items()) if len(points) >= min_samples]


def find_knee(throughputs: list[float], itls: list[float], gain: float) -> int | None:
    """Index of the first point after which throughput grows by less than `gain` per step,
    before which it grew by at least `gain`, and past which ITL still grows by more than
    `gain` up to the last point (None: no such point). Points in order of batch size."""
    gains = [b / a - 1 for a, b in zip(throughputs, throughputs[1:])]
    for j in range(1, len(throughputs) - 1):
        grew_before = gains[j - 1] >= gain
        flat_after = all(g < gain for g in gains[j:])
        itl_grows = itls[-1] / itls[j] - 1 > gain
        if grew_before and flat_after and itl_grows:
            return j
    return None


def evaluate(w: Window, s: AdviceConfig) -> list[Advice]:
    current = w.setting("max_num_seqs")
    found = groups(w, s.knee_min_samples)
    if not current or len(found) < 3:
        return []
    knee = find_knee([g[1] for g in found], [g[2] for g in found], s.knee_gain)
    if knee is None:
        return []
    bound, tps, itl, _ = found[knee]
    top_bound, top_tps, top_itl, _ = found[-1]
    if bound >= current:
        return []
    return [Advice(
        w.model, NAME, "max_num_seqs", "decrease", current, bound,
        throughput="none", latency="down", memory="none",
        confidence="medium" if len(found) - 1 - knee >= 2 else "low",
        summary=(f"decode throughput stops growing at a batch of {bound}: {tps:,.0f} tok/s "
                 f"there, {top_tps:,.0f} tok/s at up to {top_bound}, while inter-token latency "
                 f"grows from {itl * 1000:,.1f} ms to {top_itl * 1000:,.1f} ms"),
        evidence=(_throughput_at(w, bound, tps), _throughput_at(w, top_bound, top_tps),
                  _itl_at(w, bound, itl), _itl_at(w, top_bound, top_itl)))]


def _throughput_at(w: Window, bound: int, tps: float) -> Evidence:
    return Evidence("rate(vllm_generation_tokens_total) at batch <= %d" % bound, tps,
                    w.seconds, "median over sample intervals")


def _itl_at(w: Window, bound: int, itl: float) -> Evidence:
    return Evidence("vllm_inter_token_latency_seconds at batch <= %d" % bound, itl,
                    w.seconds, "median of interval means")
