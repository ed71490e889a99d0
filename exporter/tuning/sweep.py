"""`tune batch-size`: sweep client concurrency, pick the fastest point that meets the objective.

Throughput alone always favours the biggest batch; the latency objective is what bounds it.
Every point runs the same workload distribution with its own requests (disjoint request
indices, so one point's prompts are not prefix-cache hits for the next), measured client-side
and from the daemon's histograms for the same period.
"""

from __future__ import annotations

from .bench import run_bench, served_model
from .errors import UsageError
from .loadgen import LoadSpec
from .objective import Objective
from .report import ms, table
from .workload import Workload


def parse_concurrency_list(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise UsageError(f"--concurrency {text!r}: expected comma-separated integers") from None
    if not values or values[0] < 1:
        raise UsageError(f"--concurrency {text!r}: values must be integers >= 1")
    return values


def run_sweep(api_url: str, metrics_url: str, workload: Workload, concurrencies: list[int],
              objectives: list[Objective], *, source: str = "client", rounds: int = 4,
              min_requests: int = 8, warmup: int = 2, model: str | None = None,
              api_key: str | None = None, progress: bool = True) -> dict:
    if source not in ("client", "daemon"):
        raise UsageError(f"--objective-source must be client or daemon, got {source!r}")
    if rounds < 1 or min_requests < 1:
        raise UsageError("--rounds and --min-requests must be >= 1")
    model = model or served_model(api_url, api_key)
    next_index = 0
    if warmup:
        run_bench(api_url, None, workload, LoadSpec(concurrency=1, requests=warmup),
                  model=model, api_key=api_key, progress=progress, label="warm-up",
                  first_index=10**9)  # far from the measured indices
    points = []
    for concurrency in concurrencies:
        requests = max(min_requests, rounds * concurrency)
        report = run_bench(api_url, metrics_url, workload,
                           LoadSpec(concurrency=concurrency, requests=requests), model=model,
                           api_key=api_key, progress=progress,
                           label=f"concurrency {concurrency}", first_index=next_index)
        next_index += requests
        report["concurrency"] = concurrency
        judge(report, objectives, source)
        points.append(report)
    chosen = choose_point(points)
    return {
        "model": model,
        "workload": workload.spec.describe(),
        "objective": {o.name: o.threshold for o in objectives},
        "objective_source": source,
        "points": points,
        "chosen_concurrency": chosen["concurrency"] if chosen else None,
    }


def judge(point: dict, objectives: list[Objective], source: str) -> None:
    """Mark whether a point meets every objective (and had no failed request)."""
    judged = point["client"] if source == "client" else point["daemon"]
    point["objective_values"] = {o.name: o.value(judged) for o in objectives}
    point["meets_objective"] = (point["client"]["requests_failed"] == 0
                                and all(o.met_by(judged) for o in objectives))


def choose_point(points: list[dict]) -> dict | None:
    """The highest output throughput among the points that meet the objective."""
    candidates = [p for p in points if p["meets_objective"]]
    return max(candidates, key=lambda p: p["client"]["output_tokens_per_second"], default=None)


def format_sweep(sweep: dict) -> str:
    rows = []
    for p in sweep["points"]:
        c, d = p["client"], p["daemon"]
        mark = "*" if p["concurrency"] == sweep["chosen_concurrency"] else ""
        rows.append([f"{p['concurrency']}{mark}", c["requests_ok"],
                     round(c["output_tokens_per_second"], 1), round(c["requests_per_second"], 2),
                     ms(c["ttft_seconds"]["p50"]), ms(c["ttft_seconds"]["p95"]),
                     ms(c["ttft_seconds"]["p99"]), ms(d["ttft_seconds"]["p95"]),
                     ms(c["itl_seconds"]["p50"]), ms(c["itl_seconds"]["p95"]),
                     ms(c["itl_seconds"]["p99"]), ms(d["itl_seconds"]["p95"]),
                     "yes" if p["meets_objective"] else "no"])
    headers = ["concurrency", "requests", "out tok/s", "req/s", "TTFT p50", "p95", "p99",
               "daemon p95", "ITL p50", "p95", "p99", "daemon p95", "meets"]
    objective = ", ".join(f"{k} <= {v * 1000:g} ms" for k, v in sweep["objective"].items())
    lines = [f"model {sweep['model']}; latencies in ms; objective ({sweep['objective_source']}"
             f"-side): {objective}", table(headers, rows)]
    if sweep["chosen_concurrency"] is None:
        lines.append("no point meets the objective: relax it, or lower the smallest concurrency")
    else:
        lines.append(f"chosen: concurrency {sweep['chosen_concurrency']} (highest output "
                     "throughput that meets the objective) -> set max_num_seqs near it")
    return "\n".join(lines)
