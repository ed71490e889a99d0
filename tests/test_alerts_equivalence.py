"""The in-daemon evaluator and Prometheus (promtool) agree: same alerts, same times.

Two directions:
1. Every promtool unit test under deploy/prometheus/tests is also run through the in-daemon
   evaluator, which must produce exactly the expected alerts (labels and rendered
   annotations) at every checked time.
2. Scripted random metric histories (counter resets included) for rules of every kind and
   signal: the evaluator's firing alerts at every evaluation time become the expectations of a
   generated promtool test, which promtool must pass.
Annotations render $value through humanize (4 significant digits), the documented tolerance:
both sides compute in float64 but may sum series in a different order.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from exporter.alerts.defaults import default_rule_file
from exporter.alerts.expr import format_duration
from exporter.alerts.promql import prometheus_rule_file, to_yaml
from exporter.alerts.rules import parse_rules
from exporter.slo import SloConfig
from testsupport import ROOT
from testsupport.markers import needs_promtool
from testsupport.promtool import (ScriptedSeries, evaluator_matches_promtool_file, run_evaluator,
                                  run_promtool_test)

# fleet.test.yml tests the fleet recording rules and alerts (exporter/alerts/fleet.py): they
# aggregate over replicas and run in Prometheus only, never in the daemon.
PROMTOOL_TESTS = sorted(p for p in (ROOT / "deploy/prometheus/tests").glob("*.test.yml")
                        if p.name != "fleet.test.yml")


@pytest.mark.parametrize("path", PROMTOOL_TESTS, ids=[p.name for p in PROMTOOL_TESTS])
def test_evaluator_passes_the_promtool_unit_tests(path):
    rules = parse_rules(default_rule_file(), SloConfig(), "<default>")
    problems = evaluator_matches_promtool_file(path, rules)
    assert not problems, "\n".join(problems)


# --- scripted random histories --------------------------------------------------------------------

def _annotations(text: str) -> dict:
    return {"summary": text, "description": "value {{ $value | humanize }}",
            "runbook_url": "http://runbook/#x"}


def scenario_rules() -> dict:
    """One rule per kind and signal type, thresholds near the data's typical values."""
    rules = [
        {"alert": "RateHigh", "kind": "threshold", "for": "1m", "severity": "warning",
         "signal": {"rate": "vllm_generation_tokens_total", "window": "2m"}, "above": 10.5,
         "annotations": _annotations("rate {{ $labels.engine }}")},
        {"alert": "IncreaseHigh", "kind": "threshold", "for": "0s", "severity": "info",
         "signal": {"increase": "vllm_preemptions_total", "window": "90s",
                    "without": ["engine"]}, "above": 12,
         "annotations": _annotations("increase")},
        {"alert": "QuantileHigh", "kind": "threshold", "for": "1m", "severity": "warning",
         "signal": {"quantile": 0.9, "histogram": "vllm_time_to_first_token_seconds",
                    "window": "3m"}, "above": 0.35, "min_rate": 0.5,
         "annotations": _annotations("p90 {{ $labels.engine }}")},
        {"alert": "RatioHigh", "kind": "threshold", "for": "30s", "severity": "critical",
         "signal": {"ratio": {"numerator": {"metric": "vllm_requests_finished_total",
                                            "match": {"finish_reason": ["error", "abort"]}},
                              "denominator": {"metric": "vllm_requests_finished_total"}},
                    "window": "2m", "without": ["finish_reason"]}, "above": 0.12,
         "annotations": _annotations("errors")},
        {"alert": "GaugeHigh", "kind": "threshold", "for": "1m", "severity": "warning",
         "signal": {"gauge": "vllm_requests_waiting", "without": ["engine"],
                    "aggregate": "sum"}, "above": 9,
         "annotations": _annotations("waiting")},
        {"alert": "MeanRegressed", "kind": "regression", "for": "1m", "severity": "warning",
         "signal": {"mean": "vllm_time_per_output_token_seconds", "window": "3m"},
         "baseline_window": "10m", "increase_over": 0.15, "min_rate": 0.2,
         "annotations": _annotations("tpot")},
        {"alert": "Stalled", "kind": "stall", "for": "30s", "severity": "critical",
         "timestamp": "vllm_engine_last_step_timestamp_seconds", "stale_after": "45s",
         "while_positive": ["vllm_requests_waiting"], "on": ["model", "engine"],
         "annotations": _annotations("stall {{ $labels.engine }}")},
        {"alert": "GpuVisibleHot", "kind": "threshold", "for": "0s", "severity": "info",
         "signal": {"gauge": "vllm_gpu_temperature_celsius"}, "above": 80,
         "only_if": [{"gauge": "vllm_gpu_engine_visible", "above": 0, "on": ["uuid"]}],
         "annotations": _annotations("hot {{ $labels.gpu }}")},
    ]
    return {"rules": rules}


TTFT_BOUNDS = ("0.1", "0.25", "0.5", "1", "+Inf")


