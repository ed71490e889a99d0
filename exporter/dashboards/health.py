"""Exporter health: the daemon's own metrics (scrapes, stat logger cost, errors, GPU collector,
alert evaluation and notifications)."""

from __future__ import annotations

from .grafana import Dashboard, Row, Target, stat, table, timeseries
from .queries import SCOPE, quantile, rate, ratio_or_zero, sel, sum_by
from .variables import scope_variables

BY_TARGET = ("instance",)


def _per(numerator: str, denominator: str) -> str:
    """Rate of one counter per unit of another, per scrape target (e.g. seconds per call)."""
    return (f"{sum_by(BY_TARGET, rate(numerator, SCOPE))} / "
            f"{sum_by(BY_TARGET, rate(denominator, SCOPE))}")


def _daemon() -> Row:
    return Row("Daemon", [
        table("Build", "The exporter's version and the versions it runs with.",
              [Target(sel("vllm_exporter_build_info", SCOPE), instant=True, format="table")],
              width=12, height=5, hide=("Time", "__name__", "Value")),
        stat("Scrape target up", "Prometheus's own `up` for the metrics port.", "bool_yes_no",
             [Target(sel("up", SCOPE), "{{instance}}")], width=4, height=5,
             thresholds=[(None, "red"), (1, "green")]),
        stat("Engine up", "1 while the engine serves.", "bool_yes_no",
             [Target(sel("vllm_engine_up", SCOPE), "{{model}}")], width=4, height=5,
             thresholds=[(None, "red"), (1, "green")]),
        stat("Collectors up", "1 while each collector works (gpu: NVML answers for every GPU).",
             "bool_yes_no", [Target(sel("vllm_exporter_collector_up", SCOPE),
                                    "{{collector}} {{instance}}")], width=4, height=5,
             thresholds=[(None, "red"), (1, "green")]),
    ])


def _collection() -> Row:
    scrape = "vllm_exporter_scrape_duration_seconds"
    return Row("Collection cost", [
        timeseries("Metrics scrape duration", "p50/p99 time to render /metrics (our "
                   "histogram), and Prometheus's whole scrape.", "s", [
                       Target(quantile(0.5, scrape, SCOPE, by=BY_TARGET), "p50 {{instance}}"),
                       Target(quantile(0.99, scrape, SCOPE, by=BY_TARGET), "p99 {{instance}}"),
                       Target(sel("scrape_duration_seconds", SCOPE),
                              "Prometheus scrape {{instance}}")]),
        timeseries("Stat logger cost", "Share of vLLM's event loop spent in our stat logger "
                   "(seconds per second).", "percentunit",
                   [Target(sum_by(BY_TARGET, rate("vllm_exporter_stat_logger_seconds_total",
                                                  SCOPE)), "{{instance}}")]),
        timeseries("Stat logger time per record", "Mean time of one record() call.", "s", [
            Target(_per("vllm_exporter_stat_logger_seconds_total",
                        "vllm_exporter_stat_logger_records_total"), "{{instance}}")]),
        timeseries("GPU collection tick", "Wall time of the last NVML collection tick, and the "
                   "age of the last tick in which every GPU answered.", "s", [
                       Target(sel("vllm_exporter_gpu_collect_duration_seconds", SCOPE),
                              "tick {{instance}}"),
                       Target(f"time() - "
                              f"{sel('vllm_exporter_gpu_last_success_timestamp_seconds', SCOPE)}",
                              "since last success {{instance}}")],
                   no_value="no GPU read yet (no NVML or no GPU)"),
        timeseries("Scrapes by path and code", "Requests to the metrics port.", "reqps",
                   [Target(sum_by(("path", "code"), rate("vllm_exporter_scrapes_total", SCOPE)),
                           "{{path}} {{code}}")]),
        timeseries("Idle resets", "Engine-state gauges reset to 0 because the engine went idle, "
                   "per second.", "ops",
                   [Target(sum_by(BY_TARGET, rate("vllm_exporter_idle_resets_total", SCOPE)),
                           "{{instance}}")]),
    ])


def _errors() -> Row:
    return Row("Errors", [
        timeseries("Exporter errors", "Errors caught inside the exporter per second, by "
                   "component (the component keeps running).", "cps",
                   [Target(sum_by(("component",), rate("vllm_exporter_errors_total", SCOPE)),
                           "{{component}}")], width=12, no_value="0"),
        timeseries("NVML call errors", "Failed NVML calls per second, by function "
                   "(NotSupported excluded).", "cps",
                   [Target(sum_by(("instance", "call"),
                                  rate("vllm_exporter_gpu_errors_total", SCOPE)),
                           "{{call}} {{instance}}")], width=12, no_value="0"),
    ])


def _alerting() -> Row:
    evaluations = rate("vllm_exporter_alert_evaluations_total", SCOPE)
    return Row("Alert evaluation and notifications", collapsed=True, panels=[
        timeseries("Rule states in the daemon", "Each rule's state in the daemon's evaluator: "
                   "0 inactive, 1 pending, 2 firing.", "short",
                   [Target(f"max by (alertname) "
                           f"({sel('vllm_exporter_alert_rule_state', SCOPE)})",
                           "{{alertname}}")], max_value=2),
        timeseries("Evaluation cost", "Seconds spent evaluating the rules per evaluation tick.",
                   "s", [Target(_per("vllm_exporter_alert_evaluation_seconds_total",
                                     "vllm_exporter_alert_evaluations_total"), "{{instance}}")]),
        timeseries("Evaluation failures", "Rule evaluations that raised an error, per "
                   "evaluation tick (0 when every rule evaluates).", "short",
                   [Target(ratio_or_zero(
                       sum_by(BY_TARGET, rate("vllm_exporter_alert_evaluation_failures_total",
                                              SCOPE)),
                       sum_by(BY_TARGET, evaluations)), "{{instance}}")]),
        timeseries("Notifications sent, failed, dropped", "Alerts delivered to, failed at, and "
                   "dropped before each Alertmanager, per second (no data without "
                   "alerts.alertmanager.urls).", "ops", [
                       Target(sum_by(("alertmanager",), rate(
                           f"vllm_exporter_alert_notifications_{what}_total", SCOPE)),
                           f"{what} {{{{alertmanager}}}}")
                       for what in ("sent", "failed", "dropped")], width=12,
                   no_value="no Alertmanager"),
        timeseries("Notification queue", "Alerts waiting to be delivered to each Alertmanager.",
                   "short", [Target(sum_by(("alertmanager",),
                                           sel("vllm_exporter_alert_queue_length", SCOPE)),
                                    "{{alertmanager}}")], width=12, no_value="no Alertmanager"),
    ])


def dashboard() -> Dashboard:
    return Dashboard(
        uid="vllm-exporter-health", title="vLLM / Exporter health",
        description="The exporter's own health: scrapes, collectors, errors, alerting.",
        rows=[_daemon(), _collection(), _errors(), _alerting()],
        variables=scope_variables("vllm_exporter_build_info"),
        file_name="exporter-health.json")
