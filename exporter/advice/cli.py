"""`vllm-exporter advise`: print a running daemon's tuning advice readably.

Three sources: the daemon's /advice page (default); its /metrics sampled here for --sample
seconds with the rules run locally (for a daemon whose advisor is off, or a window of your
choosing); or a Prometheus server that scrapes daemons (--prometheus: the vllm_advice_*
series of every daemon it scrapes; the evidence stays on each daemon's /advice page).
Exit codes: 0 done (with or without advice), 2 bad input or a source not reachable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


from .advisor import Advisor, results_json
from .config import AdviceConfig
from ..tuning.daemon_view import Snapshot
from .readings import Reading, read

EPILOG = """examples:
  vllm-exporter advise                                   # the daemon on 127.0.0.1:9410
  vllm-exporter advise --daemon http://10.0.0.5:9410 --json
  vllm-exporter advise --sample 120 --interval 2         # sample /metrics here, run the rules
  vllm-exporter advise --prometheus http://prometheus:9090
"""
DEFAULT_DAEMON = "http://127.0.0.1:9410"


class SourceError(Exception):
    pass


def add_advise_parser(sub) -> None:
    p = sub.add_parser("advise", help="tuning advice from a running daemon (never applied)",
                       description="Print the tuning advice a running daemon reads from its "
                       "live metrics: setting, current and suggested value, expected effect, "
                       "evidence, confidence. Nothing is applied.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--daemon", default=DEFAULT_DAEMON, metavar="URL",
                   help=f"the daemon's metrics port ({DEFAULT_DAEMON}; a /metrics URL works too)")
    p.add_argument("--prometheus", metavar="URL",
                   help="read the vllm_advice_* series of every daemon a Prometheus scrapes")
    p.add_argument("--sample", type=float, metavar="SECONDS",
                   help="sample the daemon's /metrics for this long and run the rules here")
    p.add_argument("--interval", type=float, default=2.0,
                   help="seconds between samples with --sample (2)")
    p.add_argument("--min-requests", type=int, default=AdviceConfig.min_requests,
                   help="finished requests a window needs before request-based rules speak "
                        f"({AdviceConfig.min_requests}; with --sample)")
    p.add_argument("--json", action="store_true", help="print JSON")


def run_advise(args) -> int:
    try:
        if args.prometheus:
            body = from_prometheus(args.prometheus)
        elif args.sample is not None:
            if args.sample <= 0 or args.interval <= 0 or args.sample < args.interval:
                raise SourceError("--sample and --interval must be > 0, --sample >= --interval")
            body = sample_daemon(metrics_url(args.daemon), args.sample, args.interval,
                                 args.min_requests)
        else:
            body = from_daemon(args.daemon)
    except SourceError as exc:
        print(f"vllm-exporter advise: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(body, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_advice(body))
    return 0


# --- sources -----------------------------------------------------------------------------------

def _base(url: str) -> str:
    return url.rstrip("/").removesuffix("/metrics").removesuffix("/advice")


def metrics_url(daemon: str) -> str:
    return _base(daemon) + "/metrics"


def _get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise SourceError(f"{url} is not reachable: {getattr(exc, 'reason', exc)}") from None


def from_daemon(daemon: str) -> dict:
    status, body = _get(_base(daemon) + "/advice")
    if status == 404:
        raise SourceError(f"{_base(daemon)} has no /advice page (advice.enabled is false, or "
                          "an older daemon): run with --sample SECONDS to sample its /metrics")
    if status != 200:
        raise SourceError(f"{_base(daemon)}/advice answered {status}")
    return json.loads(body)


def scrape_reading(url: str) -> Reading:
    status, body = _get(url)
    if status != 200:
        raise SourceError(f"{url} answered {status}")
    return read(time.time(), Snapshot(body.decode()).all_samples())


def sample_daemon(url: str, seconds: float, interval: float, min_requests: int,
                  progress: bool = True) -> dict:
    """Sample `url` every `interval` s for `seconds` s and run the rules over that window."""
    settings = AdviceConfig(interval_seconds=interval, window_seconds=seconds + interval,
                            min_requests=min_requests)
    advisor = Advisor(settings)
    deadline = time.monotonic() + seconds
    while True:
        advisor.add(scrape_reading(url))
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if progress and sys.stderr.isatty():
            print(f"\rsampling {url}: {left:4.0f} s left", end="", file=sys.stderr)
        time.sleep(min(interval, left))
    if progress and sys.stderr.isatty():
        print(file=sys.stderr)
    return results_json(advisor.evaluate(), settings, time.time())


def from_prometheus(base: str) -> dict:
    def query(expr: str) -> list[dict]:
        url = base.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, body = _get(url)
        if status != 200:
            raise SourceError(f"{url} answered {status}: {body[:200]!r}")
        return json.loads(body)["data"]["result"]

    def values(name: str) -> dict[tuple, float]:
        return {_key(r["metric"]): float(r["value"][1]) for r in query(name)}

    current, suggested = values("vllm_advice_current_value"), values("vllm_advice_suggested_value")
    models: dict[tuple, dict] = {}
    for r in query("vllm_advice_info"):
        m = r["metric"]
        where = (m.get("instance", ""), m.get("model", ""))
        model = models.setdefault(where, {"model": m.get("model"), "instance": m.get("instance"),
                                          "advice": []})
        model["advice"].append({
            "rule": m.get("rule"), "parameter": m.get("parameter"), "action": m.get("action"),
            "current": current.get(_key(m)), "suggested": suggested.get(_key(m)),
            "effect": {k: m.get(k) for k in ("throughput", "latency", "memory")},
            "confidence": m.get("confidence"), "summary": "", "evidence": []})
    return {"source": base, "applied": False, "models": list(models.values())}


def _key(metric: dict) -> tuple:
    return tuple(metric.get(k) for k in ("instance", "model", "rule", "parameter"))


# --- output ------------------------------------------------------------------------------------

def format_advice(body: dict) -> str:
    lines = []
    for model in body.get("models", []):
        where = f" on {model['instance']}" if model.get("instance") else ""
        window = (f" (window {model['window_seconds']:g} s)"
                  if model.get("window_seconds") is not None else "")
        lines.append(f"model {model['model']}{where}{window}: "
                     f"{len(model['advice']) or 'no'} piece(s) of advice")
        for a in model["advice"]:
            effect = ", ".join(f"{k} {v}" for k, v in a["effect"].items())
            lines.append(f"  [{a['confidence']}] {a['parameter']}: {_fmt(a['current'])} -> "
                         f"{_fmt(a['suggested'])} ({a['action']}; {effect})  rule {a['rule']}")
            if a.get("summary"):
                lines.append(f"      {a['summary']}")
            for e in a.get("evidence", []):
                span = (f"over {e['window_seconds']:g} s" if e["window_seconds"] else "now")
                note = f", {e['note']}" if e.get("note") else ""
                lines.append(f"      evidence: {e['series']} = {_fmt(e['value'])} ({span}{note})")
        forecast = model.get("forecast") or {}
        if forecast:
            lines.append("  forecast: " + ", ".join(f"{k} {_fmt(v)}" for k, v in
                                                     forecast.items()))
        if model.get("energy_per_output_token_joules") is not None:
            lines.append(f"  energy per output token: "
                         f"{_fmt(model['energy_per_output_token_joules'])} J")
    if not lines:
        lines.append("no model seen yet (no engine statistics in the window)")
    lines.append("advice is never applied: change the settings yourself and restart the engine")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.4g}"