def random_history(seed: int, steps: int) -> list[ScriptedSeries]:
    rnd = random.Random(seed)
    series: list[ScriptedSeries] = []

    def add(name, labels, values):
        series.append(ScriptedSeries(name, {"model": "m", **labels}, values))

    for engine in ("0", "1"):
        e = {"engine": engine}
        # counters: random increments in phases, one counter reset (a restart) per engine
        reset_at = rnd.randrange(steps // 3, 2 * steps // 3)
        level, tokens, preempt = 0.0, [], []
        p_level = 0.0
        for i in range(steps):
            busy = 1.0 if (i // 20) % 2 == 0 else 0.4
            if i == reset_at:
                level, p_level = 0.0, 0.0
            level += rnd.randint(100, 220) * busy
            p_level += rnd.choice((0, 0, 1, 2, 5))
            tokens.append(level)
            preempt.append(p_level)
        add("vllm_generation_tokens_total", e, tokens)
        add("vllm_preemptions_total", e, preempt)
        # a histogram whose shape drifts: share of slow requests varies by phase
        cumulative = [0.0] * len(TTFT_BOUNDS)
        rows = [[] for _ in TTFT_BOUNDS]
        total_sum, sums, counts = 0.0, [], []
        for i in range(steps):
            slow_share = 0.05 if (i // 25) % 2 == 0 else 0.3
            for _ in range(rnd.randint(5, 15)):
                v = rnd.uniform(0.4, 0.9) if rnd.random() < slow_share else rnd.uniform(0.01, 0.3)
                for b, bound in enumerate(TTFT_BOUNDS):
                    if v <= float(bound):
                        cumulative[b] += 1
                total_sum += v
            for b in range(len(TTFT_BOUNDS)):
                rows[b].append(cumulative[b])
            sums.append(total_sum)
            counts.append(cumulative[-1])
        for bound, row in zip(TTFT_BOUNDS, rows):
            add("vllm_time_to_first_token_seconds_bucket", {**e, "le": bound}, row)
        add("vllm_time_to_first_token_seconds_count", e, counts)
        # time per output token: regresses by 40 % for a while in the second half
        t_sum, t_count, sum_row, count_row = 0.0, 0.0, [], []
        for i in range(steps):
            n = rnd.randint(3, 8)
            tpot = 0.02 * (1.4 if steps // 2 <= i < steps // 2 + 40 else 1.0)
            t_sum += n * tpot * rnd.uniform(0.95, 1.05)
            t_count += n
            sum_row.append(t_sum)
            count_row.append(t_count)
        add("vllm_time_per_output_token_seconds_sum", e, sum_row)
        add("vllm_time_per_output_token_seconds_count", e, count_row)
        # finished requests by reason
        for reason, (lo, hi) in {"stop": (5, 10), "error": (0, 2), "abort": (0, 1)}.items():
            level, row = 0.0, []
            for i in range(steps):
                burst = 3 if reason == "error" and (i // 30) % 3 == 1 else 0
                level += rnd.randint(lo, hi) + burst
                row.append(level)
            add("vllm_requests_finished_total", {**e, "finish_reason": reason}, row)
        # gauges; the engine's last step freezes for a while (a stall) on engine 1
        add("vllm_requests_waiting", e, [float(rnd.randint(0, 4) + (5 if (i // 40) % 2 else 0))
                                         for i in range(steps)])
        stamps, last = [], 0.0
        for i in range(steps):
            frozen = engine == "1" and steps // 4 <= i < steps // 4 + 20
            if not frozen:
                last = i * 15.0
            stamps.append(last)
        add("vllm_engine_last_step_timestamp_seconds", e, stamps)
    for gpu, visible in (("0", 1.0), ("1", 0.0)):
        labels = {"gpu": gpu, "uuid": f"GPU-{gpu}", "name": "H200"}
        series.append(ScriptedSeries("vllm_gpu_temperature_celsius", labels,
                                     [float(rnd.randint(70, 90)) for _ in range(steps)]))
        series.append(ScriptedSeries("vllm_gpu_engine_visible", {**labels, "cuda_index": gpu},
                                     [visible] * steps))
    return series


def promtool_test_document(rules_file: str, series: list[ScriptedSeries], interval: float,
                           eval_interval: float, checks: list[tuple[float, str, list[dict]]]):
    def values(row):
        return " ".join("_" if v is None else repr(v) for v in row)

    alert_tests = []
    for t, alertname, alerts in checks:
        expected = []
        for a in alerts:
            labels = {k: v for k, v in a["labels"].items() if k != "alertname"}
            expected.append({"exp_labels": labels, "exp_annotations": a["annotations"]})
        alert_tests.append({"eval_time": format_duration(t), "alertname": alertname,
                            "exp_alerts": expected})
    return {
        "rule_files": [rules_file],
        "evaluation_interval": format_duration(eval_interval),
        "tests": [{
            "interval": format_duration(interval),
            "input_series": [{"series": s.text(), "values": values(s.values)} for s in series],
            "alert_rule_test": alert_tests,
        }],
    }


@needs_promtool
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_histories_give_the_same_alerts_as_promtool(tmp_path: Path, seed: int):
    raw = scenario_rules()
    rules = parse_rules(raw, SloConfig(), "<scenario>")
    interval, eval_interval, steps = 15.0, 30.0, 240  # one hour of 15 s scrapes
    series = random_history(seed, steps)
    until = (steps - 1) * interval
    times = [k * eval_interval for k in range(int(until // eval_interval) + 1)]
    run = run_evaluator(rules, series, interval, eval_interval, until, times)

    checks = [(t, rule.alert, run.firing[(round(t, 6), rule.alert)])
              for t in times for rule in rules]
    fired = {name for _, name, alerts in checks if alerts}
    silent = {name for _, name, alerts in checks if not alerts}
    names = {r.alert for r in rules}
    assert fired == names, f"rules that never fired: {names - fired}"
    assert silent == {r.alert for r in rules}, "every rule must also be quiet some of the time"

    rules_path = tmp_path / "rules.yml"
    rules_path.write_text(to_yaml(prometheus_rule_file(rules)))
    test_path = tmp_path / "equivalence.test.yml"
    test_path.write_text(yaml.safe_dump(promtool_test_document(
        rules_path.name, series, interval, eval_interval, checks), width=1 << 20))
    result = run_promtool_test(test_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
