"""Grafana dashboard JSON as plain dicts: panels, targets, template variables, layout.

Only what our dashboards use exists here. Every panel queries the `datasource` template variable
(so file provisioning works without `${DS_PROMETHEUS}` inputs) and carries a unit. Layout is
computed: panels flow left to right in rows of 24 grid units.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 39  # Grafana 10.4 / 11.x read it as is; newer versions migrate it on load
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
TAG = "vllm-exporter"
GRID_WIDTH = 24


@dataclass
class Target:
    expr: str
    legend: str = ""
    instant: bool = False
    format: str = "time_series"  # time_series | table | heatmap


@dataclass
class Panel:
    kind: str  # timeseries | stat | heatmap | table | state-timeline
    title: str
    description: str
    unit: str
    targets: list[Target]
    width: int = 8
    height: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)  # extra fieldConfig.defaults
    custom: dict[str, Any] = field(default_factory=dict)  # fieldConfig.defaults.custom
    transformations: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Row:
    title: str
    panels: list[Panel]
    collapsed: bool = False


def timeseries(title: str, description: str, unit: str, targets: list[Target], *,
               width: int = 8, height: int = 8, stack: bool = False,
               min_value: float | None = 0, max_value: float | None = None,
               no_value: str | None = None) -> Panel:
    custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
              "spanNulls": False}
    if stack:
        custom.update(stacking={"mode": "normal", "group": "A"}, fillOpacity=40)
    defaults: dict[str, Any] = {}
    if min_value is not None:
        defaults["min"] = min_value
    if max_value is not None:
        defaults["max"] = max_value
    if no_value is not None:
        defaults["noValue"] = no_value
    options = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
               "tooltip": {"mode": "multi", "sort": "desc"}}
    return Panel("timeseries", title, description, unit, targets, width, height, options,
                 defaults, custom)


def stat(title: str, description: str, unit: str, targets: list[Target], *,
         width: int = 4, height: int = 4, no_value: str | None = None,
         thresholds: list[tuple[float | None, str]] | None = None) -> Panel:
    steps = [{"color": color, "value": value}
             for value, color in (thresholds or [(None, "green")])]
    defaults: dict[str, Any] = {"thresholds": {"mode": "absolute", "steps": steps}}
    if no_value is not None:
        defaults["noValue"] = no_value
    options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
               "colorMode": "value", "graphMode": "area", "textMode": "auto",
               "orientation": "auto", "justifyMode": "auto"}
    return Panel("stat", title, description, unit, targets, width, height, options, defaults)


def heatmap(title: str, description: str, unit: str, bucket_expr: str, *,
            width: int = 8, height: int = 8) -> Panel:
    """A heatmap of pre-bucketed data: `bucket_expr` must be a `sum by (le) (rate(..._bucket))`."""
    options = {"calculate": False, "cellGap": 1,
               "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64, "exponent": 0.5,
                         "fill": "dark-orange", "reverse": False},
               "yAxis": {"axisPlacement": "left", "unit": unit},
               "rowsFrame": {"layout": "auto"},
               "tooltip": {"mode": "single", "yHistogram": True, "showColorScale": False},
               "legend": {"show": True}, "exemplars": {"color": "rgba(255,0,255,0.7)"}}
    targets = [Target(bucket_expr, "{{le}}", format="heatmap")]
    return Panel("heatmap", title, description, unit, targets, width, height, options)


def table(title: str, description: str, targets: list[Target], *, unit: str = "string",
          width: int = 24, height: int = 6, hide: tuple[str, ...] = ("Time", "__name__"),
          no_value: str | None = None) -> Panel:
    transformations = [{"id": "organize",
                        "options": {"excludeByName": {name: True for name in hide},
                                    "indexByName": {}, "renameByName": {}}}]
    options = {"showHeader": True, "cellHeight": "sm",
               "footer": {"show": False, "reducer": ["sum"], "countRows": False, "fields": ""}}
    custom = {"align": "auto", "cellOptions": {"type": "auto"}, "inspect": False}
    defaults = {"noValue": no_value} if no_value else {}
    return Panel("table", title, description, unit, targets, width, height, options, defaults,
                 custom, transformations)


def state_timeline(title: str, description: str, targets: list[Target], *,
                   width: int = 12, height: int = 8,
                   mappings: list[tuple[int, str, str]] = ()) -> Panel:
    """A state timeline; `mappings` maps values to (text, color)."""
    defaults: dict[str, Any] = {}
    if mappings:
        defaults["mappings"] = [{"type": "value", "options": {
            str(value): {"text": text, "color": color, "index": i}}}
            for i, (value, text, color) in enumerate(mappings)]
    defaults["thresholds"] = {"mode": "absolute", "steps": [{"color": "green", "value": None}]}
    options = {"showValue": "never", "mergeValues": True, "alignValue": "left", "rowHeight": 0.9,
               "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
               "tooltip": {"mode": "single", "sort": "none"}}
    custom = {"fillOpacity": 80, "lineWidth": 0}
    return Panel("state-timeline", title, description, "short", targets, width, height, options,
                 defaults, custom)


# --- template variables --------------------------------------------------------------------------

def datasource_variable() -> dict[str, Any]:
    return {"name": "datasource", "label": "Data source", "type": "datasource",
            "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "regex": "",
            "options": [], "includeAll": False, "multi": False}


def query_variable(name: str, label: str, query: str, *, multi: bool = True) -> dict[str, Any]:
    """A Prometheus label_values() variable; 'All' selects everything with the regex `.*`."""
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
            "definition": query,
            "query": {"qryType": 1, "query": query,
                      "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "current": {}, "hide": 0, "refresh": 2, "regex": "", "sort": 1, "options": [],
            "includeAll": True, "allValue": ".*", "multi": multi}


def custom_variable(name: str, label: str, values: list[str], description: str
                    ) -> dict[str, Any]:
    options = [{"text": v, "value": v, "selected": i == 0} for i, v in enumerate(values)]
    return {"name": name, "label": label, "type": "custom", "description": description,
            "query": ",".join(values), "current": {"text": values[0], "value": values[0]},
            "options": options, "hide": 0, "includeAll": False, "multi": False}


# --- rendering --------------------------------------------------------------------------------

def _target_json(target: Target, ref: str) -> dict[str, Any]:
    return {"refId": ref, "datasource": DATASOURCE, "expr": target.expr,
            "legendFormat": target.legend or "__auto", "range": not target.instant,
            "instant": target.instant, "format": target.format, "editorMode": "code"}


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults = {"unit": panel.unit, **panel.defaults}
    if panel.custom:
        defaults["custom"] = panel.custom
    out = {"id": panel_id, "type": panel.kind, "title": panel.title,
           "description": panel.description, "datasource": DATASOURCE,
           "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
           "fieldConfig": {"defaults": defaults, "overrides": []},
           "options": panel.options,
           "targets": [_target_json(t, chr(ord("A") + i)) for i, t in enumerate(panel.targets)]}
    if panel.transformations:
        out["transformations"] = panel.transformations
    return out


def _layout(rows: list[Row]) -> list[dict[str, Any]]:
    """Rows and their panels with ids and grid positions, as Grafana nests them.

    An open row is followed by its panels at the top level; a collapsed row holds its panels
    in its own `panels` list.
    """
    out: list[dict[str, Any]] = []
    next_id, y = 1, 0
    for row in rows:
        row_json: dict[str, Any] = {"id": next_id, "type": "row", "title": row.title,
                                    "collapsed": row.collapsed,
                                    "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
                                    "panels": []}
        next_id += 1
        y += 1
        out.append(row_json)
        x, line_height = 0, 0
        for panel in row.panels:
            if x + panel.width > GRID_WIDTH:
                x, y, line_height = 0, y + line_height, 0
            placed = _panel_json(panel, next_id, x, y)
            next_id += 1
            x += panel.width
            line_height = max(line_height, panel.height)
            (row_json["panels"] if row.collapsed else out).append(placed)
        y += line_height
    return out


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    rows: list[Row]
    variables: list[dict[str, Any]]
    file_name: str


def links_to(others: list[Dashboard]) -> list[dict[str, Any]]:
    return [{"type": "link", "title": d.title, "tooltip": d.description,
             "url": f"/d/{d.uid}", "icon": "dashboard", "asDropdown": False,
             "includeVars": True, "keepTime": True, "targetBlank": False, "tags": []}
            for d in others]


def render(dashboard: Dashboard, others: list[Dashboard]) -> dict[str, Any]:
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": [TAG],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "links": links_to(others),
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": dashboard.variables},
        "panels": _layout(dashboard.rows),
    }
