"""`bench`: one load run, measured client-side and as the daemon's histograms saw it."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

from . import daemon_view
from .errors import UsageError
from .loadgen import LoadSpec, run_load, summarize
from .progress import Progress
from .report import ms, table
from .workload import Workload


def served_model(api_url: str, api_key: str | None = None, timeout: float = 30.0) -> str:
    """The first model the API serves; also proves the API is reachable."""
    request = urllib.request.Request(api_url.rstrip("/") + "/v1/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            models = json.loads(response.read())["data"]
    except urllib.error.HTTPError as exc:
        raise UsageError(f"the daemon's API at {api_url} answered {exc.code} to /v1/models"
                         + (" (wrong or missing --api-key?)" if exc.code == 401 else "")) from None
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UsageError(f"the daemon's API at {api_url} is not reachable: {reason}") from None
    if not models:
        raise UsageError(f"the daemon's API at {api_url} serves no model")
    return models[0]["id"]


def run_bench(api_url: str, metrics_url: str | None, workload: Workload, load: LoadSpec, *,
              model: str | None = None, api_key: str | None = None, progress: bool = True,
              label: str = "bench", first_index: int = 0, settle_timeout: float = 10.0) -> dict:
    """Run `load` once; return the client's summary and (with metrics_url) the daemon's view."""
    model = model or served_model(api_url, api_key)
    before = daemon_view.scrape(metrics_url) if metrics_url else None
    bar = Progress(label, load.requests, enabled=progress)
    result = asyncio.run(run_load(api_url, model, workload, load, api_key=api_key,
                                  progress=bar, first_index=first_index))
    client = summarize(result)
    report = {"model": model, "workload": workload.spec.describe(), "load": load.describe(),
              "client": client}
    if before is not None:
        after = _settled_scrape(metrics_url, before, model, client["requests_ok"],
                                settle_timeout)
        report["daemon"] = daemon_view.period_view(before, after, model)
    return report


def _settled_scrape(metrics_url: str, before, model: str, finished: int, timeout: float):
    """Scrape until the daemon has counted every request the client saw finish.

    The last engine step's statistics reach the stat logger just after the last response, so
    the first scrape can be a step behind.
    """
    deadline = time.monotonic() + timeout
    while True:
        after = daemon_view.scrape(metrics_url)
        seen = daemon_view.period_view(before, after, model)["requests_finished"]
        if seen >= finished or time.monotonic() >= deadline:
            return after
        time.sleep(0.2)


def format_bench(report: dict) -> str:
    client = report["client"]
    daemon = report.get("daemon")
    lines = [f"model {report['model']}: {client['requests_ok']} requests ok, "
             f"{client['requests_failed']} failed, {client['wall_seconds']:.1f} s",
             f"throughput: {client['requests_per_second']:.2f} req/s, "
             f"{client['output_tokens_per_second']:.1f} output tok/s, "
             f"{client['total_tokens_per_second']:.1f} total tok/s", ""]
    rows = []
    for key, name in (("ttft_seconds", "TTFT"), ("itl_seconds", "inter-token"),
                      ("e2e_seconds", "end-to-end")):
        c = client[key]
        d = daemon[key] if daemon else {}
        rows.append([f"{name} (client)", ms(c["p50"]), ms(c["p95"]), ms(c["p99"]), ms(c["mean"])])
        if daemon:
            rows.append([f"{name} (daemon)", ms(d["p50"]), ms(d["p95"]), ms(d["p99"]),
                         ms(d["mean"])])
    lines.append(table(["latency (ms)", "p50", "p95", "p99", "mean"], rows))
    if daemon:
        lines += ["", table(["count", "client", "daemon"], [
            ["requests finished", client["requests_ok"], int(daemon["requests_finished"])],
            ["prompt tokens", client["prompt_tokens"], int(daemon["prompt_tokens"])],
            ["output tokens", client["output_tokens"], int(daemon["generation_tokens"])],
            ["preemptions", None, int(daemon["preemptions"])],
            ["prefix-cache hit tokens", None, int(daemon["prefix_cache_hits"])],
        ])]
        lines.append("(daemon quantiles are interpolated inside histogram buckets)")
    if client["errors"]:
        lines.append("errors: " + "; ".join(client["errors"]))
    return "\n".join(lines)
