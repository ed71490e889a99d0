"""Exposition text for the metrics port, in Prometheus text 0.0.4 and OpenMetrics 1.0.

prometheus-client's encoders check and escape every HELP text and label value character by
character on every scrape (about 5 us a line; 2-5 ms for a daemon's 500-600 lines). The metrics
port renders the same text here with the escaping cached and done only where a character needs
it. Output is what prometheus-client's encoders print for the same families (tests/test_shards.py
compares both, parsed, and runs `promtool check metrics`); families this module does not handle
(other types, timestamps, exemplars) make `render_families` return None so that the caller
falls back to prometheus-client.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Iterable, Iterator

from prometheus_client.utils import floatToGoString

from .metrics import format_bound

TEXT_TYPES = {"counter", "gauge", "histogram"}


def num(value: float) -> str:
    """A sample value: Python's shortest round-trip form, Go's spelling for inf and NaN."""
    return repr(float(value)) if math.isfinite(value) else floatToGoString(value)


@functools.lru_cache(maxsize=64)
def bound_texts(bounds: tuple[float, ...]) -> tuple[str, ...]:
    """`le` values as prometheus-client spells them (a series' identity: must never change)."""
    return tuple(format_bound(b) for b in bounds) + ("+Inf",)


def escape_value(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        value = value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


@functools.lru_cache(maxsize=4096)
def label_text(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    """`a="x",b="y"`; cached: a series' labels do not change between scrapes (the label caps
    bound how many there are)."""
    return ",".join(f'{n}="{escape_value(v)}"' for n, v in zip(names, values))


@functools.lru_cache(maxsize=1024)
def escape_help(text: str, openmetrics: bool) -> str:
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if openmetrics else text


def header(name: str, kind: str, help_text: str, openmetrics: bool) -> str:
    """HELP and TYPE lines; `name` is the family name without a counter's `_total`."""
    head = name + "_total" if kind == "counter" and not openmetrics else name
    return f"# HELP {head} {escape_help(help_text, openmetrics)}\n# TYPE {head} {kind}\n"


def render_families(families: Iterable, openmetrics: bool) -> str | None:
    """prometheus-client Metric families as text, or None where one is not ours to render."""
    lines: list[str] = []
    add = lines.append
    for family in families:
        if family.type not in TEXT_TYPES:
            return None
        add(header(family.name, family.type, family.documentation, openmetrics))
        for sample in family.samples:
            if sample.timestamp is not None or sample.exemplar is not None:
                return None
            labels = sample.labels
            pairs = ",".join(f'{k}="{escape_value(v)}"' for k, v in labels.items()) \
                if labels else ""
            add(f"{sample.name}{{{pairs}}} {num(sample.value)}\n" if pairs
                else f"{sample.name} {num(sample.value)}\n")
    return "".join(lines)


class RendersItself:
    """A collector the metrics port renders through its own `render(openmetrics)`, faster than
    formatting its `collect()`: while the port is inside `rendered_apart()`, `collect()` on that
    thread yields nothing (other threads, such as the alert history's reader, still get the
    families)."""

    def __init__(self) -> None:
        self._render_thread = threading.local()

    @property
    def rendering_apart(self) -> bool:
        return getattr(self._render_thread, "active", False)

    @contextlib.contextmanager
    def rendered_apart(self):
        self._render_thread.active = True
        try:
            yield
        finally:
            self._render_thread.active = False

    def render(self, openmetrics: bool) -> str:
        raise NotImplementedError


class PublishedFamilies(RendersItself):
    """Families that change only when their owner publishes new ones (the alert states, once
    per evaluation): their text is rendered once per publish, not once per scrape."""

    def __init__(self) -> None:
        super().__init__()
        self._families: list = []
        self._text: dict[bool, str] = {}

    def publish(self, families: list) -> None:
        self._families, self._text = families, {}  # replaced whole: readers see one or the other

    def collect(self) -> Iterator:
        if not self.rendering_apart:
            yield from self._families

    def render(self, openmetrics: bool) -> str:
        families, text = self._families, self._text
        if openmetrics not in text:
            text[openmetrics] = render_families(families, openmetrics) or ""
        return text[openmetrics]
