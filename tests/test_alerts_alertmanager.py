"""The Alertmanager client against a real `prometheus-alertmanager` and a webhook receiver."""

from __future__ import annotations

import base64
import socket
import time
from datetime import datetime, timedelta, timezone

import pytest

from exporter.alerts.alertmanager import AlertmanagerClient, SendCounters
from exporter.alerts.config import AlertmanagerConfig
from testsupport.markers import needs_alertmanager
from testsupport.net import free_port
from testsupport.prometheus import make_alertmanager
from testsupport.waiting import wait_for
from testsupport.webhook import WebhookReceiver


def _alert(name: str, resolved: bool = False, **labels) -> dict:
    now = datetime.now(timezone.utc)
    start = now - timedelta(minutes=1)
    end = now if resolved else now + timedelta(minutes=5)
    return {"labels": {"alertname": name, "severity": "warning", **labels},
            "annotations": {"summary": f"{name} test"},
            "startsAt": start.isoformat(), "endsAt": end.isoformat(),
            "generatorURL": "http://127.0.0.1:9410/alerts"}


class Counts:
    def __init__(self):
        self.sent = self.failed = self.dropped = 0

    def counters(self) -> SendCounters:
        def add(attr):
            return lambda url, n: setattr(self, attr, getattr(self, attr) + n)
        return SendCounters(add("sent"), add("failed"), add("dropped"))


def _client(urls, counts: Counts, **kw) -> AlertmanagerClient:
    config = AlertmanagerConfig(urls=urls, retry_initial_seconds=0.1, retry_max_seconds=0.5,
                                timeout_seconds=2, **kw)
    client = AlertmanagerClient(config, counts.counters())
    client.start()
    return client


@needs_alertmanager
def test_firing_and_resolution_reach_the_webhook(tmp_path, webhook):
    am = make_alertmanager(tmp_path / "am", webhook.url).start()
    counts = Counts()
    client = _client([am.url], counts)
    try:
        client.enqueue([_alert("ClientFiring", model="m")])
        firing = webhook.wait("ClientFiring", "firing")
        assert firing[0]["labels"]["model"] == "m"
        assert firing[0]["generatorURL"] == "http://127.0.0.1:9410/alerts"
        client.enqueue([_alert("ClientFiring", resolved=True, model="m")])
        webhook.wait("ClientFiring", "resolved")
        assert counts.sent == 2 and counts.failed == 0 and counts.dropped == 0
    finally:
        client.stop()
        am.stop()


@needs_alertmanager
def test_alertmanager_down_during_firing_then_started(tmp_path, webhook):
    port = free_port()
    am = make_alertmanager(tmp_path / "am", webhook.url, port=port)
    counts = Counts()
    client = _client([am.url], counts)
    try:
        client.enqueue([_alert("WhileDown")])
        wait_for(lambda: counts.failed >= 2, 10, what="failed attempts while down")
        assert client.queue_length(am.url) == 1  # kept for later
        am.start()
        webhook.wait("WhileDown", "firing")
        wait_for(lambda: client.queue_length(am.url) == 0, 5, what="queue drained")
        assert counts.sent == 1 and counts.dropped == 0
    finally:
        client.stop()
        am.stop()


@needs_alertmanager
def test_queue_never_exceeds_its_bound_and_newest_survive(tmp_path, webhook):
    port = free_port()
    am = make_alertmanager(tmp_path / "am", webhook.url, port=port)
    counts = Counts()
    client = _client([am.url], counts, queue_size=10)
    try:
        for i in range(50):
            client.enqueue([_alert("Bounded", series=str(i))])
            assert client.queue_length(am.url) <= 10
        # a newer state of a queued alert replaces it instead of taking another slot
        newer = _alert("Bounded", series="49")
        newer["annotations"]["summary"] = "newer"
        client.enqueue([newer])
        assert client.queues[am.url].max_seen == 10
        assert counts.dropped == 40
        am.start()
        wait_for(lambda: len({a["labels"]["series"] for a in webhook.alerts("Bounded")}) == 10,
                 30, what="the 10 newest alerts at the webhook")
        delivered = {a["labels"]["series"]: a for a in webhook.alerts("Bounded")}
        assert set(delivered) == {str(i) for i in range(40, 50)}
        assert delivered["49"]["annotations"]["summary"] == "newer"
    finally:
        client.stop()
        am.stop()


