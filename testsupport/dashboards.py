"""What the live dashboard checks share (tests/test_dashboards.py, tests/test_default_install.py):
every panel query of the generated dashboards, run against a real Prometheus that scrapes a
daemon under load every second."""

from __future__ import annotations

import re
from dataclasses import dataclass

from exporter.dashboards import generate
from exporter.dashboards.inspect import iter_panels, metric_names, substitute

from . import ROOT
from .load import Load
from .prometheus import Prometheus
from .waiting import asked_again, wait_for

DASHBOARDS = generate()
JOB = "vllm-exporter"
RATE_INTERVAL = "15s"  # 15 samples at 1 s scrapes
RULES_FILE = ROOT / "deploy" / "prometheus" / "rules" / "vllm-exporter.rules.yml"
# Families the daemon only exports with alerts.alertmanager.urls set. Where the daemon has
# none, their panels may be empty (they are still run: valid PromQL).
NEEDS_ALERTMANAGER = {f"vllm_exporter_alert_{name}" for name in (
    "notifications_sent_total", "notifications_failed_total", "notifications_dropped_total",
    "queue_length")}


def all_targets():
    """(dashboard file name, panel, target) of every query of every dashboard."""
    for file_name, dashboard in DASHBOARDS.items():
        for panel in iter_panels(dashboard):
            for target in panel["targets"]:
                yield file_name, panel, target


def query_problems(prom: Prometheus, targets, variables: dict[str, str],
                   may_be_empty: set[str], retry_seconds: float = 15) -> tuple[list[str], int]:
    """Run each (where, target) query with the variables substituted: (problems, queries run).
    A problem is a query Prometheus refuses (INVALID), one with no result unless every metric
    it reads is in `may_be_empty` (EMPTY), or one whose every value is NaN (0/0 with no
    traffic). An empty or all-NaN result is asked again for up to `retry_seconds`: a scrape
    that misses its 1 s deadline on a busy machine makes its series stale for a moment."""
    problems, count = [], 0
    for where, target in targets:
        expr = substitute(target["expr"], variables)
        assert "$" not in expr, expr
        where = f"{where}: {expr}"
        try:
            result = prom.query(expr)
        except AssertionError as exc:
            problems.append(f"INVALID {where}: {exc}")
            continue
        count += 1
        names = metric_names(target["expr"])
        if not result and names and names <= may_be_empty:
            continue
        if _empty_or_nan(result):
            result = asked_again(lambda: prom.query(expr), _empty_or_nan, retry_seconds)
        if not result:
            problems.append(f"EMPTY {where}")
        elif _empty_or_nan(result):
            problems.append(f"NaN {where}")
    return problems, count


def _empty_or_nan(result: list[dict]) -> bool:
    return all(float(item["value"][1]) != float(item["value"][1]) for item in result)


def escape_regex(value: str) -> str:
    """A value as Grafana writes it into a regex matcher: special characters escaped with a
    backslash, and that backslash doubled inside the PromQL string."""
    return re.sub(r"([.\\+*?^$()\[\]{}|])", r"\\\\\1", value)


def wait_for_rate_windows(prom: Prometheus, timeout: float = 90) -> None:
    """Until Prometheus holds a whole RATE_INTERVAL of scrapes of every target of JOB, so that
    every rate() and increase() over it has its samples."""
    seconds = int(RATE_INTERVAL.removesuffix("s"))
    wait_for(lambda: prom.query(f'min(count_over_time(up{{job="{JOB}"}}[{RATE_INTERVAL}])) '
                                f'>= {seconds}'), timeout, 0.5,
             f"{RATE_INTERVAL} of scrapes of every target")


@dataclass
class Live:
    prom: Prometheus
    variables: dict[str, str]  # template variable -> the value substituted in the tests
    started: float  # when every target was scraped and the measured load began
    load: Load
    has_alertmanager: bool  # the daemon notifies an Alertmanager
