"""Fleet-wide recording rules and SLO alerts: one model across every replica Prometheus scrapes.

The daemon evaluates rules over its own series only; a fleet is Prometheus' job. These rules
aggregate per model (`sum by (model)`, quantiles from buckets summed per `le` first, since
quantiles of replicas cannot be averaged) and export with the per-replica rules in a group of
their own (`vllm-exporter rules export`). Names follow Prometheus' `level:metric:operations`
convention: the level is the labels kept (`model`, `model_objective`).

The fleet SLO alerts are the per-replica burn-rate pair (defaults.BURN_WINDOWS) over the
recorded fleet ratios: the error budget burns for the model as a whole, whichever replicas
spend it. They are Prometheus-only (the daemon sees one replica) and carry no `instance`.
"""

from __future__ import annotations

from typing import Any

from ..slo import SloConfig
from .defaults import BURN_WINDOWS, runbook

GROUP_NAME = "vllm-exporter-fleet"
RATE_WINDOW = "5m"
QUANTILES = (0.5, 0.95, 0.99)
# Latency histograms with fleet quantiles; the recorded name keeps the family's name.
LATENCY_HISTOGRAMS = ("vllm_time_to_first_token_seconds", "vllm_inter_token_latency_seconds",
                      "vllm_time_per_output_token_seconds", "vllm_e2e_request_latency_seconds")
ERROR_REASONS = 'finish_reason="error"'


def burn_windows() -> list[str]:
    """Every window a burn-rate alert reads, shortest first."""
    windows = {w for _, long_w, short_w, *_ in BURN_WINDOWS for w in (long_w, short_w)}
    return sorted(windows, key=_seconds)


def _seconds(window: str) -> int:
    return int(window[:-1]) * {"s": 1, "m": 60, "h": 3600}[window[-1]]


def _record(name: str, expr: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"record": name, "expr": expr}
    if labels:
        rule["labels"] = labels
    return rule


def _sum_rate(metric: str, window: str, by: str = "model") -> str:
    return f"sum by ({by}) (rate({metric}[{window}]))"


def recording_rules() -> list[dict[str, Any]]:
    """Every objective's bad fraction is recorded under its `objective` label, so the recorded
    series do not depend on the slo config (the alerts do: each objective's target)."""
    w = RATE_WINDOW
    finished = "vllm_requests_finished_total"
    rules = [
        _record(f"model:vllm_requests:rate{w}", _sum_rate(finished, w)),
        _record(f"model:vllm_request_errors:rate{w}",
                _sum_rate(f"{finished}{{{ERROR_REASONS}}}", w)),
        _record(f"model:vllm_request_errors:ratio_rate{w}",
                f"model:vllm_request_errors:rate{w} / model:vllm_requests:rate{w}"),
        _record(f"model:vllm_prompt_tokens:rate{w}", _sum_rate("vllm_prompt_tokens_total", w)),
        _record(f"model:vllm_generation_tokens:rate{w}",
                _sum_rate("vllm_generation_tokens_total", w)),
    ]
    for histogram in LATENCY_HISTOGRAMS:
        buckets = _sum_rate(f"{histogram}_bucket", w, by="model, le")
        for q in QUANTILES:
            rules.append(_record(f"model:{histogram}:p{q * 100:g}_rate{w}",
                                 f"histogram_quantile({q:g}, {buckets})"))
    rules += [
        _record("model:vllm_kv_cache_usage_ratio:avg",
                "avg by (model) (vllm_kv_cache_usage_ratio)"),
        _record("model:vllm_kv_cache_usage_ratio:max",
                "max by (model) (vllm_kv_cache_usage_ratio)"),
        _record("model:vllm_requests_waiting:sum", "sum by (model) (vllm_requests_waiting)"),
        _record("model:vllm_requests_running:sum", "sum by (model) (vllm_requests_running)"),
        _record("model:vllm_engine_up:sum", "sum by (model) (vllm_engine_up)"),
    ]
    slo_bad, slo_all = 'vllm_slo_requests_total{result="bad"}', "vllm_slo_requests_total"
    for window in burn_windows():
        rules.append(_record(
            f"model_objective:vllm_slo_requests_bad:ratio_rate{window}",
            f"{_sum_rate(slo_bad, window, 'model, objective')} / "
            f"{_sum_rate(slo_all, window, 'model, objective')}"))
        rules.append(_record(
            f"model_objective:vllm_slo_requests_bad:ratio_rate{window}",
            f"{_sum_rate(f'{finished}{{{ERROR_REASONS}}}', window)} / "
            f"{_sum_rate(finished, window)}",
            {"objective": "errors"}))
    return rules


def objectives(slo: SloConfig) -> list[tuple[str, float, str]]:
    """(name, target, meaning) of every SLO the fleet alerts watch, errors last."""
    out = [(o.name, o.target, f"{o.name} under {o.threshold_seconds:g}s for "
                              f"{o.target * 100:g} % of requests") for o in slo.objectives]
    out.append(("errors", slo.error_target,
                f"errors for at most {(1 - slo.error_target) * 100:g} % of requests"))
    return out


def alerting_rules(slo: SloConfig, runbook_base: str | None = None) -> list[dict[str, Any]]:
    rules = []
    for name, target, meaning in objectives(slo):
        camel = "".join(part.capitalize() for part in name.split("_"))
        budget = round(1 - target, 12)
        for speed, long_w, short_w, burn, for_, severity in BURN_WINDOWS:
            alert = f"VllmFleet{camel}SloBurnRate{speed}"

            def burn_rate(window: str) -> str:
                return (f'model_objective:vllm_slo_requests_bad:ratio_rate{window}'
                        f'{{objective="{name}"}} / {budget:g}')

            rules.append({
                "alert": alert,
                "expr": f"{burn_rate(long_w)} > {burn:g} and {burn_rate(short_w)} > {burn:g}",
                "for": for_,
                "labels": {"severity": severity},
                "annotations": {
                    "summary": f"{speed} error-budget burn of the {name} SLO across the "
                               f"{{{{ $labels.model }}}} fleet",
                    "description": f"The {name} SLO ({meaning}) burns its error budget "
                                   f"{{{{ $value | humanize }}}}x too fast over {long_w} (and "
                                   f"over {short_w}) across every replica of "
                                   f"{{{{ $labels.model }}}}; alert above {burn:g}x. The fleet "
                                   f"dashboard shows which replicas spend it.",
                    "runbook_url": runbook(alert, runbook_base),
                },
            })
    return rules


def fleet_group(slo: SloConfig, runbook_base: str | None = None,
                extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    """The fleet rule group as Prometheus reads it; `extra_labels` go on its alerts."""
    alerts = alerting_rules(slo, runbook_base)
    for rule in alerts:
        rule["labels"] = {**(extra_labels or {}), **rule["labels"]}
    return {"name": GROUP_NAME, "rules": recording_rules() + alerts}