@needs_alertmanager
def test_every_alertmanager_gets_every_alert(tmp_path, webhook):
    first = make_alertmanager(tmp_path / "am1", webhook.url).start()
    second = make_alertmanager(tmp_path / "am2", webhook.url).start()
    counts = Counts()
    client = _client([first.url, second.url], counts)
    try:
        client.enqueue([_alert("Twice")])
        wait_for(lambda: counts.sent == 2, 10, what="both Alertmanagers sent to")
    finally:
        client.stop()
        first.stop()
        second.stop()


@pytest.mark.parametrize("auth", ["basic", "bearer"])
def test_auth_headers_are_sent(tmp_path, auth):
    server = WebhookReceiver()  # a stand-in Alertmanager: records what the client sends
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    kw = ({"basic_auth_username": "alice", "basic_auth_password_file": str(secret)}
          if auth == "basic" else {"bearer_token_file": str(secret)})
    client = _client([server.url], Counts(), **kw)
    try:
        client.enqueue([_alert("Auth")])
        wait_for(lambda: server.payloads, 5, what="a request")
        headers, body = server.headers[0], server.payloads[0]
        expected = ("Basic " + base64.b64encode(b"alice:s3cret").decode() if auth == "basic"
                    else "Bearer s3cret")
        assert headers["Authorization"] == expected
        assert isinstance(body, list) and body[0]["labels"]["alertname"] == "Auth"
    finally:
        client.stop()
        server.close()


def test_a_rejected_payload_is_dropped_not_retried_forever():
    server = WebhookReceiver(status=400)
    counts = Counts()
    client = _client([server.url], counts)
    try:
        client.enqueue([_alert("Rejected")])
        wait_for(lambda: counts.dropped == 1, 5, what="the rejected alert dropped")
        time.sleep(0.5)  # what is under test: no retry of the rejected payload in this time
        assert len(server.payloads) == 1 and client.queue_length(server.url) == 0
    finally:
        client.stop()
        server.close()


@needs_alertmanager
def test_daemon_service_alert_survives_alertmanager_down_then_resolves(tmp_path, webhook):
    """The whole in-daemon path without an engine: our registry -> evaluator -> client ->
    a real Alertmanager that starts only after the alert fired -> webhook; then resolution."""
    from types import SimpleNamespace


    from exporter.alerts.rules import parse_rules
    from exporter.alerts.service import AlertingService
    from exporter.config import load_config
    from exporter.runtime import Runtime
    from exporter.slo import SloConfig

    am = make_alertmanager(tmp_path / "am", webhook.url, port=free_port())
    config = load_config(None)
    config.alerts.evaluation_interval_seconds = 0.2
    config.alerts.alertmanager = AlertmanagerConfig(urls=[am.url], retry_initial_seconds=0.1,
                                                    retry_max_seconds=0.5,
                                                    resend_interval_seconds=1)
    rule = {"alert": "ServiceWaiting", "kind": "threshold",
            "signal": {"gauge": "vllm_requests_waiting"}, "above": 3, "for": "0s",
            "severity": "warning",
            "annotations": {"summary": "{{ $value }} waiting", "description": "d",
                            "runbook_url": "http://x/#w"}}
    # A runtime with its own front end: the rule reads what a front end wrote to its shard.
    rt = Runtime(config, mode="daemon")
    rt.server = SimpleNamespace(port=9410, add_route=lambda *a: None,
                                add_renderer=lambda *a: None)
    registry, metrics = rt.registry, rt.metrics

    service = AlertingService(config, parse_rules({"rules": [rule]}, SloConfig(), "t"))
    service.start(rt.registry, rt.alert_hooks())
    try:
        metrics.requests_waiting.labels("m", "0").set(7)
        wait_for(lambda: (registry.get_sample_value(
            "vllm_exporter_alert_notifications_failed_total", {"alertmanager": am.url}) or 0) >= 1,
            10, what="sends failing while Alertmanager is down")
        am.start()
        firing = webhook.wait("ServiceWaiting", "firing")
        assert firing[0]["annotations"]["summary"] == "7 waiting"
        assert firing[0]["generatorURL"] == "http://127.0.0.1:9410/alerts"
        metrics.requests_waiting.labels("m", "0").set(0)
        webhook.wait("ServiceWaiting", "resolved")
        assert registry.get_sample_value("vllm_exporter_alert_notifications_dropped_total",
                                         {"alertmanager": am.url}) == 0
        assert registry.get_sample_value("vllm_exporter_alert_queue_length",
                                         {"alertmanager": am.url}) <= 1
    finally:
        service.stop()
        rt.server = None  # a stand-in, nothing to stop
        rt.stop()
        am.stop()


