"""Alerting test helpers and fixtures.

- Running the in-daemon evaluator over a promtool unit-test file (same input_series, same
  evaluation times), so the promtool tests under deploy/prometheus/tests double as
  equivalence tests.
- Real `prometheus-alertmanager` and `prometheus` processes on loopback, and a small
  in-process webhook receiver that records Alertmanager's notifications.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from exporter.alerts.evaluator import Evaluator
from exporter.alerts.history import History
from exporter.alerts.rules import Rule, parse_duration
from helpers import BackgroundLoad, free_port, http_get, wait_for

ROOT = Path(__file__).resolve().parent.parent
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed "
                                    "(apt-get install prometheus)")
needs_alertmanager = pytest.mark.skipif(ALERTMANAGER is None, reason="prometheus-alertmanager "
                                        "not installed")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed")


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


# --- a webhook receiver for Alertmanager's notifications -----------------------------------------

class WebhookReceiver:
    """Records every notification Alertmanager POSTs (its webhook JSON payloads)."""

    def __init__(self):
        self.payloads: list[dict] = []
        self.arrivals: list[float] = []  # time.time() of each payload
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.payloads.append(json.loads(body))
                    receiver.arrivals.append(time.time())
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, alertname: str | None = None, status: str | None = None) -> list[dict]:
        """Every alert in every payload so far, filtered (status: firing | resolved)."""
        with self._lock:
            out = []
            for payload in self.payloads:
                for alert in payload.get("alerts", []):
                    if alertname and alert["labels"].get("alertname") != alertname:
                        continue
                    if status and alert["status"] != status:
                        continue
                    out.append(alert)
            return out

    def first_arrival(self, alertname: str, status: str = "firing") -> float | None:
        with self._lock:
            for payload, t in zip(self.payloads, self.arrivals):
                if any(a["labels"].get("alertname") == alertname and a["status"] == status
                       for a in payload.get("alerts", [])):
                    return t
        return None

    def wait(self, alertname: str, status: str = "firing", timeout: float = 30) -> list[dict]:
        wait_for(lambda: self.alerts(alertname, status), timeout,
                 what=f"{status} {alertname} at the webhook")
        return self.alerts(alertname, status)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# --- real Alertmanager and Prometheus processes --------------------------------------------------

class ManagedProcess:
    def __init__(self, argv: list[str], port: int, log_path: Path, ready_path: str):
        self.argv, self.port, self.log_path, self.ready_path = argv, port, log_path, ready_path
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> "ManagedProcess":
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited:\n{self.log_tail()}")
            try:
                return http_get(self.url + self.ready_path, timeout=1)[0] == 200
            except OSError:
                return False
        wait_for(ready, timeout, what=f"{Path(self.argv[0]).name} ready")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def alertmanager_config(webhook_url: str) -> dict:
    """Every alert its own group (so the two paths arrive separately), to the webhook after
    1 s (group wait/interval), resolved included."""
    return {
        "route": {"receiver": "webhook", "group_by": ["..."], "group_wait": "1s",
                  "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{"name": "webhook",
                       "webhook_configs": [{"url": webhook_url, "send_resolved": True}]}],
    }


def make_alertmanager(tmp: Path, webhook_url: str, port: int | None = None,
                      name: str = "alertmanager") -> ManagedProcess:
    directory = tmp / name
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "alertmanager.yml"
    config.write_text(yaml.safe_dump(alertmanager_config(webhook_url)))
    port = port or free_port()
    argv = [ALERTMANAGER, f"--config.file={config}", f"--storage.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
            "--log.level=warn"]
    return ManagedProcess(argv, port, directory / "log.txt", "/-/ready")


def make_prometheus(tmp: Path, scrape_target: str, alertmanager_url: str, rule_file: Path,
                    interval: str = "1s", name: str = "prometheus") -> ManagedProcess:
    directory = tmp / name
    directory.mkdir(parents=True, exist_ok=True)
    am_host = alertmanager_url.split("://", 1)[1].rstrip("/")
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(rule_file)],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [am_host]}]}]},
        "scrape_configs": [{"job_name": "vllm-exporter",
                            "static_configs": [{"targets": [scrape_target]}]}],
    }
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [PROMETHEUS, f"--config.file={path}", f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--rules.alert.resend-delay=1s",
            "--log.level=warn"]
    return ManagedProcess(argv, port, directory / "log.txt", "/-/ready")


@pytest.fixture
def webhook():
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


# --- the shared daemon's alerting (session scope) ------------------------------------------------

# A rule the e2e tests can trigger quickly on the CPU engine: saturate it (far more concurrent
# requests than max_num_seqs, 32 in the test config) and requests queue before being
# scheduled. A windowed quantile of the queue time rides out the bursts of this small engine
# (its gauges flicker between 0 and their peak as batches turn over in a second or two).
E2E_ALERT = "E2eQueueTimeHigh"
E2E_RULE = {
    "alert": E2E_ALERT, "kind": "threshold",
    "signal": {"quantile": 0.5, "histogram": "vllm_request_queue_time_seconds",
               "window": "15s"},
    "above": 0.25, "min_rate": 0.5,
    "for": "1s", "severity": "info", "labels": {"test": "e2e"},
    "annotations": {"summary": "median queue time {{ $value | humanizeDuration }} on "
                               "{{ $labels.model }}",
                    "description": "e2e saturation test",
                    "runbook_url": "https://example.invalid/runbook#e2e"},
}


@dataclass
class SessionAlerting:
    webhook: WebhookReceiver
    alertmanager: ManagedProcess | None
    rules_file: Path  # the daemon's rule file: the default pack plus E2E_RULE
    prometheus_rules_file: Path  # the same rules exported as PromQL
    evaluation_interval: float = 0.5

    def daemon_section(self) -> dict:
        return {
            "rules_file": str(self.rules_file),
            "evaluation_interval_seconds": self.evaluation_interval,
            "alertmanager": {
                "urls": [self.alertmanager.url] if self.alertmanager else [],
                "resend_interval_seconds": 5.0, "retry_initial_seconds": 0.2,
                "retry_max_seconds": 2.0,
            },
        }


@pytest.fixture(scope="session")
def alerting(tmp_path_factory):
    """A webhook receiver and a real Alertmanager for the whole session (None without the
    binary), and the rule files the shared daemon and the e2e Prometheus load."""
    from exporter.alerts.defaults import default_rule_file
    from exporter.alerts.promql import prometheus_rule_file, to_yaml
    from exporter.alerts.rules import parse_rules
    from exporter.slo import SloConfig

    tmp = tmp_path_factory.mktemp("alerting")
    raw = default_rule_file()
    raw["rules"].append(E2E_RULE)
    rules_file = tmp / "rules.yml"
    rules_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    exported = tmp / "rules.prometheus.yml"
    exported.write_text(to_yaml(prometheus_rule_file(parse_rules(raw, SloConfig(), "e2e"))))
    receiver = WebhookReceiver()
    am = make_alertmanager(tmp, receiver.url).start() if ALERTMANAGER else None
    yield SessionAlerting(receiver, am, rules_file, exported)
    if am is not None:
        am.stop()
    receiver.close()


class Saturation(BackgroundLoad):
    """Far more concurrent long requests than the engine's max_num_seqs, until stopped.

    Lengths differ per worker so requests finish at different steps: the queue stays long
    instead of emptying in waves (same-length requests finish together).
    """

    def __init__(self, api_url: str, model: str, concurrency: int = 96, max_tokens: int = 256):
        self.api_url, self.model = api_url, model
        self.concurrency, self.max_tokens = concurrency, max_tokens
        self.finished = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    async def _worker(self, client, index: int) -> None:
        import asyncio

        max_tokens = self.max_tokens // 4 + (index * 37) % self.max_tokens
        while not self._stop.is_set():
            try:
                await client.completions.create(model=self.model, prompt="the queue grows",
                                                max_tokens=max_tokens,
                                                extra_body={"ignore_eos": True})
                self.finished += 1
            except Exception as exc:
                self.errors.append(repr(exc))
                await asyncio.sleep(0.5)
