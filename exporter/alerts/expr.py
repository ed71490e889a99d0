"""Alert expressions as a small tree that both renders PromQL and evaluates in the daemon.

Rules never hold free-form PromQL: rules.py builds these nodes from the YAML, `promql()`
renders the expression Prometheus runs, and `evaluate(ctx)` computes the same thing over the
daemon's in-memory history. Only what the rule kinds need exists here.

Values are either a float (a PromQL scalar) or a `Vector`: {labels: value}, where labels is a
sorted tuple of (name, value) pairs without `__name__` (alerts drop the metric name, and
PromQL's vector matching ignores it too).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Protocol, Union

from ..quantile import histogram_quantile
from .promfuncs import extrapolate

Labels = tuple[tuple[str, str], ...]
Vector = dict[Labels, float]
Value = Union[float, Vector]

LOOKBACK_SECONDS = 300.0  # Prometheus's default lookback delta for instant selectors


class SampleSource(Protocol):
    """What evaluation reads: the history (history.py) or a test's scripted series."""

    def latest(self, sample_name: str, t_ms: int, lookback_ms: int
               ) -> list[tuple[dict[str, str], float]]: ...

    def window(self, sample_name: str, start_ms: int, end_ms: int) -> list:
        """history.Window summaries of the series with >= 2 samples in the range."""


@dataclass
class Context:
    source: SampleSource
    t: float  # evaluation time, unix seconds

    @property
    def t_ms(self) -> int:
        return int(round(self.t * 1000))


def format_duration(seconds: float) -> str:
    """A PromQL duration: 90 -> 1m30s, 3600 -> 1h."""
    ms = int(round(seconds * 1000))
    if ms == 0:
        return "0s"
    out = ""
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000),
                       ("ms", 1)):
        if ms >= size:
            out += f"{ms // size}{unit}"
            ms %= size
    return out