@needs_alertmanager
def test_engine_death_is_evaluated_at_once_and_its_delivery_awaited(tmp_path, webhook):
    """What the daemon does before exiting after an engine death, without the engine: the
    runtime's death hook makes the service evaluate at once (not at its next 60 s tick), and
    deliver_now() waits, within its bound, until Alertmanager has the VllmEngineDied alert."""
    from exporter.alerts.service import AlertingService, load_rules
    from exporter.config import load_config
    from exporter.runtime import Runtime

    am = make_alertmanager(tmp_path / "am", webhook.url, port=free_port())
    config = load_config(None, {"gpu.enabled": False})
    config.alerts.evaluation_interval_seconds = 60
    config.alerts.alertmanager = AlertmanagerConfig(urls=[am.url], retry_initial_seconds=0.1,
                                                    retry_max_seconds=0.5, timeout_seconds=1)
    rt = Runtime(config, mode="daemon")
    rt.model = "m"
    rt.set_engine_serving()
    service = AlertingService(config, load_rules(config))
    service.start(rt.registry, rt.alert_hooks())
    try:
        wait_for(lambda: service.evaluator.last_eval is not None, 10,
                 what="the first tick, at start")
        assert service.evaluator.firing() == []
        died_at = time.monotonic()
        rt.mark_engine_dead()
        # Alertmanager is down: the wait gives up at its bound and says so.
        assert service.deliver_now(1.0) is False
        assert time.monotonic() - died_at < 5
        assert [a.labels["alertname"] for a in service.evaluator.firing()] == ["VllmEngineDied"]
        am.start()
        assert service.deliver_now(20.0) is True
        died = webhook.wait("VllmEngineDied")
        # instance: the replica's own label (alerts.instance; default host name:metrics port)
        assert died[0]["labels"] == {"alertname": "VllmEngineDied", "model": "m",
                                     "severity": "critical",
                                     "instance": f"{socket.gethostname()}:{config.metrics.port}"}
        assert time.monotonic() - died_at < 40  # long before the next regular tick
    finally:
        service.stop()
        am.stop()
        rt.stop()


# --- replica identity (issue 17) ----------------------------------------------------------------

def test_replica_labels_go_under_the_alerts_own(webhook):
    """Every alert leaves with instance and the external labels; a label the alert already has
    wins (as Prometheus adds its external_labels)."""
    config = AlertmanagerConfig(urls=[webhook.url], retry_initial_seconds=0.1)
    client = AlertmanagerClient(config, Counts().counters(),
                                replica_labels={"instance": "gpu-7:9410", "cluster": "eu",
                                                "team": "default"})
    client.start()
    try:
        client.enqueue([_alert("Replica", model="m", team="inference")])
        got = wait_for(lambda: [a for p in webhook.payloads for a in p], 10,
                       what="the alert at the webhook")
        assert got[0]["labels"] == {"alertname": "Replica", "severity": "warning", "model": "m",
                                    "team": "inference", "instance": "gpu-7:9410",
                                    "cluster": "eu"}
    finally:
        client.stop()


def test_two_replicas_of_one_rule_stay_two_alerts_in_the_queue():
    config = AlertmanagerConfig(urls=["http://127.0.0.1:9"])
    queues = []
    for instance in ("a:9410", "b:9410"):
        client = AlertmanagerClient(config, replica_labels={"instance": instance})
        client.enqueue([_alert("Same", model="m")])
        queues.append(client.queues["http://127.0.0.1:9"].peek(1)[0][1]["labels"]["instance"])
    assert queues == ["a:9410", "b:9410"]


def test_replica_labels_default_to_host_name_and_port_and_expand_the_environment(monkeypatch):
    from exporter.alerts.config import AlertsConfig

    monkeypatch.setenv("POD_NAMESPACE", "serving")
    config = AlertsConfig(external_labels={"namespace": "${POD_NAMESPACE}", "job": "vllm"})
    assert not config.problems()
    assert config.replica_labels(9410) == {"namespace": "serving", "job": "vllm",
                                           "instance": f"{socket.gethostname()}:9410"}
    assert config.exported_labels() == {"job": "vllm"}  # per-replica values are not exported
    config.instance = "${POD_NAMESPACE}-0:9410"
    assert config.replica_labels(1)["instance"] == "serving-0:9410"


