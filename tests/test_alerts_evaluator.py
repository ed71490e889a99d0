"""The evaluator's pieces: Prometheus maths, history tiers, templates, alert states,
notification timing, and the service thread on a real registry."""

from __future__ import annotations

import json
import math

import pytest

from exporter.alerts.evaluator import FIRING, INACTIVE, PENDING, Evaluator
from exporter.alerts.history import History
from exporter.alerts.promfuncs import extrapolated_rate, humanize_duration
from exporter.quantile import histogram_quantile
from exporter.alerts.rules import parse_rules
from exporter.alerts.service import AlertingService
from exporter.alerts.templates import go_float, render
from exporter.config import load_config
from exporter.runtime import Runtime
from testsupport.waiting import wait_for
from exporter.slo import SloConfig


# --- maths -----------------------------------------------------------------------------------

def test_rate_extrapolates_to_the_window_edges():
    # a gap to the window start within 1.1 x the sample spacing: extrapolated all the way
    ts = [15_000, 30_000, 45_000, 60_000]
    assert extrapolated_rate(ts, [110, 120, 130, 140], 0, 60_000, False) == pytest.approx(40)
    # a longer gap: extrapolated by half a sample spacing only
    ts = [30_000, 45_000, 60_000]
    assert extrapolated_rate(ts, [100, 110, 120], 0, 60_000, False) == pytest.approx(
        20 * (30 + 7.5) / 30)
    assert extrapolated_rate(ts, [100, 110, 120], 0, 60_000, True) == pytest.approx(
        20 * (30 + 7.5) / 30 / 60)


def test_rate_does_not_extrapolate_below_zero():
    # a counter that started at 0 just before the first sample: extrapolate only to zero
    ts = [30_000, 45_000, 60_000]
    value = extrapolated_rate(ts, [1, 11, 21], 0, 60_000, is_rate=False)
    assert value == pytest.approx(20 * (30 + 1.5) / 30)


def test_rate_counts_resets():
    ts = [0, 15_000, 30_000, 45_000, 60_000]
    # 100 -> 110, reset to 5 (i.e. +5 after the restart), -> 25
    assert extrapolated_rate(ts, [100, 110, 5, 15, 25], 0, 60_000, False) == pytest.approx(35)
    assert extrapolated_rate([0], [1], 0, 60_000, True) is None


def test_histogram_quantile_interpolates_inside_the_bucket():
    buckets = [(0.1, 10), (0.5, 60), (1.0, 100), (math.inf, 100)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * (50 - 10) / 50)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.5 + 0.5 * (99 - 60) / 40)
    # rank in the +Inf bucket: the highest finite bound
    assert histogram_quantile(0.9, [(1.0, 5), (math.inf, 10)]) == 1.0
    assert math.isnan(histogram_quantile(0.5, [(1.0, 0), (math.inf, 0)]))
    assert math.isnan(histogram_quantile(0.5, [(1.0, 5)]))  # no +Inf bucket


def test_histogram_quantile_edge_cases_as_prometheus():
    buckets = [(0.1, 10), (0.5, 60), (1.0, 100), (math.inf, 100)]
    assert histogram_quantile(-0.1, buckets) == -math.inf
    assert histogram_quantile(1.1, buckets) == math.inf
    assert math.isnan(histogram_quantile(math.nan, buckets))
    assert math.isnan(histogram_quantile(0.5, [(math.inf, 5)]))  # one bucket only
    assert math.isnan(histogram_quantile(0.5, []))
    # Counts that fall with the bound are raised to the running maximum first.
    assert histogram_quantile(0.5, [(0.1, 10), (0.5, 9), (1.0, 20), (math.inf, 20)]) == \
        pytest.approx(0.1)
    # Same bounds add up (series merged by `le`), in any order.
    assert histogram_quantile(0.5, [(math.inf, 50), (0.5, 30), (0.5, 20), (math.inf, 50)]) == \
        pytest.approx(0.5)
    # A first bucket with a bound <= 0 answers that bound; q = 0 over an empty first bucket NaN.
    assert histogram_quantile(0.1, [(0.0, 5), (1.0, 10), (math.inf, 10)]) == 0.0
    assert math.isnan(histogram_quantile(0.0, [(0.1, 0), (1.0, 5), (math.inf, 5)]))