def format_number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _quote(text: str) -> str:
    """The inside of a PromQL double-quoted string."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _key(labels: dict[str, str]) -> Labels:
    return tuple(sorted((k, v) for k, v in labels.items() if k != "__name__"))


def _drop(key: Labels, names: tuple[str, ...]) -> Labels:
    return tuple((k, v) for k, v in key if k not in names)


def _keep(key: Labels, names: tuple[str, ...]) -> Labels:
    return tuple((k, v) for k, v in key if k in names)


class Node:
    def promql(self) -> str:
        raise NotImplementedError

    def evaluate(self, ctx: Context) -> Value:
        raise NotImplementedError

    def children(self) -> tuple["Node", ...]:
        return ()

    def selectors(self) -> list["Selector"]:
        out = [self] if isinstance(self, Selector) else []
        for child in self.children():
            out += child.selectors()
        return out

    def max_range_seconds(self) -> float:
        """How far back evaluation reads (window + offset, or the lookback)."""
        return max((c.max_range_seconds() for c in self.children()), default=0.0)


@dataclass
class Selector(Node):
    """A series selector: a sample name with equality (or any-of) label matchers."""

    name: str  # the sample name as exposed, e.g. vllm_requests_finished_total, x_bucket
    family: str  # the family it belongs to (for the "defined metric" checks)
    match: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def promql(self) -> str:
        if not self.match:
            return self.name
        parts = []
        for label, values in self.match:
            if len(values) == 1:
                parts.append(f'{label}="{_quote(values[0])}"')
            else:
                regex = "|".join(re.escape(v) for v in values)
                parts.append(f'{label}=~"{_quote(regex)}"')
        return f"{self.name}{{{','.join(parts)}}}"

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(label, "") in values for label, values in self.match)

    def evaluate(self, ctx: Context) -> Vector:
        out: Vector = {}
        for labels, value in ctx.source.latest(self.name, ctx.t_ms, int(LOOKBACK_SECONDS * 1000)):
            if self.matches(labels):
                out[_key(labels)] = value
        return out

    def max_range_seconds(self) -> float:
        return LOOKBACK_SECONDS


@dataclass
class RangeFunction(Node):
    """rate(sel[window] offset o) or increase(...)."""

    function: str  # rate | increase
    selector: Selector
    window: float
    offset: float = 0.0

    def children(self):
        return (self.selector,)

    def promql(self) -> str:
        off = f" offset {format_duration(self.offset)}" if self.offset else ""
        return f"{self.function}({self.selector.promql()}[{format_duration(self.window)}]{off})"

    def evaluate(self, ctx: Context) -> Vector:
        end = ctx.t_ms - int(round(self.offset * 1000))
        start = end - int(round(self.window * 1000))
        out: Vector = {}
        is_rate = self.function == "rate"
        for w in ctx.source.window(self.selector.name, start, end):
            if self.selector.matches(w.labels):
                out[_key(w.labels)] = extrapolate(w.first_ms, w.last_ms, w.count, w.first_value,
                                                  w.last_value, w.correction, start, end, is_rate)
        return out

    def max_range_seconds(self) -> float:
        return self.window + self.offset


@dataclass
class Aggregate(Node):
    """sum|max|min without (labels) (inner)."""

    op: str
    without: tuple[str, ...]
    inner: Node

    def children(self):
        return (self.inner,)

    def promql(self) -> str:
        return f"{self.op} without ({', '.join(self.without)}) ({self.inner.promql()})"

    def evaluate(self, ctx: Context) -> Vector:
        groups: dict[Labels, list[float]] = {}
        for key, value in self.inner.evaluate(ctx).items():
            groups.setdefault(_drop(key, self.without), []).append(value)
        combine = {"sum": math.fsum, "max": _nan_max, "min": _nan_min}[self.op]
        return {key: combine(values) for key, values in groups.items()}


def _nan_max(values: list[float]) -> float:
    real = [v for v in values if not math.isnan(v)]
    return max(real) if real else math.nan


def _nan_min(values: list[float]) -> float:
    real = [v for v in values if not math.isnan(v)]
    return min(real) if real else math.nan


@dataclass
class HistogramQuantile(Node):
    q: float
    inner: Node  # a vector of bucket rates, with `le`

    def children(self):
        return (self.inner,)

    def promql(self) -> str:
        return f"histogram_quantile({format_number(self.q)}, {self.inner.promql()})"

    def evaluate(self, ctx: Context) -> Vector:
        groups: dict[Labels, list[tuple[float, float]]] = {}
        for key, value in self.inner.evaluate(ctx).items():
            le = dict(key).get("le")
            try:
                bound = float(le)  # "+Inf" parses as inf
            except (TypeError, ValueError):
                continue
            groups.setdefault(_drop(key, ("le",)), []).append((bound, value))
        return {key: histogram_quantile(self.q, buckets) for key, buckets in groups.items()}


@dataclass
class Scalar(Node):
    value: float

    def promql(self) -> str:
        return format_number(self.value)

    def evaluate(self, ctx: Context) -> float:
        return self.value


@dataclass
class Time(Node):
    def promql(self) -> str:
        return "time()"

    def evaluate(self, ctx: Context) -> float:
        return ctx.t_ms / 1000.0


_ARITH = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: _divide(a, b),
}
_COMPARE = {
    ">": lambda a, b: a > b, "<": lambda a, b: a < b, ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
}


def _divide(a: float, b: float) -> float:
    if b == 0:
        if a == 0 or math.isnan(a):
            return math.nan
        return math.copysign(math.inf, a) * math.copysign(1.0, b)
    return a / b


@dataclass
class Binary(Node):
    """Arithmetic (+ - * /) or a comparison filter, one-to-one on all labels.

    A comparison without `bool` keeps the left-hand samples for which it holds, with the
    left-hand value (with a scalar on the left, the vector's value), as PromQL does.
    """

    op: str
    lhs: Node
    rhs: Node

    def children(self):
        return (self.lhs, self.rhs)

    def promql(self) -> str:
        return f"{_paren(self.lhs)} {self.op} {_paren(self.rhs)}"

    def evaluate(self, ctx: Context) -> Value:
        a, b = self.lhs.evaluate(ctx), self.rhs.evaluate(ctx)
        if self.op in _COMPARE:
            test = _COMPARE[self.op]
            if isinstance(a, dict) and isinstance(b, dict):
                return {k: v for k, v in a.items() if k in b and test(v, b[k])}
            if isinstance(a, dict):
                return {k: v for k, v in a.items() if test(v, b)}
            if isinstance(b, dict):
                return {k: v for k, v in b.items() if test(a, v)}
            raise ValueError("a comparison of two scalars needs `bool`")
        apply = _ARITH[self.op]
        if isinstance(a, dict) and isinstance(b, dict):
            return {k: apply(v, b[k]) for k, v in a.items() if k in b}
        if isinstance(a, dict):
            return {k: apply(v, b) for k, v in a.items()}
        if isinstance(b, dict):
            return {k: apply(a, v) for k, v in b.items()}
        return apply(a, b)


@dataclass
class And(Node):
    """lhs and [on (labels)] rhs: the lhs samples that have a partner on the rhs."""

    lhs: Node
    rhs: Node
    on: tuple[str, ...] | None = None

    def children(self):
        return (self.lhs, self.rhs)

    def promql(self) -> str:
        on = f" on ({', '.join(self.on)})" if self.on is not None else ""
        return f"{_paren(self.lhs)} and{on} {_paren(self.rhs)}"

    def evaluate(self, ctx: Context) -> Vector:
        a, b = self.lhs.evaluate(ctx), self.rhs.evaluate(ctx)
        if self.on is None:
            return {k: v for k, v in a.items() if k in b}
        partners = {_keep(k, self.on) for k in b}
        return {k: v for k, v in a.items() if _keep(k, self.on) in partners}


@dataclass
class Or(Node):
    """lhs or rhs: every lhs sample, plus the rhs samples whose labels the lhs lacks."""

    lhs: Node
    rhs: Node

    def children(self):
        return (self.lhs, self.rhs)

    def promql(self) -> str:
        return f"{_paren(self.lhs)} or {_paren(self.rhs)}"

    def evaluate(self, ctx: Context) -> Vector:
        a, b = self.lhs.evaluate(ctx), self.rhs.evaluate(ctx)
        out = dict(a)
        for k, v in b.items():
            out.setdefault(k, v)
        return out


def _paren(node: Node) -> str:
    text = node.promql()
    if isinstance(node, (Binary, And, Or)):
        return f"({text})"
    return text
