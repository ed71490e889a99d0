"""The rule file: schema, validation and building each rule's expression.

A rule file is YAML with one key, `rules:`, a list of rules. Every rule has `alert`, `kind`,
`for`, `severity`, optional `labels`, and `annotations` with `summary`, `description` and
`runbook_url`. The kind says what else it takes (docs/alerts.md has the full reference):

- threshold:  `signal` compared with `above` or `below`; optional `min_rate` (traffic guard)
              and `only_if` (conditions on other gauges).
- regression: `signal` over its window against the same signal over `baseline_window` just
              before it; fires when it grew by more than `increase_over` (0.5 = +50 %), only
              while both windows carry at least `min_rate` of traffic.
- stall:      a timestamp gauge older than `stale_after`, optionally only while some gauge in
              `while_positive` is > 0 (matched `on` labels).
- slo_burn:   multi-window burn rate of an SLO from the `slo:` config (`objective`, or
              `errors` for the error-ratio SLO), `long_window`/`short_window`, `burn_rate`.

Signals (a mapping with one of these keys): `gauge: NAME`, `rate: COUNTER`,
`increase: COUNTER`, `quantile: Q` with `histogram: NAME`, `mean: HISTOGRAM`,
`ratio: {numerator: {metric, match}, denominator: {metric, match}}`, `age: TIMESTAMP_GAUGE`;
with `window` where a range is needed, `match: {label: value | [values]}`, and `without:
[labels]` to aggregate labels away.

Any problem raises ConfigError(file, "rules.<alert>.<field>", problem).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


from ..catalog import families_by_name
from ..config_files import ConfigError, read_yaml_file
from ..slo import SloConfig
from .expr import (Aggregate, And, Binary, HistogramQuantile, Node, Or, RangeFunction, Scalar,
                   Selector, Time, format_duration)
from .templates import check_template

KINDS = ("threshold", "regression", "stall", "slo_burn")
SEVERITIES = ("critical", "warning", "info")
REQUIRED_ANNOTATIONS = ("summary", "description", "runbook_url")
SIGNAL_TYPES = ("gauge", "rate", "increase", "quantile", "mean", "ratio", "difference", "age")
NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
DURATION_RE = re.compile(r"^((\d+)(ms|s|m|h|d|w|y))+$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800,
                 "y": 31536000}
COMMON_FIELDS = ("alert", "kind", "for", "severity", "labels", "annotations")
KIND_FIELDS = {
    "threshold": ("signal", "above", "below", "min_rate", "only_if"),
    "regression": ("signal", "baseline_window", "increase_over", "min_rate"),
    "stall": ("timestamp", "stale_after", "while_positive", "on"),
    "slo_burn": ("objective", "long_window", "short_window", "burn_rate"),
}
SIGNAL_FIELDS = {
    "gauge": ("gauge", "match", "without", "aggregate"),
    "rate": ("rate", "window", "match", "without"),
    "increase": ("increase", "window", "match", "without"),
    "quantile": ("quantile", "histogram", "window", "match", "without"),
    "mean": ("mean", "window", "match", "without"),
    "ratio": ("ratio", "window", "without"),
    "difference": ("difference", "without"),
    "age": ("age", "match", "without"),
}


@dataclass
class Rule:
    alert: str
    kind: str
    expr: Node
    for_seconds: float
    severity: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)  # the rule as written (for re-export)

    def all_labels(self) -> dict[str, str]:
        """The labels every alert of this rule carries (besides the series' own)."""
        return {**self.labels, "severity": self.severity}

    def families(self) -> set[str]:
        return {s.family for s in self.expr.selectors()}


def parse_duration(text: Any) -> float | None:
    """Seconds for a Prometheus duration ("90s", "1h30m"), None if it is not one."""
    if not isinstance(text, str) or not DURATION_RE.match(text):
        return None
    return sum(int(n) * _UNIT_SECONDS[u] for n, u in re.findall(r"(\d+)(ms|s|m|h|d|w|y)", text))


# --- loading ----------------------------------------------------------------------------------

def _error(source: str, field_path: str, problem: str) -> Exception:
    return ConfigError(source, field_path, problem)


def load_rule_file(path: str | Path, slo: SloConfig) -> list[Rule]:
    raw = read_yaml_file(path, "rule file")
    return parse_rules(raw, slo, str(path))


def parse_rules(raw: Any, slo: SloConfig, source: str) -> list[Rule]:
    if not isinstance(raw, dict) or set(raw) != {"rules"}:
        keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise _error(source, "-", f"a rule file is a mapping with one key, rules; got {keys}")
    if not isinstance(raw["rules"], list):
        raise _error(source, "rules", "must be a list of rules")
    rules, seen = [], set()
    for index, item in enumerate(raw["rules"]):
        rule = _RuleReader(item, index, slo, source).build()
        if rule.alert in seen:
            raise _error(source, f"rules.{rule.alert}.alert",
                              "duplicate alert name (each rule needs its own)")
        seen.add(rule.alert)
        rules.append(rule)
    return rules


class _RuleReader:
    def __init__(self, raw: Any, index: int, slo: SloConfig, source: str):
        self.source, self.slo = source, slo
        self.where = f"rules[{index}]"
        if not isinstance(raw, dict):
            self.fail("-", f"a rule must be a mapping, got {type(raw).__name__}")
        self.raw = raw
        alert = raw.get("alert")
        if not isinstance(alert, str) or not NAME_RE.match(alert):
            self.fail("alert", f"required: a name matching {NAME_RE.pattern}, got {alert!r}")
        self.where = f"rules.{alert}"
        self.families = families_by_name()

    def fail(self, field_name: str, problem: str):
        path = self.where if field_name == "-" else f"{self.where}.{field_name}"
        raise _error(self.source, path, problem)

    # --- the rule ----------------------------------------------------------------------------
    def build(self) -> Rule:
        raw = self.raw
        kind = raw.get("kind")
        if kind not in KINDS:
            self.fail("kind", f"required: one of {', '.join(KINDS)}, got {kind!r}")
        allowed = COMMON_FIELDS + KIND_FIELDS[kind]
        for key in raw:
            if key not in allowed:
                self.fail(str(key), f"unknown field for kind {kind}; known: {', '.join(allowed)}")
        for_seconds = self.duration(raw, "for", required=True, allow_zero=True)
        severity = raw.get("severity")
        if severity not in SEVERITIES:
            self.fail("severity", f"required: one of {', '.join(SEVERITIES)}, got {severity!r}")
        labels = self.string_map(raw.get("labels", {}), "labels")
        for name in labels:
            if not NAME_RE.match(name) or name.startswith("__"):
                self.fail(f"labels.{name}", "not a valid label name")
            if name in ("alertname", "severity"):
                self.fail(f"labels.{name}", f"{name} is set by the rule itself")
        annotations = self.string_map(raw.get("annotations"), "annotations")
        for name in REQUIRED_ANNOTATIONS:
            if not annotations.get(name, "").strip():
                self.fail(f"annotations.{name}", "required (summary, description, runbook_url)")
        for name, text in {**labels, **annotations}.items():
            problem = check_template(text)
            if problem:
                part = "labels" if name in labels else "annotations"
                self.fail(f"{part}.{name}", problem)
        expr = getattr(self, f"build_{kind}")()
        return Rule(raw["alert"], kind, expr, for_seconds, severity, labels, annotations, raw)

    def build_threshold(self) -> Node:
        raw = self.raw
        value, traffic = self.signal(raw.get("signal"), "signal")(0.0, None)
        op, bound = self.bound(raw, ("above", "below"))
        expr: Node = Binary(op, value, Scalar(bound))
        if "min_rate" in raw:
            expr = And(expr, self.traffic_guard(traffic, raw["min_rate"]))
        conditions = raw.get("only_if", [])
        if not isinstance(conditions, list):
            self.fail("only_if", "must be a list of conditions")
        for i, cond in enumerate(conditions):
            expr = And(expr, *self.condition(cond, f"only_if[{i}]"))
        return expr

    def build_regression(self) -> Node:
        raw = self.raw
        make = self.signal(raw.get("signal"), "signal")
        window = self.signal_window
        if window is None:
            self.fail("signal",
                      "a regression needs a windowed signal (rate, quantile, mean, ratio)")
        baseline_window = self.duration(raw, "baseline_window", required=True)
        if baseline_window <= window:
            self.fail("baseline_window", f"must be longer than the signal's window "
                                         f"({format_duration(window)})")
        increase = self.number(raw, "increase_over", required=True)
        if increase <= 0:
            self.fail("increase_over", f"must be > 0 (0.5 means +50 %), got {increase}")
        if "min_rate" not in raw:
            self.fail("min_rate", "required for a regression: the minimum traffic in both windows "
                                  "(guards against reporting a traffic drop as degradation)")
        recent, recent_traffic = make(0.0, None)
        baseline, baseline_traffic = make(window, baseline_window)
        expr: Node = Binary(">", Binary("/", recent, baseline), Scalar(1 + increase))
        expr = And(expr, self.traffic_guard(recent_traffic, raw["min_rate"]))
        return And(expr, self.traffic_guard(baseline_traffic, raw["min_rate"]))

    def build_stall(self) -> Node:
        raw = self.raw
        name = raw.get("timestamp")
        self.metric(name, "timestamp", ("gauge",))
        stale_after = self.duration(raw, "stale_after", required=True)
        expr: Node = Binary(">", Binary("-", Time(), Selector(name, name)), Scalar(stale_after))
        gauges = self.list_of(raw.get("while_positive", []), "while_positive")
        if gauges:
            on = tuple(self.list_of(raw.get("on", []), "on"))
            if not on:
                self.fail("on", "required with while_positive: the labels both sides share")
            condition: Node | None = None
            for i, gauge in enumerate(gauges):
                self.metric(gauge, f"while_positive[{i}]", ("gauge",))
                spec = self.families[gauge]
                missing = [label for label in on if label not in spec.labels]
                if missing:
                    self.fail(f"while_positive[{i}]", f"{gauge} has no label(s) {missing}")
                term = Binary(">", Selector(gauge, gauge), Scalar(0))
                condition = term if condition is None else Or(condition, term)
            expr = And(expr, condition, on=on)
        elif "on" in raw:
            self.fail("on", "only meaningful with while_positive")
        return expr

    def build_slo_burn(self) -> Node:
        raw = self.raw
        objective = raw.get("objective")
        names = [o.name for o in self.slo.objectives]
        if objective == "errors":
            target = self.slo.error_target
            bad = Selector("vllm_requests_finished_total", "vllm_requests_finished_total",
                           (("finish_reason", ("error",)),))
            total = Selector("vllm_requests_finished_total", "vllm_requests_finished_total")
            without = ("finish_reason",)
        elif objective in names:
            target = next(o.target for o in self.slo.objectives if o.name == objective)
            family = "vllm_slo_requests_total"
            bad = Selector(family, family, (("objective", (objective,)), ("result", ("bad",))))
            total = Selector(family, family, (("objective", (objective,)),))
            without = ("result",)
        else:
            self.fail("objective", f"must name an objective of the slo config ({', '.join(names)})"
                                   f" or 'errors', got {objective!r}")
        long_window = self.duration(raw, "long_window", required=True)
        short_window = self.duration(raw, "short_window", required=True)
        if short_window >= long_window:
            self.fail("short_window", "must be shorter than long_window")
        burn = self.number(raw, "burn_rate", required=True)
        if burn <= 0:
            self.fail("burn_rate", f"must be > 0, got {burn}")
        budget = 1 - target

        def burn_rate(window: float) -> Node:
            ratio = Binary("/", Aggregate("sum", without, RangeFunction("rate", bad, window)),
                           Aggregate("sum", without, RangeFunction("rate", total, window)))
            return Binary(">", Binary("/", ratio, Scalar(round(budget, 12))), Scalar(burn))

        return And(burn_rate(long_window), burn_rate(short_window))

    # --- signals -----------------------------------------------------------------------------
    def signal(self, raw: Any, where: str) -> Callable[[float, float | None], tuple[Node, Node]]:
        """Validate a signal; return make(offset, window override) -> (value, traffic)."""
        if not isinstance(raw, dict):
            self.fail(where, f"required: a mapping with one of {', '.join(SIGNAL_TYPES)}")
        types = [t for t in SIGNAL_TYPES if t in raw]
        if len(types) != 1:
            self.fail(where, f"needs exactly one of {', '.join(SIGNAL_TYPES)}, got {sorted(raw)}")
        kind = types[0]
        for key in raw:
            if key not in SIGNAL_FIELDS[kind]:
                self.fail(f"{where}.{key}", f"unknown field for a {kind} signal; known: "
                                            f"{', '.join(SIGNAL_FIELDS[kind])}")
        without = tuple(self.list_of(raw.get("without", []), f"{where}.without"))
        match = self.matchers(raw.get("match", {}), f"{where}.match")
        needs_window = kind in ("rate", "increase", "quantile", "mean")
        window = None
        if needs_window or kind == "ratio":
            window = self.duration(raw, "window", required=needs_window, where=where)
        self.signal_window = window

        def agg(op: str, node: Node) -> Node:
            return Aggregate(op, without, node) if without else node

        if kind == "gauge" or kind == "age":
            name = raw[kind]
            self.metric(name, f"{where}.{kind}", ("gauge",))
            op = raw.get("aggregate", "max")
            if op not in ("max", "min", "sum"):
                self.fail(f"{where}.aggregate", f"must be max, min or sum, got {op!r}")
            self.check_labels(name, match, without, where)
            gauge = agg(op, Selector(name, name, match))
            value = Binary("-", Time(), gauge) if kind == "age" else gauge
            return lambda offset, w: (value, None)
        if kind in ("rate", "increase"):
            name = raw[kind]
            self.metric(name, f"{where}.{kind}", ("counter",))
            self.check_labels(name, match, without, where)
            sel = Selector(name, name, match)

            def make_counter(offset: float, w: float | None):
                w = w or window
                value = agg("sum", RangeFunction(kind, sel, w, offset))
                return value, agg("sum", RangeFunction("rate", sel, w, offset))
            return make_counter
        if kind in ("quantile", "mean"):
            if kind == "quantile":
                q = raw["quantile"]
                if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q < 1:
                    self.fail(f"{where}.quantile", f"must be a number in (0, 1), got {q!r}")
                name = raw.get("histogram")
                self.metric(name, f"{where}.histogram", ("histogram",))
            else:
                name = raw["mean"]
                self.metric(name, f"{where}.mean", ("histogram",))
            if "le" in without:
                self.fail(f"{where}.without", "le cannot be aggregated away")
            self.check_labels(name, match, without, where)

            def make_histogram(offset: float, w: float | None):
                w = w or window
                rate = lambda suffix: agg("sum", RangeFunction(  # noqa: E731
                    "rate", Selector(name + suffix, name, match), w, offset))
                traffic = rate("_count")
                if kind == "quantile":
                    return HistogramQuantile(float(q), rate("_bucket")), traffic
                return Binary("/", rate("_sum"), traffic), traffic
            return make_histogram
        if kind == "difference":
            terms = self.two_terms(raw, "difference", ("minuend", "subtrahend"), without,
                                   where, ("gauge",))
            difference = Binary("-", agg("sum", terms["minuend"][0]),
                                agg("sum", terms["subtrahend"][0]))
            return lambda offset, w: (difference, None)
        # ratio
        terms = self.two_terms(raw, "ratio", ("numerator", "denominator"), without, where,
                               ("counter", "gauge"))
        if any(kind == "counter" for _, kind in terms.values()) and window is None:
            self.fail(f"{where}.window", "required: the ratio has a counter (rated over window)")

        def make_ratio(offset: float, w: float | None):
            w = w or window
            built = {}
            for part, (sel, family_kind) in terms.items():
                if family_kind == "counter":
                    built[part] = agg("sum", RangeFunction("rate", sel, w, offset))
                else:
                    built[part] = agg("sum", sel)
            return Binary("/", built["numerator"], built["denominator"]), built["denominator"]
        return make_ratio

    def two_terms(self, raw: dict, kind: str, parts: tuple[str, str], without: tuple[str, ...],
                  where: str, kinds: tuple[str, ...]) -> dict[str, tuple[Selector, str]]:
        """The two sides of a ratio or difference signal: {part: (selector, family kind)}."""
        value = raw[kind]
        if not isinstance(value, dict) or set(value) != set(parts):
            self.fail(f"{where}.{kind}", f"must be a mapping with {parts[0]} and {parts[1]}")
        terms = {part: self.term(value[part], f"{where}.{kind}.{part}", kinds)
                 for part in parts}
        labels = {label for sel, _ in terms.values() for label in self.families[sel.family].labels}
        for label in without:
            if label not in labels:
                self.fail(f"{where}.without", f"neither side of the {kind} has a label {label!r}")
        return terms

    def term(self, raw: Any, where: str, kinds: tuple[str, ...]):
        if not isinstance(raw, dict):
            self.fail(where, "must be a mapping with metric and optional match")
        for key in raw:
            if key not in ("metric", "match"):
                self.fail(f"{where}.{key}", "unknown field; known: metric, match")
        name = raw.get("metric")
        self.metric(name, f"{where}.metric", kinds)
        match = self.matchers(raw.get("match", {}), f"{where}.match")
        self.check_labels(name, match, (), where)
        return Selector(name, name, match), self.families[name].kind

    def condition(self, raw: Any, where: str) -> tuple[Node, tuple[str, ...] | None]:
        """An only_if entry: {gauge, match, above|below, on}."""
        if not isinstance(raw, dict):
            self.fail(where, "must be a mapping: gauge, match, above or below, on")
        for key in raw:
            if key not in ("gauge", "match", "above", "below", "on"):
                self.fail(f"{where}.{key}", "unknown field; known: gauge, match, above, below, on")
        name = raw.get("gauge")
        self.metric(name, f"{where}.gauge", ("gauge",))
        match = self.matchers(raw.get("match", {}), f"{where}.match")
        self.check_labels(name, match, (), where)
        op, bound = self.bound(raw, ("above", "below"), where)
        on = raw.get("on")
        if on is not None:
            on = tuple(self.list_of(on, f"{where}.on"))
            self.check_labels(name, {}, on, where, what="on")
        return Binary(op, Selector(name, name, match), Scalar(bound)), on

    def traffic_guard(self, traffic: Node | None, min_rate: Any) -> Node:
        if traffic is None:
            self.fail("min_rate", "only applies to windowed signals (rate, quantile, mean, ratio)")
        if isinstance(min_rate, bool) or not isinstance(min_rate, (int, float)) or min_rate < 0:
            self.fail("min_rate", f"must be a number >= 0 (events per second), got {min_rate!r}")
        return Binary(">=", traffic, Scalar(float(min_rate)))

    # --- field helpers -----------------------------------------------------------------------
    def metric(self, name: Any, where: str, kinds: tuple[str, ...]) -> None:
        if not isinstance(name, str) or not name:
            self.fail(where, "required: a metric family name")
        spec = self.families.get(name)
        if spec is None:
            close = [n for n in self.families if n.startswith(name.rsplit("_", 1)[0])][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            self.fail(where, f"unknown metric {name!r}: not defined by the exporter{hint}")
        family_kind = "gauge" if spec.kind == "info" else spec.kind
        if family_kind not in kinds:
            self.fail(where, f"{name} is a {spec.kind}; this needs a {' or '.join(kinds)}")

    def check_labels(self, name: str, match: tuple, labels: tuple[str, ...], where: str,
                     what: str = "without") -> None:
        spec = self.families[name]
        extra = ("le",) if spec.kind == "histogram" else ()
        for label, _ in match:
            if label not in spec.labels + extra:
                self.fail(f"{where}.match.{label}", f"{name} has no label {label!r}; its labels: "
                                                    f"{', '.join(spec.labels) or 'none'}")
        for label in labels:
            if label not in spec.labels:
                self.fail(f"{where}.{what}", f"{name} has no label {label!r}; its labels: "
                                             f"{', '.join(spec.labels) or 'none'}")

    def matchers(self, raw: Any, where: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
        if not isinstance(raw, dict):
            self.fail(where, "must be a mapping of label: value (or a list of values)")
        out = []
        for label, value in sorted(raw.items()):
            values = value if isinstance(value, list) else [value]
            if not values or not all(isinstance(v, str) and v for v in values):
                self.fail(f"{where}.{label}", "must be a non-empty string or list of strings")
            out.append((str(label), tuple(values)))
        return tuple(out)

    def bound(self, raw: dict, keys: tuple[str, str], where: str | None = None):
        present = [k for k in keys if k in raw]
        prefix = f"{where}." if where else ""
        if len(present) != 1:
            self.fail(where or keys[0], f"needs exactly one of {' or '.join(keys)}")
        value = raw[present[0]]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            self.fail(prefix + present[0], f"must be a number, got {value!r}")
        return (">" if present[0] == "above" else "<"), float(value)

    def number(self, raw: dict, key: str, required: bool) -> float:
        value = raw.get(key)
        if value is None and required:
            self.fail(key, "required")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(key, f"must be a number, got {value!r}")
        return float(value)

    def duration(self, raw: dict, key: str, required: bool, allow_zero: bool = False,
                 where: str | None = None) -> float | None:
        path = f"{where}.{key}" if where else key
        if key not in raw:
            if required:
                self.fail(path, "required: a duration such as 30s, 5m, 1h")
            return None
        seconds = parse_duration(raw[key])
        if seconds is None:
            self.fail(path, f"not a duration (30s, 5m, 1h30m): {raw[key]!r}")
        if seconds == 0 and not allow_zero:
            self.fail(path, "must be longer than 0s")
        return seconds

    def string_map(self, raw: Any, where: str) -> dict[str, str]:
        if raw is None:
            self.fail(where, "required")
        if not isinstance(raw, dict):
            self.fail(where, "must be a mapping of name: text")
        for key, value in raw.items():
            if not isinstance(value, str):
                self.fail(f"{where}.{key}", f"must be a string, got {type(value).__name__}")
        return {str(k): v for k, v in raw.items()}

    def list_of(self, raw: Any, where: str) -> list[str]:
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            self.fail(where, "must be a list of names")
        return raw
