"""The Grafana dashboards: generated == committed, names exist, units and rate windows, and
every panel query valid and non-empty against a real Prometheus scraping the real daemon.

GPU panels get their data from the real GPU collector over a fake NVML (testsupport/fake_pynvml.py,
recorded on an H200), served on its own port and scraped by the same Prometheus under the same
job: no second engine. DASHBOARD_PNG_DIR=DIR also renders every dashboard to DIR/dashboard-*.png
from the live data (testsupport/dashboard_png.py, as bench/render_dashboards.py does).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from exporter.dashboards import to_text
from exporter.dashboards.cli import expected_files, run_dashboards
from exporter.dashboards.configmap import configmap_text
from exporter.dashboards.inspect import (PROMETHEUS_SERIES, iter_panels, iter_rows,
                                         metric_names, substitute,
                                         variable_metric, variable_queries)
from exporter.docs import all_families
from exporter.catalog import conditional_samples
from testsupport import ROOT
from testsupport.dashboards import (DASHBOARDS, JOB, NEEDS_ALERTMANAGER, RATE_INTERVAL, RULES_FILE,
                                    Live, all_targets, escape_regex, query_problems,
                                    wait_for_rate_windows)
from testsupport.load import Load, abandoned_request
from testsupport.processes import engine_paused
from testsupport.prometheus import PROMETHEUS, start_prometheus
from testsupport.waiting import wait_for

DASHBOARD_DIR = ROOT / "grafana" / "dashboards"
CONFIGMAP = ROOT / "deploy" / "kubernetes" / "configmap-dashboards.yaml"
# Fixed windows allowed besides $__rate_interval / $__range: the SLO burn-rate pair (1h, 5m).
FIXED_WINDOWS = {"1h", "5m"}


def sample_names() -> dict[str, str]:
    """Every sample name the code defines -> its family."""
    names = {}
    for family in all_families():
        if family.kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                names[family.name + suffix] = family.name
        else:
            names[family.name] = family.name
    return names


# --- generated == committed ---------------------------------------------------------------------

def test_committed_dashboards_and_configmap_are_what_the_code_generates():
    files = expected_files(str(DASHBOARD_DIR), str(CONFIGMAP))
    for path, text in files.items():
        assert path.exists(), f"{path} missing: run vllm-exporter dashboards --configmap ..."
        assert path.read_text() == text, f"{path} is stale: run vllm-exporter dashboards"
    assert sorted(p.name for p in DASHBOARD_DIR.glob("*.json")) == sorted(DASHBOARDS)


def test_check_mode_fails_on_a_changed_or_extra_file_and_passes_when_fresh(tmp_path, capsys):
    args = Namespace(out=str(tmp_path / "d"), configmap=str(tmp_path / "cm.yaml"), check=False)
    assert run_dashboards(args) == 0
    check = Namespace(**{**vars(args), "check": True})
    assert run_dashboards(check) == 0
    engine = tmp_path / "d" / "engine.json"
    engine.write_text(engine.read_text().replace("vllm_requests_waiting", "vllm_num_waiting"))
    assert run_dashboards(check) == 1
    assert "vllm_num_waiting" in capsys.readouterr().err
    assert run_dashboards(args) == 0
    (tmp_path / "d" / "old.json").write_text("{}")
    assert run_dashboards(check) == 1
    assert "old.json" in capsys.readouterr().err


def test_configmap_holds_exactly_the_dashboards():
    doc = yaml.safe_load(configmap_text(DASHBOARDS))
    assert doc["kind"] == "ConfigMap" and doc["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert {name: json.loads(text) for name, text in doc["data"].items()} == DASHBOARDS


# --- names, units, windows, variables, links -----------------------------------------------------

def test_metric_names_are_extracted_from_promql():
    expr = ('histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{job=~"$job", '
            'x="rate(b)"}[$__rate_interval]))) / on(model) group_left(engine) c_total '
            'or vector(0) * d offset 5m > bool 1e3')
    assert metric_names(expr) == {"a_bucket", "c_total", "d"}


def test_every_metric_in_every_panel_and_variable_is_defined_in_the_code():
    known = sample_names()
    unknown = []
    for file_name, panel, target in all_targets():
        for name in metric_names(target["expr"]) - PROMETHEUS_SERIES:
            if name not in known:
                unknown.append(f"{file_name} / {panel['title']}: {name}")
    for file_name, dashboard in DASHBOARDS.items():
        for var, query in variable_queries(dashboard):
            if variable_metric(query) not in known:
                unknown.append(f"{file_name} / ${var}: {variable_metric(query)}")
    assert not unknown, "names not defined in exporter/ (metrics.py, gpu/, alerts):\n" + \
        "\n".join(unknown)


def test_every_metric_in_the_exported_rules_is_defined_in_the_code():
    if not RULES_FILE.exists():
        pytest.skip(f"{RULES_FILE} not generated yet (vllm-exporter rules export)")
    known = sample_names()
    groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert rules
    unknown = {f"{rule['alert']}: {name}" for rule in rules
               for name in metric_names(rule["expr"]) if name not in known}
    assert not unknown, sorted(unknown)


# Grafana's unit ids that the dashboards use; `suffix:<text>` is Grafana's custom-unit syntax.
GRAFANA_UNITS = {"s", "percentunit", "reqps", "ops", "cps", "bytes", "Bps", "watt", "celsius",
                 "hertz", "joule", "short", "string", "bool_yes_no"}


def test_every_panel_has_a_unit_the_prometheus_datasource_variable_and_a_description():
    for file_name, dashboard in DASHBOARDS.items():
        panels = list(iter_panels(dashboard))
        assert len(panels) >= 8, file_name
        for panel in panels:
            where = f"{file_name} / {panel['title']}"
            unit = panel["fieldConfig"]["defaults"].get("unit", "")
            assert unit in GRAFANA_UNITS or unit.startswith("suffix:"), f"{where}: unit {unit!r}"
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            assert panel["description"], where
            assert panel["targets"], where
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", where
        assert "DS_PROMETHEUS" not in to_text(dashboard)


def test_rates_use_rate_interval_and_every_selector_is_scoped_by_the_variables():
    families = {spec.name: spec for spec in all_families()}
    by_sample = sample_names()
    for file_name, panel, target in all_targets():
        expr, where = target["expr"], f"{file_name} / {panel['title']}: {target['expr']}"
        has_model = any(v["name"] == "model" for v in DASHBOARDS[file_name]["templating"]["list"])
        for window in re.findall(r"\[([^\]]+)\]", expr):
            assert window in ("$__rate_interval", "$__range") or window in FIXED_WINDOWS, where
            if window in FIXED_WINDOWS:
                assert "burn rate" in panel["title"].lower(), where
        for name, matchers in re.findall(r"\b([a-zA-Z_][a-zA-Z0-9_]*)\{([^}]*)\}", expr):
            if name in ("ALERTS",):
                continue
            assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers, where
            spec = families.get(by_sample.get(name, ""))
            if has_model and spec is not None and "model" in spec.labels:
                assert 'model=~"$model"' in matchers, where


def test_template_variables():
    for file_name, dashboard in DASHBOARDS.items():
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        for name in ("job", "instance"):
            assert variables[name]["type"] == "query", (file_name, name)
            assert variables[name]["datasource"]["uid"] == "${datasource}"
        expected = {"overview.json": "model", "engine.json": "model", "gpu.json": "gpu"}
        if file_name in expected:
            assert expected[file_name] in variables, file_name
        used = {m for _f, p, t in all_targets() if _f == file_name
                for m in re.findall(r"\$(\w+)", t["expr"])}
        assert used - {"__rate_interval", "__range"} <= set(variables), (file_name, used)


def test_dashboards_link_to_each_other_and_the_grid_does_not_overlap():
    uids = {d["uid"] for d in DASHBOARDS.values()}
    assert len(uids) == len(DASHBOARDS)
    for file_name, dashboard in DASHBOARDS.items():
        linked = {link["url"].removeprefix("/d/") for link in dashboard["links"]}
        assert linked == uids - {dashboard["uid"]}, file_name
        assert all(link["includeVars"] and link["keepTime"] for link in dashboard["links"])
        cells = set()
        ids = set()
        flat = [p for p in dashboard["panels"]] + [c for p in dashboard["panels"]
                                                    for c in p.get("panels", [])]
        for panel in flat:
            g = panel["gridPos"]
            assert g["x"] + g["w"] <= 24, (file_name, panel["title"])
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                    for y in range(g["y"], g["y"] + g["h"])}
            assert not mine & cells, (file_name, panel["title"], "overlaps")
            cells |= mine
            assert panel["id"] not in ids
            ids.add(panel["id"])


def test_rows_nest_panels_when_collapsed():
    health = DASHBOARDS["exporter-health.json"]
    collapsed = [p for p in health["panels"] if p["type"] == "row" and p["collapsed"]]
    assert collapsed and all(row["panels"] for row in collapsed)
    nested = {p["title"] for row in collapsed for p in row["panels"]}
    assert nested <= {p["title"] for p in iter_panels(health)}
    assert [title for title, _ in iter_rows(health)] == [
        p["title"] for p in health["panels"] if p["type"] == "row"]


# --- the real check: every query against a real Prometheus --------------------------------------

GIB = 2**30


@dataclass
class FakeGpuServer:
    collector: Any
    fake: Any
    server: Any
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.collector.stop()
        self.server.shutdown()
        self.server.server_close()


def serve_fake_gpu(pcie_throughput: bool = True) -> FakeGpuServer:
    """The real GPU collector over a fake NVML (an H200's recording) in its own registry on a
    port of its own: this process plays the engine (3 GiB), another pid plays a foreign process
    (1 GiB); one XID 79 is emitted once the watcher runs."""
    from testsupport import fake_pynvml
    from prometheus_client import CollectorRegistry, start_http_server

    from exporter.gpu import GpuCollector, GpuConfig

    fake = fake_pynvml.FakeNvml(fake_pynvml.load_recording())
    fake.set_processes(0, [(os.getpid(), 3 * GIB), (2**22 + 1, 1 * GIB)])
    config = GpuConfig(interval_seconds=0.5, slow_interval_seconds=1.0,
                       pcie_throughput=pcie_throughput, xid_events=True, event_wait_ms=50)
    collector = GpuCollector(config, root_pid=os.getpid(), nvml=fake)
    collector.set_memory_budget_ratio(0.9)
    registry = CollectorRegistry()
    registry.register(collector)
    server, _thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    port = server.server_address[1]
    collector.start()
    wait_for(lambda: any(not s.freed for s in fake.event_sets), 10, 0.05, "the XID watcher")
    fake.emit_xid(0, 79)
    return FakeGpuServer(collector, fake, server, port)


@pytest.fixture(scope="module")
def live(daemon, tmp_path_factory):
    """Prometheus (1 s scrapes) over the daemon and the fake-NVML GPU collector, under load."""
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    tmp = tmp_path_factory.mktemp("dashboards")
    # A rule that always fires, so that the ALERTS panels have a real series to show.
    rules = tmp / "always-firing.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard-test", "rules": [{
        "alert": "VllmDashboardTestAlwaysFiring", "expr": "vllm_engine_up == 1",
        "labels": {"severity": "info"}}]}]}))
    gpu = serve_fake_gpu()
    daemon_target = f"127.0.0.1:{daemon.metrics_port}"
    prom = start_prometheus(tmp / "prometheus", JOB, [daemon_target, gpu.target], [rules])
    load = Load(daemon.api_url, daemon.model).start()
    drawing = bool(os.environ.get("DASHBOARD_PNG_DIR"))
    variables = {
        "__rate_interval": RATE_INTERVAL, "__range": "5m", "job": JOB,
        "instance": "|".join(escape_regex(t) for t in (daemon_target, gpu.target)),
        "model": escape_regex(daemon.model), "gpu": "0",
        "slo_target": "0.99", "error_target": "0.999",
    }
    try:
        wait_for(lambda: set(prom.targets_up().values()) == {"up"}, 30, 0.5, "targets up")
        wait_for(lambda: prom.query(f'count(up{{job="{JOB}"}} == 1) == 2'), 30, 0.5,
                 "first scrapes")
        started = time.time()
        if drawing:  # a longer history to draw, with events on the fake GPU along the way:
            time.sleep(20)  # the pictures' timeline, not a wait for a condition
        gpu.fake.emit_xid(0, 79)
        gpu.fake.set_value(0, "nvmlDeviceGetCurrentClocksEventReasons", 0x4)  # sw_power_cap
        if drawing:
            time.sleep(40)  # the rest of the pictures' timeline
        wait_for_rate_windows(prom)
        throttled = substitute(_panel("gpu.json", "Throttle reasons")["targets"][0]["expr"],
                               variables) + " == 1"
        wait_for(lambda: "sw_power_cap" in {s["metric"].get("reason")
                                            for s in prom.query(throttled)},
                 30, 0.5, "the throttle reason set on the fake GPU to show in Prometheus")
        # Aborts for certain (the load's own depend on timing): clients that give up while the
        # engine core is paused.
        async def give_up() -> list[str]:
            client = openai.AsyncOpenAI(base_url=daemon.api_url + "/v1", api_key="unused",
                                        max_retries=0)
            return await asyncio.gather(*[abandoned_request(client, daemon.model, "never mind",
                                                            timeout=1.0, max_tokens=8)
                                          for _ in range(2)])

        with engine_paused(daemon.process.pid):
            assert asyncio.run(give_up()) == ["abandoned"] * 2
        load.aborted += 2  # the load's own give-ups may all finish first on a warm engine
        wait_for(lambda: prom.query(f'sum(increase(vllm_requests_aborted_total{{job="{JOB}"}}'
                                    f'[{RATE_INTERVAL}])) > 0'), 60, 1,
                 "this load's aborts to show in Prometheus")
        daemon_alerts = yaml.safe_load(daemon.config_path.read_text()).get("alerts") or {}
        urls = (daemon_alerts.get("alertmanager") or {}).get("urls")
        yield Live(prom, variables, started, load, bool(urls))
    finally:
        load.stop()
        prom.stop()
        gpu.stop()


@pytest.mark.engine
def test_every_panel_query_is_valid_and_returns_data(live):
    prom, variables = live.prom, live.variables
    may_be_empty = set() if live.has_alertmanager else NEEDS_ALERTMANAGER
    # Features the shared daemon's engine does not switch on (speculative decoding, vLLM's
    # opt-in statistics): tests/test_spec_decode_e2e.py runs these panels where they have data.
    may_be_empty = set(may_be_empty) | conditional_samples()
    problems, count = query_problems(
        prom, ((f"{file_name} / {panel['title']}", target)
               for file_name, panel, target in all_targets()), variables, may_be_empty)
    assert not problems, "\n".join(problems)
    assert count == sum(1 for _ in all_targets())
    assert not live.load.errors, live.load.errors[:3]

    if os.environ.get("DASHBOARD_PNG_DIR"):
        from testsupport.dashboard_png import render_all

        paths = render_all(prom.url, Path(os.environ["DASHBOARD_PNG_DIR"]), variables,
                           live.started, time.time(), step=1,
                           note="real daemon (CPU engine, random-weight default model) under "
                                "test load; GPU panels: fake NVML replaying an H200")
        assert all(p.stat().st_size > 10_000 for p in paths)


@pytest.mark.engine
def test_template_variable_queries_return_the_live_values(live):
    prom, variables = live.prom, live.variables
    expected = {"job": JOB, "instance": None, "model": "vllm-exporter-default", "gpu": "0"}
    for file_name, dashboard in DASHBOARDS.items():
        for var, query in variable_queries(dashboard):
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert match, query
            selector = substitute(match.group(1), variables)
            if "{" not in selector:
                selector += "{}"
            values = prom.api(f"label/{match.group(2)}/values", **{"match[]": selector})
            assert values, f"{file_name} ${var}: {query} is empty"
            if expected[var]:
                assert expected[var] in values, (file_name, var, values)


@pytest.mark.engine
def test_alert_panels_show_prometheus_and_daemon_alert_state(live):
    prom, variables = live.prom, live.variables
    firing = prom.query('ALERTS{alertstate="firing", alertname="VllmDashboardTestAlwaysFiring"}')
    assert firing, "the always-firing test rule should show in ALERTS"
    states = prom.query(substitute(
        'vllm_exporter_alert_rule_state{job=~"$job", instance=~"$instance"}', variables))
    assert {s["metric"]["alertname"] for s in states} >= {"VllmEngineDown", "VllmEngineStalled"}


def _panel(file_name: str, title: str) -> dict:
    return next(p for p in iter_panels(DASHBOARDS[file_name]) if p["title"] == title)


def _values(prom, variables, file_name: str, title: str, target: int = 0) -> list[float]:
    """The panel query's values now. A scrape this test process answers (the fake GPU) can
    miss its 1 s deadline while the process is busy with the load, which makes the series
    stale for a moment: an empty result is asked again, for up to 15 s."""
    expr = substitute(_panel(file_name, title)["targets"][target]["expr"], variables)
    result = wait_for(lambda: prom.query(expr), 15, 0.5, f"{file_name} / {title}: {expr}")
    return [float(item["value"][1]) for item in result]


@pytest.mark.engine
def test_panels_show_what_the_load_and_the_fake_gpu_did(live):
    prom, v, load = live.prom, live.variables, live.load
    assert load.finished > 20 and load.aborted > 0
    assert _values(prom, v, "overview.json", "Request rate")[0] > 0.5
    assert _values(prom, v, "engine.json", "Prefix-cache hit ratio")[0] > 0
    # Aborts come now and then (every 7th request of each worker gives up after 0.3 s): the
    # panel's line shows them somewhere in the load's window, or soon after.
    aborted = substitute(_panel("engine.json", "Aborted at the API")["targets"][0]["expr"], v)

    def abort_rate_shown() -> bool:
        window = prom.query_range(aborted, live.started, time.time(), step=1)
        return max((float(value) for series in window for _, value in series["values"]),
                   default=0) > 0

    wait_for(abort_rate_shown, 90, 1, f"the aborts the load made ({load.aborted}) in {aborted}")
    gib = 2**30
    memory = "GPU memory: engine vs others vs budget"
    assert _values(prom, v, "gpu.json", memory, 0) == [3 * gib]  # this process: the engine
    assert _values(prom, v, "gpu.json", memory, 1) == [1 * gib]  # the other pid
    total = _values(prom, v, "gpu.json", memory, 3)[0]
    # The budget is vLLM's: the ratio of the card less what the driver reserves.
    reserved = float(prom.query(f'vllm_gpu_memory_reserved_bytes{{job="{JOB}"}}')[0]["value"][1])
    assert 0 < reserved < total
    assert _values(prom, v, "gpu.json", memory, 2)[0] == pytest.approx(0.9 * (total - reserved))
    throttled = prom.query(substitute(_panel("gpu.json", "Throttle reasons")["targets"][0]
                                      ["expr"], v) + " == 1")
    assert [s["metric"]["reason"] for s in throttled] == ["sw_power_cap"]
