"""Reading dashboards back: every panel (rows nest panels), every query, every metric name.

Used by the tests (names exist, queries run against a real Prometheus) and by
bench/render_dashboards.py.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

# Series that Prometheus itself makes, which dashboards may query besides our families.
PROMETHEUS_SERIES = frozenset({"ALERTS", "ALERTS_FOR_STATE", "up", "scrape_duration_seconds"})

_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "and",
                       "or", "unless", "bool", "offset", "inf", "nan"})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_BRACES = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w$.:])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?")
_VARIABLE = re.compile(r'label_values\(\s*([a-zA-Z_][a-zA-Z0-9_]*)')


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every non-row panel, including those inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def iter_rows(dashboard: dict[str, Any]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(row title, its panels) in order, whether the row is open or collapsed."""
    title, panels = "", []
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            if panels:
                yield title, panels
            title, panels = panel["title"], list(panel.get("panels", []))
        else:
            panels.append(panel)
    if panels:
        yield title, panels


def panel_exprs(panel: dict[str, Any]) -> list[str]:
    return [t["expr"] for t in panel.get("targets", []) if t.get("expr")]


def variable_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(variable name, label_values query) of every query variable."""
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((var["name"], query))
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords and labels left out).
    Names with a colon are recording rules' outputs (exporter/alerts/fleet.py), not families
    the code defines: they are left out too (the promtool tests check them)."""
    text = _STRING.sub('""', expr)
    text = _BRACES.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    names = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name in _KEYWORDS or ":" in name:
            continue
        names.add(name)
    return names


def variable_metric(query: str) -> str:
    match = _VARIABLE.search(query)
    if not match:
        raise ValueError(f"not a label_values(metric, label) query: {query!r}")
    return match.group(1)


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace `$name` and `${name}` (longest names first, so $__range does not eat
    $__rate_interval)."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    return expr
