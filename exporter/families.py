"""What a metric family is (`FamilySpec`), and the one place a spec becomes a prometheus-client
object.

The spec tables themselves live beside what produces them: engine and exporter families in
metrics.py, GPU families in the gpu package, alert families in alerts/families.py;
catalog.py joins them. Two kinds of prometheus-client object are made from a spec:

- `create_client(spec, registry)`: a Counter, Gauge or Histogram that the metrics process
  updates itself, registered in our own registry (vLLM rewrites the default one);
- `metric_family(spec)`: an empty CounterMetricFamily, GaugeMetricFamily or
  HistogramMetricFamily that a custom collector fills at each scrape or tick.

Info families are gauges fixed at 1 in both: prometheus-client's Info type cannot be re-labelled,
and the engine's config is known only once the engine is up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

ENGINE_LABELS = ("model", "engine")
KINDS = ("counter", "gauge", "histogram", "info")


@dataclass(frozen=True)
class FamilySpec:
    """One metric family as users see it on /metrics."""

    name: str
    kind: str  # counter | gauge | histogram | info
    help: str
    labels: tuple[str, ...] = ENGINE_LABELS
    source: str = ""  # where the value comes from (vLLM field, NVML call, the daemon itself)
    buckets_key: str | None = None  # for histograms: the key under `histogram_buckets` in config
    # "shard": written by the processes that produce it (vLLM front ends, the daemon) into their
    # own shard and aggregated by the metrics process (shard.py, aggregate.py); "server": owned
    # by the metrics process itself (prometheus-client objects in its registry); "collector":
    # computed by a collector of the metrics process at each scrape.
    where: str = "shard"
    # How the metrics process merges a shard family over processes (docs/topologies.md):
    # sum (counters, histograms), sum_live (gauges of processes still running), latest (engine
    # state gauges: from the process that received that engine rank's newest scheduler stats),
    # max (per-engine constants and timestamps), state (the engine's lifecycle state).
    aggregate: str = ""

    @property
    def merge(self) -> str:
        if self.aggregate:
            return self.aggregate
        return "sum" if self.kind in ("counter", "histogram") else "max"

    @property
    def client_name(self) -> str:
        """The name prometheus-client takes (it appends `_total` to counters itself)."""
        if self.kind == "counter" and self.name.endswith("_total"):
            return self.name[: -len("_total")]
        if self.kind == "info" and self.name.endswith("_info"):
            return self.name[: -len("_info")]
        return self.name


def create_client(spec: FamilySpec, registry: CollectorRegistry,
                  buckets: Sequence[float] | None = None) -> Counter | Gauge | Histogram:
    """The prometheus-client object for `spec`, registered in `registry`; histograms need
    their bucket bounds."""
    kwargs = dict(name=spec.client_name, documentation=spec.help, labelnames=spec.labels,
                  registry=registry)
    if spec.kind == "counter":
        return Counter(**kwargs)
    if spec.kind == "gauge":
        return Gauge(**kwargs)
    if spec.kind == "info":
        return Gauge(**{**kwargs, "name": spec.name})
    if spec.kind == "histogram":
        if buckets is None:
            raise ValueError(f"{spec.name} is a histogram: its bucket bounds are needed")
        return Histogram(buckets=tuple(buckets), **kwargs)
    raise ValueError(f"unknown kind {spec.kind!r} for {spec.name}")


def metric_family(spec: FamilySpec) -> Metric:
    """An empty family for a custom collector to `add_metric` to."""
    if spec.kind == "counter":
        return CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
    if spec.kind in ("gauge", "info"):
        return GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)
    if spec.kind == "histogram":
        return HistogramMetricFamily(spec.name, spec.help, labels=spec.labels)
    raise ValueError(f"unknown kind {spec.kind!r} for {spec.name}")
