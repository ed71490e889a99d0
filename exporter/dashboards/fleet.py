"""Fleet: each model across every replica, the spread between replicas, the replicas furthest
from the objectives, and links down to one replica's own dashboards.

The queries read the replicas' raw series (buckets summed per model before the quantile, as
the fleet recording rules do: exporter/alerts/fleet.py), so the dashboard works whether or not
Prometheus loads the rules. The instance variable narrows the fleet; "All" is every replica.
"""

from __future__ import annotations

from typing import Any

from .grafana import Dashboard, Panel, Row, Target, stat, table, timeseries
from .queries import ENGINE, PERCENTILES, quantile, rate, ratio_or_zero, sel, sum_by
from .variables import model_variable, scope_variables, slo_variables

REPLICA = ("job", "instance", "model")  # the labels that name one replica's engine
WORST = 5  # replicas listed in each "furthest from the objective" table
TOKENS_PER_SECOND = "suffix: tok/s"
BURN = "suffix:x"
LATENCIES = (
    ("Time to first token", "vllm_time_to_first_token_seconds"),
    ("Inter-token latency", "vllm_inter_token_latency_seconds"),
    ("Time per output token", "vllm_time_per_output_token_seconds"),
    ("End-to-end latency", "vllm_e2e_request_latency_seconds"),
)
# Drill-down: one replica's own dashboards, with its job, instance and model selected.
DRILL_DOWN = (("Engine", "vllm-exporter-engine"), ("Overview", "vllm-exporter-overview"),
              ("Exporter health", "vllm-exporter-health"))


def _links(field: str) -> list[dict[str, Any]]:
    """Data links to a replica's dashboards; `field` reads a label: `__field.labels` for a
    time series, `__data.fields` for a table row."""
    query = "&".join(f"var-{name}=${{{field}.{name}}}" for name in REPLICA)
    return [{"title": f"{title} dashboard of ${{{field}.instance}}",
             "url": f"/d/{uid}?{query}&${{__url_time_range}}", "targetBlank": False}
            for title, uid in DRILL_DOWN]


def _with_links(panel: Panel, field: str) -> Panel:
    panel.defaults["links"] = _links(field)
    return panel


BAD, ERROR = 'result="bad"', 'finish_reason="error"'


def _finished(by: tuple[str, ...], *extra: str) -> str:
    return sum_by(by, rate("vllm_requests_finished_total", ENGINE, *extra))


def _error_ratio(by: tuple[str, ...]) -> str:
    return ratio_or_zero(_finished(by, ERROR), _finished(by))


def _slo_burn(by: tuple[str, ...]) -> str:
    def slo(*extra: str) -> str:
        return sum_by(by + ("objective",), rate("vllm_slo_requests_total", ENGINE, *extra))
    return f"({slo(BAD)} / {slo()}) / (1 - $slo_target)"


def _replica_quantile(q: float, histogram: str) -> str:
    return quantile(q, histogram, ENGINE, by=REPLICA)


def _fleet() -> Row:
    by_model = ("model",)
    panels = [
        stat("Replicas serving", "Replicas whose engine serves each model (vllm_engine_up summed "
             "over the fleet).", "short",
             [Target(sum_by(by_model, sel("vllm_engine_up", ENGINE)), "{{model}}")]),
        stat("Fleet request rate", "Requests finished per second by every replica together.",
             "reqps", [Target(_finished(by_model), "{{model}}")]),
        stat("Fleet error ratio", "Share of the fleet's finished requests that ended in error.",
             "percentunit", [Target(_error_ratio(by_model), "{{model}}")]),
        stat("Fleet KV-cache usage (mean)", "KV-cache usage averaged over the replicas.",
             "percentunit",
             [Target(f"avg by (model) ({sel('vllm_kv_cache_usage_ratio', ENGINE)})",
                     "{{model}}")]),
        stat("Fleet queue", "Requests waiting to be scheduled, summed over the replicas.",
             "short", [Target(sum_by(by_model, sel("vllm_requests_waiting", ENGINE)),
                              "{{model}}")]),
        stat("Fleet running", "Requests in the replicas' running batches, summed.", "short",
             [Target(sum_by(by_model, sel("vllm_requests_running", ENGINE)), "{{model}}")]),
        timeseries("Fleet requests and errors", "Requests finished per second across the "
                   "fleet, and those that ended in error.", "reqps", [
                       Target(_finished(by_model), "requests {{model}}"),
                       Target(f"{_finished(by_model, ERROR)} or {_finished(by_model)} * 0",
                              "errors {{model}}")]),
        timeseries("Fleet token throughput", "Prompt tokens prefilled and tokens generated per "
                   "second by every replica together.", TOKENS_PER_SECOND, [
                       Target(sum_by(by_model, rate("vllm_prompt_tokens_total", ENGINE)),
                              "prompt {{model}}"),
                       Target(sum_by(by_model, rate("vllm_generation_tokens_total", ENGINE)),
                              "generation {{model}}")]),
        timeseries("Fleet KV-cache usage", "KV-cache usage of each model: the mean over the "
                   "replicas and the fullest replica.", "percentunit", [
                       Target(f"avg by (model) ({sel('vllm_kv_cache_usage_ratio', ENGINE)})",
                              "mean {{model}}"),
                       Target(f"max by (model) ({sel('vllm_kv_cache_usage_ratio', ENGINE)})",
                              "fullest replica {{model}}")], max_value=1),
        timeseries("Fleet queue depth", "Requests waiting and running, summed over the "
                   "replicas.", "short", [
                       Target(sum_by(by_model, sel("vllm_requests_waiting", ENGINE)),
                              "waiting {{model}}"),
                       Target(sum_by(by_model, sel("vllm_requests_running", ENGINE)),
                              "running {{model}}")]),
    ]
    for title, histogram in LATENCIES:
        panels.append(timeseries(
            f"Fleet {title.lower()}", f"p50/p95/p99 of {title.lower()} over every replica: "
            f"buckets summed per model first, then the quantile (replicas' own quantiles "
            f"cannot be averaged).", "s",
            [Target(quantile(q, histogram, ENGINE), f"p{q * 100:g} {{{{model}}}}")
             for q in PERCENTILES], width=12))
    return Row("Each model across the fleet", panels)


