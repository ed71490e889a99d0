"""Overview: traffic, latency percentiles and heatmaps, SLOs, alerts firing, tuning advice."""

from __future__ import annotations

from .grafana import Dashboard, Panel, Row, Target, heatmap, stat, table, timeseries
from .queries import (ENGINE, PERCENTILES, SCOPE, buckets, increase, quantile, rate,
                      ratio_or_zero, sel, sum_by)
from .variables import model_variable, scope_variables, slo_variables

TOKENS_PER_SECOND = "suffix: tok/s"
BURN = "suffix:x"
FIRING_ALERTS = 'ALERTS{alertstate="firing", alertname=~"Vllm.*"}'
RULE_STATE = sel("vllm_exporter_alert_rule_state", SCOPE)


def _percentiles(title: str, description: str, histogram: str) -> Panel:
    targets = [Target(quantile(q, histogram, ENGINE), f"p{q * 100:g} {{{{model}}}}")
               for q in PERCENTILES]
    return timeseries(title, description, "s", targets)


def _finished(*extra: str, window: str = "$__rate_interval") -> str:
    return sum_by(("model",), rate("vllm_requests_finished_total", ENGINE, *extra, window=window))


def _slo(result: str | None, window: str) -> str:
    extra = (f'result="{result}"',) if result else ()
    return sum_by(("model", "objective"), rate("vllm_slo_requests_total", ENGINE, *extra,
                                               window=window))


def _latency_burn(window: str) -> str:
    return f"({_slo('bad', window)} / {_slo(None, window)}) / (1 - $slo_target)"


def _error_burn(window: str) -> str:
    errors = _finished('finish_reason="error"', window=window)
    return f"{ratio_or_zero(errors, _finished(window=window))} / (1 - $error_target)"


def _traffic() -> Row:
    return Row("Traffic", [
        timeseries("Request rate", "Requests finished per second (every finish reason).",
                   "reqps", [Target(_finished(), "{{model}}")]),
        timeseries("Token throughput", "Prompt tokens prefilled and tokens generated per second.",
                   TOKENS_PER_SECOND, [
                       Target(sum_by(("model",), rate("vllm_prompt_tokens_total", ENGINE)),
                              "prompt {{model}}"),
                       Target(sum_by(("model",), rate("vllm_generation_tokens_total", ENGINE)),
                              "generation {{model}}")]),
        timeseries("Finish reasons", "Finished requests per second by finish reason: stop (EOS "
                   "or stop string), length (max_tokens), abort, error.", "reqps",
                   [Target(sum_by(("finish_reason",),
                                  rate("vllm_requests_finished_total", ENGINE)),
                           "{{finish_reason}}")], stack=True),
        timeseries("Error ratio", "Share of finished requests that ended in error or an engine "
                   "abort (VllmHighErrorRatio alerts on the same ratio over 5m).", "percentunit",
                   [Target(ratio_or_zero(_finished('finish_reason=~"error|abort"'), _finished()),
                           "{{model}}")], max_value=1),
        stat("Alerts firing", "Alerts of this exporter's rules firing in Prometheus (ALERTS).",
             "short", [Target(f"count({FIRING_ALERTS}) or vector(0)", "firing")],
             thresholds=[(None, "green"), (1, "red")]),
        stat("Rules firing in the daemon", "Rules the daemon's own evaluator has firing "
             "(vllm_exporter_alert_rule_state == 2).", "short",
             [Target(f"count({RULE_STATE} == 2) or vector(0)", "firing")],
             thresholds=[(None, "green"), (1, "red")]),
        table("Firing alerts", "Every firing alert of this exporter's rules, with its labels, "
              "as Prometheus evaluates them (empty when none fires, and when the rules of "
              "deploy/prometheus/rules are not loaded in Prometheus: see docs/alerts.md).",
              [Target(FIRING_ALERTS, instant=True, format="table")],
              width=8, height=4, hide=("Time", "__name__", "Value", "alertstate"),
              no_value="none firing (or rules not loaded)"),
    ])


def _latency() -> Row:
    return Row("Latency", [
        _percentiles("Time to first token", "p50, p95 and p99 of the time from arrival to the "
                     "first generated token.", "vllm_time_to_first_token_seconds"),
        _percentiles("Inter-token latency", "p50, p95 and p99 of the gap between two output "
                     "tokens of a request.", "vllm_inter_token_latency_seconds"),
        _percentiles("End-to-end latency", "p50, p95 and p99 of the time from arrival to the "
                     "last token, finished requests.", "vllm_e2e_request_latency_seconds"),
        heatmap("Time to first token (distribution)", "Requests per second in each "
                "time-to-first-token bucket.", "s",
                buckets("vllm_time_to_first_token_seconds", ENGINE)),
        heatmap("Inter-token latency (distribution)", "Tokens per second in each inter-token "
                "latency bucket.", "s", buckets("vllm_inter_token_latency_seconds", ENGINE)),
        heatmap("End-to-end latency (distribution)", "Finished requests per second in each "
                "end-to-end latency bucket.", "s",
                buckets("vllm_e2e_request_latency_seconds", ENGINE)),
    ])


