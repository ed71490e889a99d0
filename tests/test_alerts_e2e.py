"""End to end on the shared daemon (real engine): a real degradation fires the e2e rule
through both paths, then resolves.

(a) in-daemon: the daemon's evaluator -> the session Alertmanager -> the webhook;
(b) Prometheus: a real Prometheus scraping the daemon with the same rules exported as PromQL
    -> the same Alertmanager -> the webhook (its alerts carry job/instance).
Both paths run on one saturation of the engine (far more concurrent long requests than
max_num_seqs: requests queue, the median queue time over 15 s rises past 0.25 s); the
detection latencies are printed (bench figures).
"""

from __future__ import annotations

import json
import socket

import pytest

from testsupport.alert_detection import measure_detection
from testsupport.alerting import E2E_ALERT
from testsupport.markers import needs_alertmanager, needs_prometheus
from testsupport.net import http_get
from testsupport.waiting import wait_for

pytestmark = [pytest.mark.engine, needs_alertmanager, needs_prometheus]


def _rule_state(daemon) -> float:
    states = [value for labels, value in daemon.scrape().series("vllm_exporter_alert_rule_state")
              if labels["alertname"] == E2E_ALERT]
    assert states, "the daemon does not evaluate the e2e rule (conftest's alerts section?)"
    return states[0]


def test_saturation_fires_in_daemon_and_in_prometheus_then_resolves(daemon, alerting, tmp_path):
    wait_for(lambda: _rule_state(daemon) == 0, 60, what="the e2e rule inactive before the load")
    result = measure_detection(daemon, alerting, tmp_path)
    print(f"\ndetection: {json.dumps(result)}")
    assert result["load_errors"] == 0

    webhook = alerting.webhook
    daemon_alerts = [a for a in webhook.alerts(E2E_ALERT, "firing") if "job" not in a["labels"]]
    prom_alerts = [a for a in webhook.alerts(E2E_ALERT, "firing") if "job" in a["labels"]]
    ours = daemon_alerts[-1]
    # instance: the replica's identity, <host name>:<metrics port> by default (docs/alerts.md)
    assert ours["labels"] == {"alertname": E2E_ALERT, "model": daemon.model, "engine": "0",
                              "test": "e2e", "severity": "info",
                              "instance": f"{socket.gethostname()}:{daemon.metrics_port}"}
    assert ours["annotations"]["summary"].startswith("median queue time ")
    assert ours["annotations"]["summary"].endswith(f"s on {daemon.model}")
    assert ours["generatorURL"] == f"http://127.0.0.1:{daemon.metrics_port}/alerts"
    # the same alert from Prometheus: same labels plus the scrape target's
    theirs = prom_alerts[-1]
    assert {k: v for k, v in theirs["labels"].items() if k not in ("job", "instance")} == \
        {k: v for k, v in ours["labels"].items() if k != "instance"}
    # resolution once the 15 s window no longer holds queued requests
    assert 0 <= result["daemon_resolved_s"] < 40

    samples = daemon.scrape()
    am = alerting.alertmanager.url
    assert samples.get("vllm_exporter_alert_notifications_sent_total", alertmanager=am) >= 2
    assert samples.get("vllm_exporter_alert_notifications_dropped_total", alertmanager=am) == 0
    assert samples.get("vllm_exporter_errors_total", component="alerts") == 0
    assert samples.get("vllm_exporter_alert_evaluation_failures_total") == 0
    wait_for(lambda: _rule_state(daemon) == 0, 30, what="the e2e rule inactive after the load")


def test_alerts_endpoint_lists_every_rule(daemon):
    status, body, headers = http_get(f"http://127.0.0.1:{daemon.metrics_port}/alerts")
    assert status == 200 and headers["Content-Type"] == "application/json"
    doc = json.loads(body)
    names = {rule["alert"] for rule in doc["rules"]}
    assert {E2E_ALERT, "VllmHighTimeToFirstToken", "VllmEngineStalled"} <= names
    assert all(rule["last_error"] is None for rule in doc["rules"]), doc["rules"]
    assert doc["last_evaluation"] is not None
    assert doc["alertmanagers"][0]["queue_length"] == 0


def test_no_default_rule_fires_on_a_healthy_daemon(daemon):
    samples = daemon.scrape()
    firing = [labels["alertname"] for labels, value in
              samples.series("vllm_exporter_alert_rule_state")
              if value == 2 and labels["alertname"] != E2E_ALERT]
    assert firing == []
