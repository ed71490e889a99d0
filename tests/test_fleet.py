"""A fleet of two real daemons (issue 17): one Prometheus scrapes both and loads the exported
rules, one Alertmanager receives the alerts of both paths (each daemon, and Prometheus).

- the same rule firing on both replicas is two alerts in Alertmanager, each naming its replica,
  and the daemon's and Prometheus' copies of each are one (their label sets are identical);
- every fleet recording rule equals what the replicas' own series give, combined by hand
  (sums, ratios of sums, quantiles of summed buckets, mean and max);
- every query of the fleet dashboard returns data.

Those three are engine tests (one module-scoped pair of daemons); the rest check the fleet
rules' shape without an engine.

Two engines on two cores: each gets its own core (VLLM_CPU_OMP_THREADS_BIND, docs/topologies.md
"CPU pinning") and they start one after the other.
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
from pathlib import Path

import pytest
import yaml

from exporter.alerts.cli import export_text
from exporter.alerts.fleet import (LATENCY_HISTOGRAMS, QUANTILES, alerting_rules, fleet_group,
                                   recording_rules)
from exporter.config import load_config
from exporter.dashboards import generate
from exporter.dashboards.inspect import iter_panels
from exporter.quantile import histogram_quantile
from exporter.slo import SloConfig
from testsupport.daemon import daemon_config, daemon_env, start_daemon
from testsupport.dashboards import escape_regex
from testsupport.load import Load
from testsupport.markers import needs_promtool
from testsupport.net import free_port, http_get
from testsupport.prometheus import (ALERTMANAGER, PROMETHEUS, make_alertmanager, make_prometheus,
                                    scrape_job)
from testsupport.waiting import asked_again, wait_for
from testsupport.webhook import WebhookReceiver

ROOT = Path(__file__).resolve().parent.parent
JOB = "vllm-exporter"
CLUSTER = "fleet-test"
RULE = "VllmFleetTestReplicaServing"  # fires on a serving engine: this test's own rule
TEST_RULE = {
    "alert": RULE, "kind": "threshold", "signal": {"gauge": "vllm_engine_up"}, "above": 0,
    "for": "0s", "severity": "info",
    "annotations": {"summary": "{{ $labels.model }} serves",
                    "description": "test rule: fires while the engine serves",
                    "runbook_url": "https://example.invalid/runbook#fleet"},
}
RATE_INTERVAL = "15s"


class Fleet:
    def __init__(self, daemons, prom, alertmanager, webhook, loads):
        self.daemons, self.prom, self.am, self.webhook, self.loads = (
            daemons, prom, alertmanager, webhook, loads)
        self.instances = [f"127.0.0.1:{d.metrics_port}" for d in daemons]

    def am_alerts(self, alertname: str) -> list[dict]:
        query = urllib.parse.urlencode({"filter": f'alertname="{alertname}"'})
        status, body, _ = http_get(f"{self.am.url}/api/v2/alerts?{query}")
        assert status == 200
        return json.loads(body)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    if PROMETHEUS is None or ALERTMANAGER is None:
        pytest.skip("prometheus and prometheus-alertmanager are needed")
    tmp = tmp_path_factory.mktemp("fleet")
    rules_file = tmp / "daemon-rules.yml"
    rules_file.write_text(yaml.safe_dump({"rules": [TEST_RULE]}))
    webhook = WebhookReceiver()
    am = make_alertmanager(tmp / "alertmanager", webhook.url).start()
    daemons, loads, prom = [], [], None
    try:
        for index in range(2):
            metrics_port = free_port()
            alerts = {
                "rules_file": str(rules_file), "evaluation_interval_seconds": 1.0,
                # what Prometheus calls this target, and the labels its alerts get beside it
                "instance": f"127.0.0.1:{metrics_port}",
                "external_labels": {"job": JOB, "cluster": CLUSTER},
                "alertmanager": {"urls": [am.url], "resend_interval_seconds": 2.0,
                                 "retry_initial_seconds": 0.2, "retry_max_seconds": 2.0},
            }
            env = daemon_env()
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(index)  # a core of its own
            daemons.append(start_daemon(tmp, daemon_config(free_port(), metrics_port,
                                                           alerts=alerts),
                                        name=f"replica-{index}", env=env))
        # The rules as Prometheus gets them: exported from a replica's config, so the test
        # rule carries the external labels too; the fleet group follows.
        prom_rules = tmp / "prometheus-rules.yml"
        prom_rules.write_text(export_text(load_config(daemons[0].config_path), "prometheus"))
        targets = [f"127.0.0.1:{d.metrics_port}" for d in daemons]
        prom = make_prometheus(tmp / "prometheus", [scrape_job(JOB, targets)], [prom_rules],
                               alertmanager_url=am.url).start()
        loads = [Load(d.api_url, d.model, concurrency=2, abandons=False).start()
                 for d in daemons]
        wait_for(lambda: prom.query(f'count(up{{job="{JOB}"}} == 1) == 2'), 30, 0.5,
                 "both replicas scraped")
        seconds = int(RATE_INTERVAL.removesuffix("s"))
        wait_for(lambda: prom.query(
            f'min(count_over_time(up{{job="{JOB}"}}[{RATE_INTERVAL}])) >= {seconds} and '
            f'min(sum by (instance) (increase(vllm_requests_finished_total[{RATE_INTERVAL}])))'
            f' > 0'), 90, 0.5, "a rate window of scrapes with finished requests on both")
        yield Fleet(daemons, prom, am, webhook, loads)
    finally:
        for load in loads:
            load.stop()
        if prom is not None:
            prom.stop()
        for daemon in daemons:
            daemon.stop()
        am.stop()
        webhook.close()


# --- alerts ---------------------------------------------------------------------------------------

@pytest.mark.engine
def test_the_same_rule_on_two_replicas_is_two_alerts_that_name_the_replica(fleet):
    key = lambda labels: labels["instance"]  # noqa: E731
    expected = sorted(({"alertname": RULE, "model": d.model, "severity": "info", "job": JOB,
                        "cluster": CLUSTER, "instance": instance}
                       for d, instance in zip(fleet.daemons, fleet.instances)), key=key)
    # Both paths fire: Prometheus' ALERTS, and each daemon's sent notifications.
    wait_for(lambda: len(fleet.prom.query(f'ALERTS{{alertname="{RULE}", '
                                          f'alertstate="firing"}}')) == 2,
             30, 0.5, "the rule firing in Prometheus for both replicas")
    prom_alerts = [{k: v for k, v in s["metric"].items() if k not in ("__name__", "alertstate")}
                   for s in fleet.prom.query(f'ALERTS{{alertname="{RULE}"}}')]
    assert sorted(prom_alerts, key=key) == expected
    for daemon in fleet.daemons:
        wait_for(lambda: daemon.scrape().get("vllm_exporter_alert_notifications_sent_total")
                 > 0, 30, 0.5, "the daemon's own notifications sent")
        state = json.loads(daemon.get("/alerts")[1])
        assert [r["state"] for r in state["rules"]] == ["firing"]
    # Alertmanager holds one alert per replica: the two paths' copies have the same labels.
    wait_for(lambda: len(fleet.am_alerts(RULE)) == 2, 30, 0.5, "two alerts in Alertmanager")
    in_am = [a["labels"] for a in fleet.am_alerts(RULE)]
    assert sorted(in_am, key=key) == expected
    # The receiver is paged once per replica (every label set is a group of its own here).
    def notified() -> dict:
        by_instance = {a["labels"]["instance"]: a["labels"]
                       for a in fleet.webhook.alerts(RULE, "firing")}
        return by_instance if len(by_instance) == 2 else {}
    assert sorted(wait_for(notified, 30, 0.5, "a notification for each replica").values(),
                  key=key) == expected
    # A second look after both paths have re-sent: still two, never four.
    sent = [d.scrape().get("vllm_exporter_alert_notifications_sent_total")
            for d in fleet.daemons]
    wait_for(lambda: all(d.scrape().get("vllm_exporter_alert_notifications_sent_total") > n
                         for d, n in zip(fleet.daemons, sent)), 30, 0.5, "a resend of each")
    assert len(fleet.am_alerts(RULE)) == 2
    assert len({tuple(sorted(a["labels"].items()))
                for a in fleet.webhook.alerts(RULE)}) == 2


# --- recording rules ------------------------------------------------------------------------------

def _vector(prom, expr: str, at: float) -> dict[str, float]:
    """model -> value of an expression that keeps only `model` (and le/objective where asked)."""
    return {json.dumps(s["metric"], sort_keys=True): float(s["value"][1])
            for s in prom.query(expr, at=at)}


def _per_replica(fleet, expr_for, at: float) -> list[dict[str, float]]:
    return [_vector(fleet.prom, expr_for(instance), at) for instance in fleet.instances]


def _add(vectors: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for vector in vectors:
        for key, value in vector.items():
            out[key] = out.get(key, 0.0) + value
    return out


def _without_name(vector: dict[str, float]) -> dict[str, float]:
    out = {}
    for key, value in vector.items():
        labels = json.loads(key)
        labels.pop("__name__", None)
        out[json.dumps(labels, sort_keys=True)] = value
    return out


def _same(got: dict[str, float], want: dict[str, float], what: str) -> None:
    got = {k: v for k, v in got.items() if not math.isnan(v)}
    want = {k: v for k, v in want.items() if not math.isnan(v)}
    assert set(got) == set(want), (what, got, want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-12), (what, key)


def _instance(expr: str, instance: str) -> str:
    """`expr` with every selector narrowed to one replica."""
    matcher = f'instance="{instance}"'
    expr = re.sub(r"\b(vllm_[a-z_]+)\{([^}]*)\}", rf"\1{{\2, {matcher}}}", expr)
    return re.sub(r"\b(vllm_[a-z_]+)(?=[\[)]|$)", rf"\1{{{matcher}}}", expr)


@pytest.mark.engine
def test_recording_rules_equal_what_each_replicas_own_series_give(fleet):
    prom = fleet.prom
    rules = {r["record"] + json.dumps(r.get("labels", {})): r for r in recording_rules()}
    wait_for(lambda: all(prom.query(r["record"]) for r in rules.values()
                         if "error" not in r["expr"]), 30, 0.5, "every recording rule")
    # An evaluation a few seconds back. A scrape that was still running when a rule was
    # evaluated adds samples stamped before the evaluation, which the rule did not see but a
    # later query does: where one evaluation differs, the two before it are compared too (a
    # wrong rule differs at every evaluation).
    samples = prom.query("model:vllm_requests:rate5m[10s]")[0]["values"]
    evaluations = [float(sample[0]) for sample in samples[-4:-7:-1]]
    for attempt, at in enumerate(evaluations, 1):
        try:
            checked = _check_rules_at(fleet, rules, at)
            break
        except AssertionError:
            if attempt == len(evaluations):
                raise
    # Every kind was checked, and each replica contributed: the fleet's request rate is more
    # than either replica's own.
    assert {"model:vllm_requests:rate5m", "model:vllm_kv_cache_usage_ratio:max",
            "model:vllm_time_to_first_token_seconds:p95_rate5m",
            "model_objective:vllm_slo_requests_bad:ratio_rate5m"} <= set(checked)
    assert len([n for n in checked if ":p" in n]) == len(LATENCY_HISTOGRAMS) * len(QUANTILES)
    fleet_rate = sum(_vector(prom, "model:vllm_requests:rate5m", at).values())
    for instance in fleet.instances:
        own = prom.query(f'sum(rate(vllm_requests_finished_total{{instance="{instance}"}}[5m]))',
                         at=at)
        assert 0 < float(own[0]["value"][1]) < fleet_rate
    # Gauges that stand still: the recorded value is the sum of what each daemon exports.
    engines_up = sum(d.scrape().get("vllm_engine_up") for d in fleet.daemons)
    assert engines_up == 2
    assert float(prom.query("model:vllm_engine_up:sum", at=at)[0]["value"][1]) == engines_up


def _check_rules_at(fleet, rules: dict[str, dict], at: float) -> list[str]:
    """Each recording rule's value at evaluation time `at` against the same expression over
    each replica's own series; the names checked."""
    prom = fleet.prom
    checked = []
    for rule in rules.values():
        name, expr = rule["record"], rule["expr"]
        got = _without_name(_vector(prom, f'{name}{_labels(rule)}', at))
        if "histogram_quantile" in expr:
            q = float(re.match(r"histogram_quantile\(([\d.]+),", expr).group(1))
            bucket_expr = expr[expr.index("sum by"):-1]
            buckets = _add(_per_replica(fleet, lambda i: _instance(bucket_expr, i), at))
            want: dict[str, list] = {}
            for key, value in buckets.items():
                labels = json.loads(key)
                le = float(labels.pop("le"))
                want.setdefault(json.dumps(labels, sort_keys=True), []).append((le, value))
            _same(got, {k: histogram_quantile(q, b) for k, b in want.items()}, name)
        elif expr.startswith(("avg by", "max by")):
            raw = expr[expr.index("(", 8) + 1:-1]
            values: dict[str, list[float]] = {}
            for vector in _per_replica(fleet, lambda i: _instance(raw, i), at):
                for key, value in vector.items():
                    labels = json.loads(key)
                    model = json.dumps({"model": labels["model"]}, sort_keys=True)
                    values.setdefault(model, []).append(value)
            combine = max if expr.startswith("max") else (lambda v: sum(v) / len(v))
            _same(got, {k: combine(v) for k, v in values.items()}, name)
        elif " / " in expr and not expr.startswith("model:"):
            numerator, denominator = expr.split(" / ")
            top = _add(_per_replica(fleet, lambda i: _instance(numerator, i), at))
            bottom = _add(_per_replica(fleet, lambda i: _instance(denominator, i), at))
            extra = rule.get("labels", {})

            def key_with(key: str) -> str:
                return json.dumps({**json.loads(key), **extra}, sort_keys=True)
            _same(got, {key_with(k): top[k] / bottom[k] for k in top if k in bottom}, name)
        elif expr.startswith("model:"):
            continue  # a ratio of two recorded series, themselves checked here
        else:
            _same(got, _add(_per_replica(fleet, lambda i: _instance(expr, i), at)), name)
        checked.append(name)
    return checked