def _slos() -> Row:
    good_range = _slo_increase("good")
    return Row("Service level objectives", [
        stat("SLO attainment (dashboard range)", "Share of requests that met each latency "
             "objective over the dashboard's time range (judged per request against the exact "
             "threshold).", "percentunit",
             [Target(f"{good_range} / {_slo_increase(None)}", "{{objective}} {{model}}")],
             width=6, height=8, thresholds=[(None, "red"), (0.99, "green")]),
        timeseries("SLO attainment", "Share of requests meeting each objective, per rate "
                   "interval.", "percentunit",
                   [Target(f"{_slo('good', '$__rate_interval')} / "
                           f"{_slo(None, '$__rate_interval')}", "{{objective}} {{model}}")],
                   width=6, max_value=1),
        timeseries("Latency SLO burn rate", "How many times faster than allowed each latency "
                   "objective spends its error budget, over 1h and 5m (the fast-burn alert pair "
                   "fires when both exceed 14.4). Set the target with the variable.", BURN,
                   [Target(_latency_burn("1h"), "{{objective}} 1h"),
                    Target(_latency_burn("5m"), "{{objective}} 5m")], width=6),
        timeseries("Error SLO burn rate", "Error-budget burn rate of the error SLO (finish "
                   "reason error), over 1h and 5m.", BURN,
                   [Target(_error_burn("1h"), "errors 1h {{model}}"),
                    Target(_error_burn("5m"), "errors 5m {{model}}")], width=6),
    ])


def _slo_increase(result: str | None) -> str:
    extra = (f'result="{result}"',) if result else ()
    return sum_by(("model", "objective"),
                  increase("vllm_slo_requests_total", ENGINE, *extra, window="$__range"))


ADVICE_KEY = "job, instance, model, rule, parameter"
ADVICE_LABELS = "action, throughput, latency, memory, confidence"
# The suggested value with the advice's labels; one row reading rule="none" while every rule is
# silent (a table with no rows cannot tell "no advice" from "no advisor").
CURRENT_ADVICE = (f"({sel('vllm_advice_suggested_value', ENGINE)} * on({ADVICE_KEY}) "
                  f"group_left({ADVICE_LABELS}) {sel('vllm_advice_info', ENGINE)}) "
                  'or on() label_replace(vector(0), "rule", "none", "", "")')
DAY = 86400  # time-to-saturation panels cap +Inf ("not growing") at one day


def _advice() -> Row:
    return Row("Tuning advice (never applied)", [
        stat("Advice now", "Pieces of tuning advice the daemons give now "
             "(vllm_advice_info). Details and evidence: the daemon's /advice page or "
             "`vllm-exporter advise`.", "short",
             [Target(f"count({sel('vllm_advice_info', ENGINE)}) or vector(0)", "advice")],
             width=4, thresholds=[(None, "green"), (1, "yellow")]),
        table("Current advice", "Each piece of advice: the engine setting (parameter), the "
              "action, the expected effect on throughput, latency and memory, the confidence, "
              "and the suggested value (Value). The current value is "
              "vllm_advice_current_value; nothing is applied automatically. A row with rule "
              "none: every rule is silent.", [Target(CURRENT_ADVICE, instant=True,
                                                     format="table")],
              width=20, height=6, hide=("Time", "__name__", "job")),
        timeseries("Rules with advice", "1 while a rule of advice speaks for the model "
                   "(vllm_advice_rule_active), per rule.", "short",
                   [Target(sum_by(("rule",), sel("vllm_advice_rule_active", ENGINE)),
                           "{{rule}}")], width=8, stack=True),
        timeseries("KV-cache headroom", "KV-cache tokens left now, and how many requests of "
                   "the advisor window's mean context they hold.", "short", [
                       Target(sum_by(("model",), sel("vllm_forecast_kv_cache_headroom_tokens",
                                                      ENGINE)), "tokens {{model}}"),
                       Target(sum_by(("model",), sel("vllm_forecast_kv_cache_headroom_requests",
                                                      ENGINE)), "requests {{model}}")],
                   width=8),
        timeseries("Time to saturation", "At the growth over the advisor's window: seconds "
                   "until the KV cache is full and until the running batch reaches "
                   "max_num_seqs (then requests queue). 0: saturated now; capped at one day "
                   "(not growing).", "s", [
                       Target(f"clamp_max({sel('vllm_forecast_kv_cache_full_seconds', ENGINE)}, "
                              f"{DAY})", "KV cache {{model}}"),
                       Target(f"clamp_max({sel('vllm_forecast_batch_full_seconds', ENGINE)}, "
                              f"{DAY})", "batch {{model}}")], width=8),
    ])


def dashboard() -> Dashboard:
    return Dashboard(
        uid="vllm-exporter-overview", title="vLLM / Overview",
        description="Traffic, latency, SLOs, alerts and tuning advice of the vLLM engines "
                    "vllm-exporter runs.",
        rows=[_traffic(), _latency(), _slos(), _advice()],
        variables=scope_variables("vllm_exporter_build_info") + [model_variable()]
        + slo_variables(),
        file_name="overview.json")