def test_go_formatting():
    assert go_float(2.0) == "2" and go_float(0.25) == "0.25" and go_float(1e6) == "1e+06"
    assert humanize_duration(0.0042) == "4.2ms"
    assert humanize_duration(3725) == "1h 2m 5s"
    assert render("{{ $labels.model }}: {{ $value | humanizePercentage }} {{ $labels.x }}",
                  {"model": "m"}, 0.5) == "m: 50% <no value>"


# --- history ---------------------------------------------------------------------------------

def test_history_keeps_fine_then_coarse_samples():
    history = History({"c_total"}, step_seconds=1, fine_seconds=60, history_seconds=600,
                      coarse_step_seconds=30)
    for t in range(0, 601):
        history.add(float(t), [("c_total", {"a": "1"}, float(t)), ("ignored", {}, 1.0)])
    fine = history.window("c_total", 590_000, 600_000)
    assert fine[0].count == 11  # every second
    coarse = history.window("c_total", 100_000, 600_000)
    assert 15 <= coarse[0].count <= 18  # one per 30 s
    assert coarse[0].last_value == 600 and coarse[0].correction == 0
    assert history.latest("ignored", 600_000, 300_000) == []
    assert history.series_count() == 1


def test_history_reports_resets_inside_the_window_only():
    history = History({"c_total"}, 1, 600, 600)
    for t, v in enumerate([5, 10, 2, 4, 6, 8]):
        history.add(float(t), [("c_total", {}, float(v))])
    assert history.window("c_total", 0, 5_000)[0].correction == 10
    assert history.window("c_total", 2_000, 5_000)[0].correction == 0


def test_history_staleness_hides_a_vanished_series():
    history = History({"g"}, 1, 600, 600)
    history.add(0, [("g", {}, 5.0)])
    history.add(10, [])
    assert history.latest("g", 5_000, 300_000) == [({}, 5.0)]
    assert history.latest("g", 10_000, 300_000) == []


# --- alert states ----------------------------------------------------------------------------

RULE = {
    "alert": "Waiting", "kind": "threshold", "signal": {"gauge": "vllm_requests_waiting"},
    "above": 3, "for": "20s", "severity": "warning", "labels": {"team": "ml-{{ $labels.model }}"},
    "annotations": {"summary": "{{ $value }} waiting", "description": "on {{ $labels.model }}",
                    "runbook_url": "http://x/#waiting"},
}


def _evaluator(resend=60.0):
    rules = parse_rules({"rules": [RULE]}, SloConfig(), "t")
    history = History({"vllm_requests_waiting"}, 10, 3600, 3600)
    return history, Evaluator(rules, history, interval=10, resend_interval=resend)


def _step(history, evaluator, t, waiting):
    history.add(t, [("vllm_requests_waiting", {"model": "m", "engine": "0"}, waiting)])
    evaluator.evaluate(t)
    state = evaluator.rules[0]
    return state.state(), state


def test_pending_then_firing_then_resolved():
    history, ev = _evaluator()
    assert _step(history, ev, 0, 1)[0] == INACTIVE
    assert _step(history, ev, 10, 5)[0] == PENDING
    assert _step(history, ev, 20, 6)[0] == PENDING
    state, rs = _step(history, ev, 30, 7)
    assert state == FIRING
    alert = next(iter(rs.alerts.values()))
    assert alert.labels == {"model": "m", "engine": "0", "team": "ml-m", "severity": "warning",
                            "alertname": "Waiting"}
    assert alert.annotations["summary"] == "7 waiting"
    assert _step(history, ev, 40, 0)[0] == INACTIVE
    assert next(iter(rs.alerts.values())).resolved_at == 40


