"""What one tick reads: family name -> [(label values, value)], filled by the readers and the
collector, rendered by the collector."""

from __future__ import annotations

Samples = dict[str, list[tuple[tuple[str, ...], float]]]


def add(out: Samples, family: str, labels: tuple[str, ...], value: float) -> None:
    out.setdefault(family, []).append((labels, float(value)))
