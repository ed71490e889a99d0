"""Prometheus's histogram_quantile() over classic buckets, giving the numbers Prometheus gives
(promql/quantile.go). The alert evaluator and the tuning commands' period view both use it.

Edge cases, as Prometheus answers them:
- q < 0: -Inf; q > 1: +Inf; q NaN: NaN;
- no +Inf bucket, fewer than two buckets, or no observations: NaN;
- buckets with the same bound are added together; counts that decrease with the bound (float
  error, a scrape racing an update) are raised to the running maximum first;
- the rank falls in the +Inf bucket: the highest finite bound;
- the rank falls in the first bucket: interpolated from 0, or that bound if it is <= 0.
"""

from __future__ import annotations

import math
from typing import Iterable


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float:
    """The q-quantile of one series' buckets [(upper bound, cumulative count)], in any order."""
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    merged: dict[float, float] = {}
    for bound, count in buckets:
        merged[bound] = merged.get(bound, 0.0) + count
    ordered = sorted(merged.items())
    if len(ordered) < 2 or ordered[-1][0] != math.inf:
        return math.nan
    monotonic: list[tuple[float, float]] = []
    running_max = -math.inf
    for bound, count in ordered:
        running_max = max(running_max, count)
        monotonic.append((bound, running_max))
    observations = monotonic[-1][1]
    if observations == 0 or math.isnan(observations):
        return math.nan
    rank = q * observations
    b = next(i for i, (_, count) in enumerate(monotonic) if count >= rank)
    if b == len(monotonic) - 1:
        return monotonic[-2][0]
    if b == 0 and monotonic[0][0] <= 0:
        return monotonic[0][0]
    bucket_start, bucket_end, count = 0.0, monotonic[b][0], monotonic[b][1]
    if b > 0:
        bucket_start = monotonic[b - 1][0]
        count -= monotonic[b - 1][1]
        rank -= monotonic[b - 1][1]
    if count == 0:  # q = 0 with an empty first bucket: Go's 0/0
        return math.nan
    return bucket_start + (bucket_end - bucket_start) * (rank / count)