def _slo() -> Row:
    return Row("SLOs across the fleet", [
        timeseries("Fleet latency SLO burn rate", "Bad fraction of each latency objective over "
                   "the whole fleet, divided by the error budget (1 - $slo_target): above 1 the "
                   "fleet spends its budget too fast.", BURN,
                   [Target(_slo_burn(("model",)), "{{model}} {{objective}}")], width=12),
        timeseries("Fleet error SLO burn rate", "The fleet's error ratio divided by the error "
                   "budget (1 - $error_target).", BURN,
                   [Target(f"{_error_ratio(('model',))} / (1 - $error_target)", "{{model}}")],
                   width=12),
    ])


def _spread() -> Row:
    field = "__field.labels"
    return Row("Replicas side by side (click a line for its dashboards)", [
        _with_links(timeseries(
            "p95 time to first token per replica", "Each replica's own p95: a replica far above "
            "the others is the one to look at.", "s",
            [Target(_replica_quantile(0.95, "vllm_time_to_first_token_seconds"),
                    "{{instance}} {{model}}")]), field),
        _with_links(timeseries(
            "p95 inter-token latency per replica", "Each replica's own p95 inter-token latency.",
            "s", [Target(_replica_quantile(0.95, "vllm_inter_token_latency_seconds"),
                         "{{instance}} {{model}}")]), field),
        _with_links(timeseries(
            "Requests per replica", "Requests finished per second by each replica: how evenly "
            "the load balancer spreads the traffic.", "reqps",
            [Target(_finished(REPLICA), "{{instance}} {{model}}")]), field),
        _with_links(timeseries(
            "KV-cache usage per replica", "Each replica's KV-cache usage (its fullest engine).",
            "percentunit",
            [Target(f"max by (job, instance, model) ({sel('vllm_kv_cache_usage_ratio', ENGINE)})",
                    "{{instance}} {{model}}")], max_value=1), field),
        _with_links(timeseries(
            "Waiting requests per replica", "Requests waiting to be scheduled on each replica.",
            "short", [Target(sum_by(REPLICA, sel("vllm_requests_waiting", ENGINE)),
                             "{{instance}} {{model}}")]), field),
        _with_links(timeseries(
            "Generated tokens per replica", "Tokens generated per second by each replica.",
            TOKENS_PER_SECOND,
            [Target(sum_by(REPLICA, rate("vllm_generation_tokens_total", ENGINE)),
                    "{{instance}} {{model}}")]), field),
    ])


def _worst_table(title: str, description: str, unit: str, expr: str) -> Panel:
    panel = table(title, description, [Target(expr, instant=True, format="table")], unit=unit,
                  width=8, height=7, hide=("Time", "__name__"))
    return _with_links(panel, "__data.fields")


def _worst() -> Row:
    return Row("Replicas furthest from the objectives (click a row for its dashboards)", [
        _worst_table("Slowest first tokens (p95)", f"The {WORST} replicas with the highest p95 "
                     "time to first token now.", "s",
                     f"topk({WORST}, "
                     f"{_replica_quantile(0.95, 'vllm_time_to_first_token_seconds')})"),
        _worst_table("Slowest decoding (p95 inter-token)", f"The {WORST} replicas with the "
                     "highest p95 inter-token latency now.", "s",
                     f"topk({WORST}, "
                     f"{_replica_quantile(0.95, 'vllm_inter_token_latency_seconds')})"),
        _worst_table("Most latency budget spent", f"The {WORST} replicas (and objectives) whose "
                     "bad fraction is the largest multiple of the error budget "
                     "(1 - $slo_target).", BURN, f"topk({WORST}, {_slo_burn(REPLICA)})"),
        _worst_table("Highest error ratio", f"The {WORST} replicas with the largest share of "
                     "requests ending in error.", "percentunit",
                     f"topk({WORST}, {_error_ratio(REPLICA)})"),
        _worst_table("Fullest KV caches", f"The {WORST} replicas with the highest KV-cache "
                     "usage now.", "percentunit",
                     f"topk({WORST}, max by (job, instance, model) "
                     f"({sel('vllm_kv_cache_usage_ratio', ENGINE)}))"),
        _worst_table("Least throughput", f"The {WORST} replicas generating the fewest tokens "
                     "per second (a stuck or starved replica).", TOKENS_PER_SECOND,
                     f"bottomk({WORST}, "
                     f"{sum_by(REPLICA, rate('vllm_generation_tokens_total', ENGINE))})"),
    ])


def _replicas() -> Row:
    return Row("Every replica", [
        _worst_table("Replicas", "Every replica of the selected models, 1 while its engine "
                     "serves; click a row for that replica's dashboards.", "short",
                     sum_by(REPLICA, sel("vllm_engine_up", ENGINE))),
    ])


def dashboard() -> Dashboard:
    replicas = _replicas()
    replicas.panels[0].width = 24
    return Dashboard(
        uid="vllm-exporter-fleet", title="vLLM / Fleet",
        description="Each model across every replica, the replicas furthest from the "
                    "objectives, and links to one replica's dashboards.",
        rows=[_fleet(), _slo(), _spread(), _worst(), replicas],
        variables=scope_variables("vllm_exporter_build_info") + [model_variable()]
        + slo_variables(),
        file_name="fleet.json")