def test_pending_that_clears_never_fires():
    history, ev = _evaluator()
    _step(history, ev, 0, 5)
    _step(history, ev, 10, 5)
    state, rs = _step(history, ev, 20, 0)
    assert state == INACTIVE and rs.alerts == {}
    assert ev.due_notifications(20, "http://d/alerts") == []


def test_notifications_firing_resend_and_resolution():
    history, ev = _evaluator(resend=30)
    for t, v in ((0, 5), (10, 5), (20, 5)):
        _step(history, ev, t, v)
    sent = ev.due_notifications(20, "http://d/alerts")
    assert len(sent) == 1 and sent[0]["generatorURL"] == "http://d/alerts"
    assert sent[0]["endsAt"] > sent[0]["startsAt"]
    _step(history, ev, 30, 5)
    assert ev.due_notifications(30, "u") == []  # not yet due again
    _step(history, ev, 50, 5)
    assert len(ev.due_notifications(50, "u")) == 1  # resend interval passed
    _step(history, ev, 60, 0)
    resolved = ev.due_notifications(60, "u")
    assert len(resolved) == 1 and resolved[0]["endsAt"].startswith("1970-01-01T00:01:00")


def test_a_failing_rule_does_not_stop_the_others():
    rules = parse_rules({"rules": [RULE, {**RULE, "alert": "Other"}]}, SloConfig(), "t")
    errors = []

    class Broken:
        def latest(self, *a):
            raise RuntimeError("boom")

        window = latest

    ev = Evaluator(rules, Broken(), 10, on_error=lambda rule, exc: errors.append(rule.alert))
    ev.evaluate(0)
    assert errors == ["Waiting", "Other"]
    assert ev.snapshot()[0]["last_error"] == "RuntimeError: boom"


# --- the service on a real registry ----------------------------------------------------------

class _FakeServer:
    port = 9999

    def __init__(self):
        self.routes = {}
        self.renderers = []

    def add_route(self, path, fn, description):
        self.routes[path] = fn

    def add_renderer(self, collector):
        self.renderers.append(collector)


def test_service_evaluates_our_registry_and_serves_json(tmp_path):
    config = load_config(None)
    config.alerts.evaluation_interval_seconds = 0.05
    rules = parse_rules({"rules": [{**RULE, "for": "0s"}]}, SloConfig(), "t")
    # A runtime with its own front end: the rule reads what a front end wrote to its shard.
    rt = Runtime(config, mode="daemon")
    rt.server = _FakeServer()
    registry, metrics = rt.registry, rt.metrics

    service = AlertingService(config, rules)
    service.start(rt.registry, rt.alert_hooks())
    try:
        metrics.requests_waiting.labels("m", "0").set(9)
        wait_for(lambda: registry.get_sample_value(
            "vllm_exporter_alert_rule_state", {"alertname": "Waiting", "severity": "warning"}) == 2,
            5, what="the Waiting rule to fire")
        assert registry.get_sample_value("vllm_exporter_alerts",
                                         {"alertname": "Waiting", "state": "firing"}) == 1
        # The metrics port renders the states from the text published at the tick.
        text = "".join(r.render(False) for r in rt.server.renderers)
        assert 'vllm_exporter_alerts{alertname="Waiting",state="firing"} 1.0\n' in text
        status, ctype, body = rt.server.routes["/alerts"]()
        doc = json.loads(body)
        assert status == 200 and ctype == "application/json"
        assert doc["rules"][0]["state"] == "firing"
        assert doc["rules"][0]["alerts"][0]["annotations"]["summary"] == "9 waiting"
        assert registry.get_sample_value("vllm_exporter_alert_evaluations_total") > 0
    finally:
        service.stop()
        rt.server = None  # a stand-in, nothing to stop
        rt.stop()
    assert not service._thread.is_alive()
