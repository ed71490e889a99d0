"""Reading a /metrics text (Prometheus text format) into samples, with prometheus-client's
own parser."""

from __future__ import annotations

from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

from .net import http_get


class Samples:
    """A parsed exposition: value lookups by sample name and label subset."""

    def __init__(self, text: str):
        self.text = text
        self.by_name: dict[str, list[tuple[dict, float]]] = defaultdict(list)
        self.types: dict[str, str] = {}
        self.helps: dict[str, str] = {}
        self.label_names: dict[str, set[str]] = defaultdict(set)  # per family
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            self.helps[family.name] = family.documentation
            for sample in family.samples:
                self.by_name[sample.name].append((sample.labels, sample.value))
                self.label_names[family.name].update(sample.labels)

    def get(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
        return sum(value for sample_labels, value in self.by_name.get(name, [])
                   if all(sample_labels.get(k) == v for k, v in labels.items()))

    def series(self, name: str) -> list[tuple[dict, float]]:
        return self.by_name.get(name, [])

    def label_values_at(self, name: str, label: str, value: float, **labels: str) -> set[str]:
        """The values of `label` on the series of `name` (with `labels`) that equal `value`:
        e.g. which state of a one-hot state gauge is 1."""
        return {sample_labels[label] for sample_labels, v in self.series(name)
                if v == value and all(sample_labels.get(k) == x for k, x in labels.items())}

    def family_shapes(self) -> dict[str, tuple[str, str, frozenset]]:
        """{family: (type, help, label names)}, values and label values aside."""
        return {name: (kind, self.helps[name], frozenset(self.label_names[name]) - {"le"})
                for name, kind in self.types.items()}


def scrape(metrics_url: str, timeout: float = 5.0) -> Samples:
    status, body, _ = http_get(metrics_url, timeout=timeout)
    assert status == 200, f"GET {metrics_url} -> {status}"
    return Samples(body.decode())