def _labels(rule: dict) -> str:
    labels = rule.get("labels", {})
    if labels:
        return "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    if "objective" in rule["record"]:
        return '{objective!="errors"}'
    return ""


# --- the fleet dashboard --------------------------------------------------------------------------

@pytest.mark.engine
def test_every_fleet_dashboard_query_returns_data(fleet):
    dashboard = generate()["fleet.json"]
    variables = {
        "$__rate_interval": RATE_INTERVAL, "$job": JOB,
        "$instance": "|".join(escape_regex(i) for i in fleet.instances),
        "$model": escape_regex(fleet.daemons[0].model),
        "$slo_target": "0.99", "$error_target": "0.999",
    }
    empty, count = [], 0
    for panel in iter_panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
                expr = expr.replace(name, value)
            assert "$" not in expr, expr
            count += 1
            # per-replica panels show both replicas (topk/bottomk of 5 keep both)
            per_replica = "instance" in expr and "by (job, instance, model" in expr

            def problem(result: list[dict]) -> str | None:
                if not result:
                    return expr
                shown = {s["metric"].get("instance") for s in result}
                if per_replica and shown != set(fleet.instances):
                    return f"replicas {shown}"
                return None

            # Asked again for up to 15 s: a scrape late on a busy machine makes its
            # replica's series stale for a moment.
            found = problem(asked_again(lambda: fleet.prom.query(expr), problem, 15))
            if found:
                empty.append(f"{panel['title']}: {found}")
    assert count >= 20 and not empty, "\n".join(empty)
    links = [link["url"] for panel in iter_panels(dashboard)
             for link in panel["fieldConfig"]["defaults"].get("links", [])]
    assert links and all("var-instance=" in url for url in links)


