"""Rule files: validation errors name the file, the rule and the field; the default pack and
its exports stay in step with the code; promtool accepts and tests them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from exporter.alerts import prepare_alerts
from exporter.alerts.cli import export_text
from exporter.alerts.defaults import DEFAULT_THRESHOLDS, default_rule_file
from exporter.alerts.rules import load_rule_file, parse_rules
from exporter.catalog import all_families
from exporter.config import ConfigError, load_config
from exporter.slo import SloConfig
from testsupport import ROOT
from testsupport.markers import needs_promtool
from testsupport.promtool import run_promtool_test

RULES_FILE = ROOT / "deploy/prometheus/rules/vllm-exporter.rules.yml"
K8S_FILE = ROOT / "deploy/kubernetes/prometheusrule.yaml"
PROMTOOL_TESTS = sorted((ROOT / "deploy/prometheus/tests").glob("*.test.yml"))


def good_rule(**changes) -> dict:
    rule = {
        "alert": "TestQueue", "kind": "threshold",
        "signal": {"gauge": "vllm_requests_waiting"}, "above": 3,
        "for": "10s", "severity": "warning",
        "annotations": {"summary": "queue on {{ $labels.model }}",
                        "description": "{{ $value }} waiting", "runbook_url": "http://x/#q"},
    }
    for key, value in changes.items():
        if value is None:
            rule.pop(key, None)
        else:
            rule[key] = value
    return rule


def load_one(tmp_path: Path, rule: dict) -> None:
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"rules": [rule]}))
    load_rule_file(path, SloConfig())


BAD_RULES = [
    # (what, changes to a good rule, field path, words in the problem)
    ("unknown field", {"threshold": 3}, "rules.TestQueue.threshold", "unknown field"),
    ("bad duration", {"for": "10 minutes"}, "rules.TestQueue.for", "not a duration"),
    ("missing for", {"for": None}, "rules.TestQueue.for", "required"),
    ("unknown metric", {"signal": {"gauge": "vllm_requests_waitin"}},
     "rules.TestQueue.signal.gauge", "unknown metric"),
    ("wrong metric kind", {"signal": {"rate": "vllm_requests_waiting", "window": "5m"}},
     "rules.TestQueue.signal.rate", "is a gauge"),
    ("missing severity", {"severity": None}, "rules.TestQueue.severity", "required"),
    ("bad severity", {"severity": "page"}, "rules.TestQueue.severity", "one of"),
    ("missing annotations", {"annotations": None}, "rules.TestQueue.annotations", "required"),
    ("missing runbook", {"annotations": {"summary": "s", "description": "d"}},
     "rules.TestQueue.annotations.runbook_url", "required"),
    ("bad threshold", {"above": "three"}, "rules.TestQueue.above", "must be a number"),
    ("two bounds", {"below": 1}, "rules.TestQueue.above", "exactly one"),
    ("bad template", {"labels": {"team": "{{ $labels.team | upper }}"}},
     "rules.TestQueue.labels.team", "unknown template function"),
    ("bad label name", {"labels": {"my-team": "x"}}, "rules.TestQueue.labels.my-team",
     "not a valid label name"),
    ("unknown label in match", {"signal": {"gauge": "vllm_requests_waiting",
                                           "match": {"gpu": "0"}}},
     "rules.TestQueue.signal.match.gpu", "has no label"),
    ("unknown kind", {"kind": "anomaly"}, "rules.TestQueue.kind", "one of"),
    ("quantile out of range", {"signal": {"quantile": 95, "window": "5m",
                                          "histogram": "vllm_time_to_first_token_seconds"}},
     "rules.TestQueue.signal.quantile", "(0, 1)"),
    ("window missing", {"signal": {"rate": "vllm_preemptions_total"}},
     "rules.TestQueue.signal.window", "required"),
    ("regression without traffic guard",
     {"kind": "regression", "above": None, "baseline_window": "1h", "increase_over": 0.5,
      "signal": {"mean": "vllm_time_per_output_token_seconds", "window": "10m"}},
     "rules.TestQueue.min_rate", "traffic"),
    ("slo objective unknown", {"kind": "slo_burn", "signal": None, "above": None,
                               "objective": "latency", "long_window": "1h",
                               "short_window": "5m", "burn_rate": 14.4},
     "rules.TestQueue.objective", "ttft"),
]


@pytest.mark.parametrize("what,changes,field,words", BAD_RULES, ids=[b[0] for b in BAD_RULES])
def test_bad_rule_names_file_rule_and_field(tmp_path, what, changes, field, words):
    with pytest.raises(ConfigError) as err:
        load_one(tmp_path, good_rule(**changes))
    assert err.value.source == str(tmp_path / "rules.yml")
    assert err.value.field_path == field, err.value
    assert words in err.value.problem, err.value


def test_the_good_rule_loads(tmp_path):
    load_one(tmp_path, good_rule())


def test_rule_without_a_name_is_named_by_position(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_one(tmp_path, good_rule(alert=None))
    assert err.value.field_path == "rules[0].alert"


def test_duplicate_alert_names_are_rejected():
    with pytest.raises(ConfigError, match="duplicate alert name"):
        parse_rules({"rules": [good_rule(), good_rule()]}, SloConfig(), "f.yml")


def test_not_yaml_and_wrong_top_level(tmp_path):
    path = tmp_path / "r.yml"
    path.write_text("rules: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_rule_file(path, SloConfig())
    path.write_text("groups: []")
    with pytest.raises(ConfigError, match="one key, rules"):
        load_rule_file(path, SloConfig())


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_check_config_exits_2_naming_the_rule_file_rule_and_field(tmp_path):
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"rules": [good_rule(**{"for": "soon"})]}))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"alerts": {"rules_file": str(rules)}}))
    result = _cli("check-config", "--config", str(config))
    assert result.returncode == 2, result
    assert str(rules) in result.stderr
    assert "rules.TestQueue.for" in result.stderr
    assert "not a duration" in result.stderr
    rules.write_text(yaml.safe_dump({"rules": [good_rule()]}))
    result = _cli("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr


def test_alerts_config_problems_name_the_field(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"alerts": {"thresholds": {"ttft_p99": 1.0}}}))
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert err.value.field_path == "alerts.thresholds.ttft_p99"
    config.write_text(yaml.safe_dump({"alerts": {"alertmanager": {"urls": ["am:9093"]}}}))
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert err.value.field_path == "alerts.alertmanager.urls[0]"


def test_a_replaced_threshold_is_refused_naming_its_replacement(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(
        {"alerts": {"thresholds": {"gpu_memory_over_budget_ratio": 1.05}}}))
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert err.value.field_path == "alerts.thresholds.gpu_memory_over_budget_ratio"
    assert "gpu_memory_over_budget_bytes" in str(err.value)


def test_a_difference_signal_subtracts_one_gauge_from_the_other():
    signal = {"difference": {"minuend": {"metric": "vllm_gpu_process_memory_used_bytes",
                                         "match": {"owner": "engine"}},
                             "subtrahend": {"metric": "vllm_gpu_memory_budget_bytes"}},
              "without": ["owner"]}
    rules = parse_rules({"rules": [good_rule(signal=signal, above=5)]},
                        SloConfig(), "test")
    assert rules[0].expr.promql() == (
        '(sum without (owner) (vllm_gpu_process_memory_used_bytes{owner="engine"}) - '
        'sum without (owner) (vllm_gpu_memory_budget_bytes)) > 5')
    counter = {"difference": {"minuend": {"metric": "vllm_requests_finished_total"},
                              "subtrahend": {"metric": "vllm_gpu_memory_budget_bytes"}}}
    with pytest.raises(ConfigError) as err:
        parse_rules({"rules": [good_rule(signal=counter)]},
                    SloConfig(), "test")
    assert err.value.field_path.endswith("signal.difference.minuend.metric")


def test_thresholds_change_the_default_pack(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"alerts": {"thresholds": {"ttft_p95_seconds": 0.75}}}))
    text = export_text(load_config(config), "prometheus")
    assert "rate(vllm_time_to_first_token_seconds_bucket[5m])) > 0.75)" in text
    assert "above 0.75s" in text


def test_disabled_alerts_prepare_nothing():
    config = load_config(None)
    config.alerts.enabled = False
    assert prepare_alerts(config) is None
    config.alerts.enabled = True
    assert len(prepare_alerts(config).rules) == len(default_rule_file()["rules"])


# --- the default pack --------------------------------------------------------------------------

def test_every_metric_a_default_rule_uses_is_defined():
    defined = {f.name: f for f in all_families()}  # engine, GPU, alerting, advice (canary)
    rules = parse_rules(default_rule_file(), SloConfig(), "<default>")
    for rule in rules:
        for selector in rule.expr.selectors():
            assert selector.family in defined, (rule.alert, selector.family)
            spec = defined[selector.family]
            suffixes = ("_bucket", "_sum", "_count") if spec.kind == "histogram" else ("",)
            assert selector.name in {spec.name + s for s in suffixes}, (rule.alert, selector.name)
            for label, _ in selector.match:
                assert label in spec.labels + ("le",), (rule.alert, label)


def test_every_exported_expression_names_only_defined_metrics():
    """Independent of the expression tree: scan the committed PromQL text itself."""
    import re

    defined = set()
    for f in all_families():
        defined |= ({f.name + s for s in ("_bucket", "_sum", "_count")}
                    if f.kind == "histogram" else {f.name})
    doc = yaml.safe_load(RULES_FILE.read_text())
    keywords = {"rate", "increase", "histogram_quantile", "sum", "max", "min", "without",
                "and", "or", "on", "offset", "time"}
    for rule in doc["groups"][0]["rules"]:
        expr = re.sub(r"\b(without|on)\s*\([^)]*\)", "", rule["expr"])  # label lists
        expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)  # matchers and ranges
        names = set(re.findall(r"\b[a-zA-Z_][a-zA-Z0-9_]*\b", expr)) - keywords
        assert names, rule["alert"]
        unknown = names - defined
        assert not unknown, (rule["alert"], unknown)


def test_every_default_rule_has_a_runbook_section():
    runbook = (ROOT / "docs/runbook.md").read_text()
    anchors = {line[3:].strip().lower() for line in runbook.splitlines()
               if line.startswith("## ")}
    for rule in default_rule_file()["rules"]:
        assert rule["alert"].lower() in anchors, rule["alert"]
        assert rule["annotations"]["runbook_url"].endswith("#" + rule["alert"].lower())


def test_every_threshold_key_is_used():
    text = (ROOT / "exporter/alerts/defaults.py").read_text()
    for key in DEFAULT_THRESHOLDS:
        assert text.count(f"t['{key}']") + text.count(f't["{key}"]') >= 1, key


def test_committed_rule_files_match_the_code():
    config = load_config(None)
    assert RULES_FILE.read_text() == export_text(config, "prometheus"), (
        "run: vllm-exporter rules export --out deploy/prometheus/rules/vllm-exporter.rules.yml")
    assert K8S_FILE.read_text() == export_text(config, "kubernetes"), (
        "run: vllm-exporter rules export --format kubernetes "
        "--out deploy/kubernetes/prometheusrule.yaml")


def test_rules_export_check_mode(tmp_path):
    assert _cli("rules", "export", "--out", str(RULES_FILE), "--check").returncode == 0
    stale = tmp_path / "stale.yml"
    stale.write_text("groups: []\n")
    result = _cli("rules", "export", "--out", str(stale), "--check")
    assert result.returncode == 1 and "out of date" in result.stderr


def test_native_export_round_trips(tmp_path):
    path = tmp_path / "native.yml"
    path.write_text(export_text(load_config(None), "native"))
    rules = load_rule_file(path, SloConfig())
    assert [r.alert for r in rules] == [r["alert"] for r in default_rule_file()["rules"]]


# --- promtool ------------------------------------------------------------------------------------

@needs_promtool
def test_promtool_checks_the_exported_rules():
    result = subprocess.run(["promtool", "check", "rules", str(RULES_FILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    from exporter.alerts.fleet import fleet_group

    fleet = len(fleet_group(SloConfig())["rules"])  # the fleet group's recording rules and alerts
    assert f"{len(default_rule_file()['rules']) + fleet} rules found" in result.stdout


@needs_promtool
@pytest.mark.parametrize("path", PROMTOOL_TESTS, ids=[p.name for p in PROMTOOL_TESTS])
def test_promtool_unit_tests_pass(path):
    result = run_promtool_test(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_default_rule_has_a_firing_and_a_silent_promtool_case():
    fires, silent = set(), set()
    for path in PROMTOOL_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for check in test["alert_rule_test"]:
                (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {r["alert"] for r in default_rule_file()["rules"]}
    assert names - fires == set(), "rules with no firing case"
    assert names - silent == set(), "rules with no case that must not fire"


def test_label_values_the_default_rules_match_exist_in_the_code():
    """A matcher on a value the collectors never produce would make a rule silently dead."""
    from exporter.alerts.defaults import THROTTLE_REASONS
    from exporter.gpu import THROTTLE_REASONS as GPU_REASONS

    assert set(THROTTLE_REASONS) <= {name for name, _ in GPU_REASONS}
    gpu_source = "".join(p.read_text() for p in sorted((ROOT / "exporter/gpu").rglob("*.py")))
    for value in ('"uncorrected"', '"engine"', '"other"'):
        assert value in gpu_source, value
    slo = SloConfig()
    rules = parse_rules(default_rule_file(), slo, "<default>")
    objectives = {o.name for o in slo.objectives}
    for rule in rules:
        for selector in rule.expr.selectors():
            for label, values in selector.match:
                if label == "objective":
                    assert set(values) <= objectives, rule.alert


def test_serve_and_export_exit_2_on_a_bad_rule_before_starting_anything(tmp_path):
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"rules": [good_rule(signal={"gauge": "vllm_nope"})]}))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"alerts": {"rules_file": str(rules)}}))
    for args in (("serve", "--config", str(config)),
                 ("rules", "export", "--config", str(config))):
        result = _cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "rules.TestQueue.signal.gauge" in result.stderr, result.stderr
        assert "unknown metric 'vllm_nope'" in result.stderr


def test_runbook_base_url_points_every_default_rule_at_the_teams_copy():
    from exporter.config import load_config

    config = load_config(None, {"alerts.runbook_base_url": "https://wiki.example/runbook"})
    rules = prepare_alerts(config).rules
    assert rules and all(r.annotations["runbook_url"] ==
                         f"https://wiki.example/runbook#{r.alert.lower()}" for r in rules)