@pytest.mark.parametrize("alerts, field, problem", [
    ({"external_labels": {"instance": "x"}}, "alerts.external_labels.instance",
     "reserved: set it with alerts.instance"),
    ({"external_labels": {"alertname": "x"}}, "alerts.external_labels.alertname", "reserved"),
    ({"external_labels": {"severity": "x"}}, "alerts.external_labels.severity", "reserved"),
    ({"external_labels": {"__name__": "x"}}, "alerts.external_labels.__name__",
     "not a valid label name"),
    ({"external_labels": {"my-label": "x"}}, "alerts.external_labels.my-label",
     "not a valid label name"),
    ({"external_labels": {"cluster": ""}}, "alerts.external_labels.cluster", "must not be empty"),
    ({"external_labels": {"pod": "${VLLM_EXPORTER_TEST_UNSET}"}}, "alerts.external_labels.pod",
     "environment variable VLLM_EXPORTER_TEST_UNSET is not set"),
    ({"external_labels": {"pod": "$HOSTNAME"}}, "alerts.external_labels.pod", "${VAR}"),
    ({"external_labels": {"cluster": 3}}, "alerts.external_labels.cluster", "must be a string"),
    ({"instance": ""}, "alerts.instance", "must not be empty"),
])
def test_bad_replica_labels_are_refused_naming_the_field(tmp_path, alerts, field, problem):
    import yaml

    from exporter.config import ConfigError, load_config

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"alerts": alerts}))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert field in str(caught.value) and problem in str(caught.value), str(caught.value)


def test_exported_alerting_rules_carry_the_constant_external_labels(tmp_path, monkeypatch):
    import yaml

    from exporter.alerts.cli import export_text
    from exporter.config import load_config

    monkeypatch.setenv("POD_NAME", "vllm-0")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"alerts": {"external_labels": {
        "cluster": "eu", "job": "vllm-exporter", "pod": "${POD_NAME}"}}}))
    doc = yaml.safe_load(export_text(load_config(path), "prometheus"))
    alerting = [r for g in doc["groups"] for r in g["rules"] if "alert" in r]
    assert alerting and all(r["labels"]["cluster"] == "eu" and r["labels"]["job"] ==
                            "vllm-exporter" and "pod" not in r["labels"] for r in alerting)
    recording = [r for g in doc["groups"] for r in g["rules"] if "record" in r]
    assert recording and all("labels" not in r or set(r["labels"]) == {"objective"}
                             for r in recording)


def test_rules_export_needs_only_the_file_not_the_serving_host(tmp_path, capsys, monkeypatch):
    """`rules export` runs where the rules are built (CI), not where the daemon serves: an
    environment variable of a ${VAR} label, the model directory and the web config file are
    the serving host's, and only check-config and serve refuse them missing."""
    import yaml

    from exporter.cli import main

    monkeypatch.delenv("VLLM_EXPORTER_TEST_UNSET", raising=False)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "engine": {"model": "/srv/models/absent"},
        "metrics": {"web_config_file": "/etc/vllm-exporter/absent-web.yml"},
        "alerts": {"external_labels": {"cluster": "eu",
                                       "pod": "${VLLM_EXPORTER_TEST_UNSET}"}}}))
    assert main(["rules", "export", "--config", str(path)]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    alerting = [r for g in doc["groups"] for r in g["rules"] if "alert" in r]
    assert alerting and all(r["labels"]["cluster"] == "eu" and "pod" not in r["labels"]
                            for r in alerting)
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "engine.model" in err and "does not exist" in err
    path.write_text(yaml.safe_dump({"alerts": {"external_labels": {
        "pod": "${VLLM_EXPORTER_TEST_UNSET}"}}}))
    assert main(["check-config", "--config", str(path)]) == 2
    assert "VLLM_EXPORTER_TEST_UNSET is not set" in capsys.readouterr().err
    # a mistake in the file itself still stops the export
    path.write_text(yaml.safe_dump({"alerts": {"external_labels": {"pod": "$HOSTNAME"}}}))
    assert main(["rules", "export", "--config", str(path)]) == 2
