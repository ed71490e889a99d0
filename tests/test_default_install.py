"""What a new user sees: a daemon with nothing but its ports set (no Alertmanager, no GPU on the
CPU machine), a Prometheus without our rules, and traffic without aborts. Every panel shows a
number or says what is not configured; every series the rules read exists from the start.

A module of its own, so that it starts its engine after test_dashboards.py's load has stopped:
two CPU engines pin their workers to the same core, and a busy one starves the other's start.
"""

from __future__ import annotations

import time

import pytest
import yaml

from exporter.dashboards.inspect import metric_names, substitute
from exporter.catalog import conditional_samples
from testsupport.daemon import start_daemon
from testsupport.dashboards import (JOB, NEEDS_ALERTMANAGER, RATE_INTERVAL, RULES_FILE, Live,
                                    all_targets, escape_regex, wait_for_rate_windows)
from testsupport.load import Load
from testsupport.net import free_port
from testsupport.prometheus import PROMETHEUS, start_prometheus
from testsupport.waiting import wait_for


@pytest.fixture(scope="module")
def default_live(tmp_path_factory):
    """What a new user sees: a daemon on its defaults (only its ports set: no Alertmanager, no
    GPU on this machine), our rules not loaded in Prometheus, and a load without aborts."""
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    tmp = tmp_path_factory.mktemp("default-install")
    api_port, metrics_port = free_port(), free_port()
    daemon = start_daemon(tmp, {"api": {"host": "127.0.0.1", "port": api_port},
                                "metrics": {"host": "127.0.0.1", "port": metrics_port}},
                          name="default-daemon")
    target = f"127.0.0.1:{metrics_port}"
    prom = load = None
    try:
        prom = start_prometheus(tmp / "prometheus", JOB, [target])
        load = Load(daemon.api_url, daemon.model, concurrency=2, abandons=False).start()
        wait_for(lambda: prom.query(f'count(up{{job="{JOB}"}} == 1) == 1'), 30, 0.5,
                 "first scrapes")
        wait_for_rate_windows(prom)
        variables = {
            "__rate_interval": RATE_INTERVAL, "__range": "5m", "job": JOB,
            "instance": escape_regex(target), "model": escape_regex(daemon.model), "gpu": "0",
            "slo_target": "0.99", "error_target": "0.999",
        }
        yield Live(prom, variables, time.time(), load, False)
    finally:
        if load is not None:
            load.stop()
        if prom is not None:
            prom.stop()
        daemon.stop()


def is_gpu_series(name: str) -> bool:
    """Read from NVML: absent on a machine without a GPU."""
    return name.startswith(("vllm_gpu_", "vllm_exporter_gpu_"))


def _not_configured_text(panel: dict) -> str | None:
    return panel.get("fieldConfig", {}).get("defaults", {}).get("noValue")


@pytest.mark.engine
def test_a_default_install_leaves_no_panel_empty(default_live):
    """Every panel shows a number, or, where the part it shows is not configured (no
    Alertmanager, our rules not loaded in Prometheus), says so; only GPU panels may be empty
    on a machine without a GPU."""
    not_configured = NEEDS_ALERTMANAGER | {"ALERTS"} | conditional_samples()
    prom, variables = default_live.prom, default_live.variables
    problems = []
    for file_name, panel, target in all_targets():
        expr = substitute(target["expr"], variables)
        if prom.query(expr):
            continue
        names = metric_names(target["expr"])
        if names and all(is_gpu_series(name) for name in names):
            continue  # no GPU here
        if names and names <= not_configured and _not_configured_text(panel):
            continue  # the panel says what is missing instead of "No data"
        problems.append(f"EMPTY {file_name} / {panel['title']}: {expr}")
    assert not problems, "\n".join(problems)
    assert default_live.load.finished > 0 and not default_live.load.errors


@pytest.mark.engine
def test_every_series_the_rules_read_exists_from_the_start_on_a_default_install(default_live):
    """The rules see a real value (0 where nothing happened yet), not an absent series that
    would keep them silent; GPU series aside on a machine without a GPU."""
    groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
    names = {name for group in groups for rule in group["rules"]
             for name in metric_names(rule["expr"])}
    absent = sorted(name for name in names if not is_gpu_series(name)
                    and name not in conditional_samples()  # a feature not switched on
                    and not default_live.prom.query(f'{name}{{job="{JOB}"}}'))
    assert not absent, absent