# --- the rules' shape (no engine) -----------------------------------------------------------------

def test_recording_rule_names_follow_level_metric_operations():
    """level:metric:operations, the level naming the labels the expression keeps."""
    for rule in recording_rules():
        level, metric, operations = rule["record"].split(":")
        assert metric.startswith("vllm_") and operations, rule["record"]
        kept = set(level.split("_"))
        for grouping in re.findall(r"(?:sum|avg|max) by \(([^)]*)\)", rule["expr"]):
            assert {g.strip() for g in grouping.split(",")} - {"le"} <= kept | {"objective"}
        assert kept <= {"model", "objective"}, rule["record"]


def test_fleet_alerts_carry_what_every_rule_carries_and_have_a_runbook_section():
    runbook = (ROOT / "docs/runbook.md").read_text()
    anchors = {line[3:].strip().lower() for line in runbook.splitlines()
               if line.startswith("## ")}
    alerts = alerting_rules(SloConfig())
    assert len(alerts) == 2 * (len(SloConfig().objectives) + 1)
    for rule in alerts:
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}
        assert rule["alert"].lower() in anchors, rule["alert"]
        assert rule["annotations"]["runbook_url"].endswith("#" + rule["alert"].lower())
        assert "model_objective:vllm_slo_requests_bad:ratio_rate" in rule["expr"]


def test_the_fleet_group_is_exported_with_the_rules():
    exported = yaml.safe_load((ROOT / "deploy/prometheus/rules/vllm-exporter.rules.yml")
                              .read_text())["groups"]
    assert [g["name"] for g in exported] == ["vllm-exporter", "vllm-exporter-fleet"]
    assert exported[1] == fleet_group(SloConfig())
    k8s = yaml.safe_load((ROOT / "deploy/kubernetes/prometheusrule.yaml").read_text())
    assert k8s["spec"]["groups"][1] == exported[1]


@needs_promtool
def test_promtool_passes_the_fleet_tests():
    import subprocess

    result = subprocess.run(["promtool", "test", "rules", "fleet.test.yml"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT / "deploy/prometheus/tests")
    assert result.returncode == 0, result.stdout + result.stderr
