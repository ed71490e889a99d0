"""The generated dashboards drawn to PNG from a real Prometheus, without a Grafana server.

Each panel is drawn where its gridPos puts it (24 columns), from the panel's own queries with
the template variables substituted: time series as lines, heatmaps from the bucket rates, stats
as their last value, tables as text. Units follow the panel's unit. `render_all` is what
bench/render_dashboards.py (the command line) and tests/test_dashboards.py (with
DASHBOARD_PNG_DIR set) call.
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from exporter.dashboards import generate  # noqa: E402
from exporter.dashboards.inspect import substitute  # noqa: E402

GRID_COLUMNS = 24
INCH_PER_COLUMN = 0.75
INCH_PER_ROW = 0.36  # Grafana's grid row is 30 px against a ~64 px column
RangeQuery = Callable[[str], list[dict]]  # expr -> Prometheus matrix result
InstantQuery = Callable[[str], list[dict]]  # expr -> Prometheus vector result


# --- units ---------------------------------------------------------------------------------------

_SI = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
_BINARY = ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"))


def _si(value: float, suffix: str) -> str:
    for factor, prefix in _SI:
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{suffix}".rstrip()
    return f"{value:.3g} {suffix}".rstrip()


def format_value(value: float, unit: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    if unit == "percentunit":
        return f"{value * 100:.3g}%"
    if unit == "s":
        if value == 0:
            return "0 s"
        for factor, name in ((1, "s"), (1e-3, "ms"), (1e-6, "µs")):
            if abs(value) >= factor:
                return f"{value / factor:.3g} {name}"
        return f"{value * 1e9:.3g} ns"
    if unit in ("bytes", "Bps"):
        suffix = "/s" if unit == "Bps" else ""
        for factor, name in _BINARY:
            if abs(value) >= factor:
                return f"{value / factor:.3g} {name}{suffix}"
        return f"{value:.3g} B{suffix}"
    if unit == "bool_yes_no":
        return "yes" if value else "no"
    if unit.startswith("suffix:"):
        return _si(value, unit.split(":", 1)[1].strip())
    simple = {"reqps": "req/s", "ops": "ops/s", "cps": "/s", "watt": "W", "celsius": "°C",
              "hertz": "Hz", "joule": "J", "short": "", "string": ""}
    return _si(value, simple.get(unit, unit))


# --- data ----------------------------------------------------------------------------------------

def legend(fmt: str, metric: dict[str, str]) -> str:
    if not fmt or fmt == "__auto":
        return ",".join(f"{k}={v}" for k, v in sorted(metric.items()) if k != "__name__")
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt).strip()


def _series(result: list[dict]) -> list[tuple[dict, np.ndarray, np.ndarray]]:
    out = []
    for item in result:
        values = item.get("values") or [item["value"]]
        t = np.array([float(v[0]) for v in values])
        y = np.array([float(v[1]) for v in values])
        out.append((item["metric"], t, y))
    return out


# --- panels --------------------------------------------------------------------------------------

def _style(ax, title: str) -> None:
    ax.set_title(title, loc="left", fontsize=9, fontweight="bold", color="#222")
    ax.tick_params(labelsize=7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _time_axis(ax, window: tuple[float, float]) -> None:
    """Seconds since the start of the drawn window."""
    t0, t1 = window
    ax.set_xlim(t0, t1)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(
        lambda x, _pos: f"{x - t0:.0f}s"))


def _no_data(ax, panel: dict) -> None:
    text = panel["fieldConfig"]["defaults"].get("noValue") or "no data"
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#888")


def _timeseries(ax, panel: dict, data: list, unit: str, window: tuple[float, float]) -> None:
    peak = 0.0
    for fmt, series in data:
        for metric, t, y in series:
            ax.plot(t, y, linewidth=1.2, label=legend(fmt, metric)[:40])
            if np.isfinite(y).any():
                peak = max(peak, float(np.nanmax(np.abs(y))))
    defaults = panel["fieldConfig"]["defaults"]
    bottom = defaults.get("min")
    top = defaults.get("max")
    if bottom is not None:
        ax.set_ylim(bottom=bottom, top=top if top is not None else max(peak * 1.15, 1e-9)
                    if peak > 0 else 1)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(
        lambda v, _pos: format_value(v, unit)))
    _time_axis(ax, window)
    if any(series for _fmt, series in data):
        ax.legend(fontsize=6, loc="upper left", frameon=False, ncol=2)
    else:
        _no_data(ax, panel)


def _heatmap(ax, data: list, unit: str, window: tuple[float, float]) -> None:
    series = [(float(m["le"]), t, y) for _fmt, s in data for m, t, y in s if "le" in m]
    if not series:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    series.sort(key=lambda item: item[0])
    times = series[0][1]
    cumulative = np.array([np.interp(times, t, y) for _le, t, y in series])
    counts = np.diff(np.vstack([np.zeros(len(times)), cumulative]), axis=0).clip(min=0)
    used = np.nonzero(counts.sum(axis=1) > 0)[0]
    if used.size == 0:
        ax.text(0.5, 0.5, "no observations", ha="center", va="center", transform=ax.transAxes)
        return
    lo, hi = max(used[0] - 1, 0), min(used[-1] + 2, len(series))
    bounds = [format_value(le, unit) if math.isfinite(le) else "+Inf"
              for le, _t, _y in series[lo:hi]]
    ax.imshow(counts[lo:hi], aspect="auto", origin="lower", cmap="Oranges",
              extent=(times[0], times[-1], -0.5, hi - lo - 0.5), interpolation="nearest")
    step = max(1, (hi - lo) // 6)
    ax.set_yticks(range(0, hi - lo, step))
    ax.set_yticklabels([f"≤{b}" for b in bounds[::step]])
    _time_axis(ax, window)


def _stat(ax, data: list, unit: str) -> None:
    ax.axis("off")
    items = [(legend(fmt, m), y[-1]) for fmt, s in data for m, _t, y in s if len(y)]
    if not items:
        ax.text(0.5, 0.4, "no data", ha="center", va="center", fontsize=14, color="#888")
        return
    size = 20 if len(items) == 1 else 11
    for i, (label, value) in enumerate(items[:4]):
        y = 0.75 - i * (0.8 / max(len(items[:4]), 1))
        ax.text(0.5, y - 0.1, format_value(value, unit), ha="center", va="center",
                fontsize=size, color="#1a7f37", fontweight="bold")
        if len(items) > 1 or label:
            ax.text(0.5, y + 0.08, label[:48], ha="center", va="center", fontsize=6,
                    color="#555")


def _table(ax, panel: dict, data: list) -> None:
    ax.axis("off")
    hidden = set()
    for transformation in panel.get("transformations", []):
        hidden |= {k for k, v in transformation["options"].get("excludeByName", {}).items() if v}
    rows = [m for _fmt, s in data for m, _t, _y in s]
    if not rows:
        ax.text(0.5, 0.5, "no rows", ha="center", va="center")
        return
    columns = [c for c in sorted({k for r in rows for k in r}) if c not in hidden]
    cells = [[str(r.get(c, ""))[:28] for c in columns] for r in rows[:8]]
    table = ax.table(cellText=cells, colLabels=columns, loc="upper center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(6)
    table.scale(1, 1.2)


def _state_timeline(ax, data: list, window: tuple[float, float]) -> None:
    series = [(legend(fmt, m), t, y) for fmt, s in data for m, t, y in s]
    if not series:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    for i, (label, t, y) in enumerate(series):
        ax.fill_between(t, i - 0.4, i + 0.4, where=y > 0, color="#d62728", step="post")
        ax.fill_between(t, i - 0.4, i + 0.4, where=y <= 0, color="#e6f4ea", step="post")
    ax.set_yticks(range(len(series)))
    ax.set_yticklabels([label[:30] for label, _t, _y in series], fontsize=5)
    _time_axis(ax, window)


# --- dashboards ---------------------------------------------------------------------------------

def _height(panels: list[dict]) -> int:
    return max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)


def render_dashboard(dashboard: dict, variables: dict[str, str], query_range: RangeQuery,
                     query: InstantQuery, out: Path, window: tuple[float, float],
                     note: str = "") -> Path:
    """Draw every panel of `dashboard` (rows open, as Grafana shows them expanded)."""
    flat = []
    for panel in dashboard["panels"]:
        flat.append(panel)
        flat.extend(panel.get("panels", []))  # collapsed rows: drawn as if expanded
    rows = _height(flat)
    fig_width = GRID_COLUMNS * INCH_PER_COLUMN
    fig = plt.figure(figsize=(fig_width, (rows + 2) * INCH_PER_ROW))
    margin = 0.8 / fig_width  # room for the y tick labels
    total_h = rows + 2
    fig.text(0.01, 1 - 0.6 / total_h, dashboard["title"], fontsize=16, fontweight="bold",
             va="center")
    if note:
        fig.text(0.99, 1 - 0.6 / total_h, note, fontsize=8, ha="right", va="center",
                 color="#555")
    for panel in flat:
        g = panel["gridPos"]
        left, width = g["x"] / GRID_COLUMNS, g["w"] / GRID_COLUMNS
        bottom = 1 - (g["y"] + g["h"] + 1.5) / total_h
        height = g["h"] / total_h
        if panel["type"] == "row":
            fig.text(0.01, bottom + height / 2, panel["title"], fontsize=12, fontweight="bold",
                     color="#1f60c4", va="center")
            continue
        ax = fig.add_axes((left + margin, bottom + 0.22 * height, width - 1.3 * margin,
                           height * 0.62))
        unit = panel["fieldConfig"]["defaults"].get("unit", "short")
        data = []
        for target in panel["targets"]:
            expr = substitute(target["expr"], variables)
            result = query(expr) if target.get("instant") or panel["type"] in ("stat",) \
                else query_range(expr)
            data.append((target.get("legendFormat", ""), _series(result)))
        kind = panel["type"]
        if kind == "timeseries":
            _timeseries(ax, panel, data, unit, window)
        elif kind == "heatmap":
            _heatmap(ax, data, unit, window)
        elif kind == "stat":
            _stat(ax, data, unit)
        elif kind == "table":
            _table(ax, panel, data)
        elif kind == "state-timeline":
            _state_timeline(ax, data, window)
        _style(ax, panel["title"])
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def render_all(prometheus_url: str, out_dir: Path, variables: dict[str, str], start: float,
               end: float, step: float = 2.0, note: str = "") -> list[Path]:
    def api(path: str, **params: str) -> list[dict]:
        url = f"{prometheus_url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())["data"]["result"]

    def query_range(expr: str) -> list[dict]:
        return api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",
                   step=f"{step:g}")

    def query(expr: str) -> list[dict]:
        return api("query", query=expr, time=f"{end:.3f}")

    paths = []
    for name, dashboard in generate().items():
        out = out_dir / f"dashboard-{name.removesuffix('.json')}.png"
        paths.append(render_dashboard(dashboard, variables, query_range, query, out,
                                      (start, end), note))
    return paths
