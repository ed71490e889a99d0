"""The daemon's view of a period: its /metrics scraped before and after, and the difference.

Counters give exact counts for the period (requests finished, prompt and generation tokens,
preemptions). Histograms give quantiles the way Prometheus' histogram_quantile() does
(exporter/quantile.py): the bucket counts of the period (after - before) and linear
interpolation inside the bucket the quantile falls in, so the answer is only as fine as the
buckets.
"""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from collections import defaultdict
from typing import Iterator

from prometheus_client.parser import text_string_to_metric_families

from ..quantile import histogram_quantile
from .errors import UsageError

LATENCY_HISTOGRAMS = {
    "ttft_seconds": "vllm_time_to_first_token_seconds",
    "itl_seconds": "vllm_inter_token_latency_seconds",
    "e2e_seconds": "vllm_e2e_request_latency_seconds",
    "queue_seconds": "vllm_request_queue_time_seconds",
}
COUNTERS = {
    "requests_finished": "vllm_requests_finished_total",
    "prompt_tokens": "vllm_prompt_tokens_total",
    "generation_tokens": "vllm_generation_tokens_total",
    "preemptions": "vllm_preemptions_total",
    "prefix_cache_queries": "vllm_prefix_cache_queries_total",
    "prefix_cache_hits": "vllm_prefix_cache_hits_total",
}


class Snapshot:
    """One parsed scrape: samples by name as (labels, value) pairs."""

    def __init__(self, text: str):
        self.samples: dict[str, list[tuple[dict, float]]] = defaultdict(list)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[sample.name].append((sample.labels, sample.value))

    def value(self, name: str, **labels: str) -> float:
        """Sum over the series of `name` whose labels include `labels` (0 when none)."""
        return sum(v for l, v in self.samples.get(name, [])
                   if all(l.get(k) == want for k, want in labels.items()))

    def has(self, name: str) -> bool:
        return name in self.samples

    def all_samples(self) -> Iterator[tuple[str, dict, float]]:
        """Every sample as (name, labels, value)."""
        for name, pairs in self.samples.items():
            for labels, value in pairs:
                yield name, labels, value

    def labels_of(self, name: str) -> list[dict]:
        return [l for l, _ in self.samples.get(name, [])]

    def buckets(self, family: str, **labels: str) -> list[tuple[float, float]]:
        """Cumulative (upper bound, count) pairs of a histogram, summed over matching series."""
        by_bound: dict[float, float] = defaultdict(float)
        for l, v in self.samples.get(family + "_bucket", []):
            if all(l.get(k) == want for k, want in labels.items()):
                by_bound[float(l["le"])] += v
        return sorted(by_bound.items())


def scrape(metrics_url: str, timeout: float = 10.0) -> Snapshot:
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout) as response:
            return Snapshot(response.read().decode())
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UsageError(f"the daemon's metrics at {metrics_url} are not reachable: {reason}"
                         ) from None


def period_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """histogram_quantile over a period's buckets; None where Prometheus answers NaN (no
    requests in the period): reports are JSON, which has no NaN."""
    value = histogram_quantile(q, buckets)
    return None if math.isnan(value) else value


def bucket_delta(after: list[tuple[float, float]],
                 before: list[tuple[float, float]]) -> list[tuple[float, float]]:
    earlier = dict(before)
    return [(bound, count - earlier.get(bound, 0.0)) for bound, count in after]


def period_view(before: Snapshot, after: Snapshot, model: str | None = None) -> dict:
    """Counts and latency quantiles the daemon recorded between two scrapes."""
    labels = {"model": model} if model else {}
    view: dict = {name: after.value(metric, **labels) - before.value(metric, **labels)
                  for name, metric in COUNTERS.items()}
    for name, family in LATENCY_HISTOGRAMS.items():
        delta = bucket_delta(after.buckets(family, **labels), before.buckets(family, **labels))
        count = after.value(family + "_count", **labels) - before.value(family + "_count",
                                                                          **labels)
        total = after.value(family + "_sum", **labels) - before.value(family + "_sum", **labels)
        view[name] = {"count": count,
                      "p50": period_quantile(0.50, delta),
                      "p95": period_quantile(0.95, delta),
                      "p99": period_quantile(0.99, delta),
                      "mean": total / count if count else None}
    return view
