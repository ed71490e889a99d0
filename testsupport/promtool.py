"""promtool's unit-test files (deploy/prometheus/tests) run through the in-daemon evaluator:
the same input_series, evaluated at the same times, so that promtool's expectations double as
equivalence tests of the two evaluators."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from exporter.alerts.evaluator import Evaluator
from exporter.alerts.history import History
from exporter.alerts.rules import Rule, parse_duration

from .prometheus import PROMTOOL


# --- promtool's input_series notation ----------------------------------------------------------

_SERIES = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?$')
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_EXPAND = re.compile(r'^(-?[0-9.eE+]+?|_)(?:([+-][0-9.eE+]+))?x(\d+)$')


def parse_series(text: str) -> tuple[str, dict[str, str]]:
    match = _SERIES.match(text.strip())
    if not match:
        raise ValueError(f"cannot parse series {text!r}")
    labels = dict(_LABEL.findall(match.group(2) or ""))
    return match.group(1), labels


def expand_values(text: str) -> list[float | None]:
    """promtool's values: 'a+bxn' -> a, a+b, ..., a+nb; 'axn' -> n+1 times a; '_xn' -> n gaps."""
    out: list[float | None] = []
    for token in text.split():
        m = _EXPAND.match(token)
        if m:
            start, step, n = m.group(1), m.group(2), int(m.group(3))
            if start == "_":
                out += [None] * n
                continue
            a, b = float(start), float(step or 0)
            out += [a + i * b for i in range(n + 1)]
        elif token == "_":
            out.append(None)
        elif token == "stale":
            out.append(None)
        else:
            out.append(float(token))
    return out


@dataclass
class ScriptedSeries:
    name: str
    labels: dict[str, str]
    values: list[float | None]

    def text(self) -> str:
        inner = ",".join(f'{k}="{v}"' for k, v in sorted(self.labels.items()))
        return f"{self.name}{{{inner}}}" if inner else self.name


@dataclass
class ScriptRun:
    """What the in-daemon evaluator saw: firing alerts by (time, alertname)."""

    firing: dict[tuple[float, str], list[dict]] = field(default_factory=dict)


def run_evaluator(rules: list[Rule], series: list[ScriptedSeries], interval: float,
                  eval_interval: float, until: float, checkpoints: list[float]) -> ScriptRun:
    """Feed scripted samples and evaluate at promtool's times (0, eval_interval, ... until).

    Samples and evaluations are interleaved in time order, as in the daemon; a sample taken
    at the same instant as an evaluation is visible to it (promtool loads every sample
    before evaluating, and an instant query at t sees samples at t).
    """
    wanted = {s.name for rule in rules for s in rule.expr.selectors()}
    reach = max(rule.expr.max_range_seconds() for rule in rules)
    history = History(wanted, eval_interval, until + reach + 60, until + reach + 60)
    evaluator = Evaluator(rules, history, eval_interval)
    sample_times = {round(i * interval, 6) for s in series for i in range(len(s.values))}
    eval_count = int(round(until / eval_interval))
    eval_times = {round(k * eval_interval, 6) for k in range(eval_count + 1)}
    wanted_checkpoints = {round(c, 6) for c in checkpoints}
    run = ScriptRun()
    for t in sorted(sample_times | eval_times):
        if t in sample_times:
            i = int(round(t / interval))
            history.add(t, [(s.name, s.labels, s.values[i]) for s in series
                            if i < len(s.values) and s.values[i] is not None])
        if t in eval_times:
            evaluator.evaluate(t)
            if t in wanted_checkpoints:
                for state in evaluator.rules:
                    run.firing[(t, state.rule.alert)] = [
                        {"labels": dict(a.labels), "annotations": dict(a.annotations)}
                        for a in state.alerts.values() if a.state == "firing"]
    return run


def load_promtool_test(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def evaluator_matches_promtool_file(path: Path, rules: list[Rule]) -> list[str]:
    """Run every test of a promtool unit-test file through the in-daemon evaluator.

    Returns the mismatches (empty: the evaluator agrees with every expectation).
    """
    doc = load_promtool_test(path)
    eval_interval = parse_duration(doc.get("evaluation_interval", "1m"))
    problems = []
    for index, test in enumerate(doc["tests"]):
        interval = parse_duration(test.get("interval", doc.get("evaluation_interval", "1m")))
        series = []
        for item in test.get("input_series", []):
            name, labels = parse_series(item["series"])
            series.append(ScriptedSeries(name, labels, expand_values(str(item["values"]))))
        checks = test.get("alert_rule_test", [])
        times = [parse_duration(c["eval_time"]) for c in checks]
        run = run_evaluator(rules, series, interval, eval_interval, max(times), times)
        for check, t in zip(checks, times):
            got = run.firing.get((round(t, 6), check["alertname"]), [])
            want = [{"labels": {**(e.get("exp_labels") or {}), "alertname": check["alertname"]},
                     "annotations": e.get("exp_annotations") or {}}
                    for e in check.get("exp_alerts") or []]
            if _normalise(got) != _normalise(want):
                problems.append(f"{path.name} test {index} ({test.get('name', '')}) at "
                                f"{check['eval_time']} {check['alertname']}: evaluator fired "
                                f"{got}, promtool expects {want}")
    return problems


def _normalise(alerts: list[dict]) -> list[str]:
    """promtool compares labels and annotations exactly (missing annotations = none)."""
    return sorted(json.dumps({"labels": {k: str(v) for k, v in a["labels"].items()},
                              "annotations": a["annotations"] or {}}, sort_keys=True)
                  for a in alerts)


def run_promtool_test(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True,
                          text=True, timeout=120)
