"""The metric families the alerting service publishes about itself and its rules."""

from __future__ import annotations

from ..families import FamilySpec

ALERT_FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec("vllm_exporter_alert_rule_state", "gauge",
               "State of each alert rule evaluated in the daemon: 0 inactive, 1 pending, "
               "2 firing (the highest state among the rule's alerts).",
               labels=("alertname", "severity"), source="the in-daemon rule evaluator", where="server"),
    FamilySpec("vllm_exporter_alerts", "gauge",
               "Alerts of each rule by state (pending | firing), as evaluated in the daemon.",
               labels=("alertname", "state"), source="the in-daemon rule evaluator", where="server"),
    FamilySpec("vllm_exporter_alert_evaluations_total", "counter",
               "Evaluation ticks of the alert rules.",
               labels=(), source="the in-daemon rule evaluator", where="server"),
    FamilySpec("vllm_exporter_alert_evaluation_seconds_total", "counter",
               "Wall time spent sampling the registry and evaluating every rule.",
               labels=(), source="the in-daemon rule evaluator", where="server"),
    FamilySpec("vllm_exporter_alert_evaluation_failures_total", "counter",
               "Rule evaluations that raised an error, by rule (the other rules go on).",
               labels=("alertname",), source="the in-daemon rule evaluator", where="server"),
    FamilySpec("vllm_exporter_alert_history_series", "gauge",
               "Series the alert evaluator keeps in its in-memory history.",
               labels=(), source="the in-daemon rule evaluator", where="server"),
    FamilySpec("vllm_exporter_alert_history_samples", "gauge",
               "Samples the alert evaluator keeps in memory, fine and coarse tiers together "
               "(about 40 bytes each); they grow until alerts.fine_history_seconds is full, "
               "then stay flat.",
               labels=(), source="the in-daemon rule evaluator", where="server"),
    FamilySpec("vllm_exporter_alert_notifications_sent_total", "counter",
               "Alerts delivered to Alertmanager (firing, re-sent and resolved), by URL.",
               labels=("alertmanager",), source="the Alertmanager client", where="server"),
    FamilySpec("vllm_exporter_alert_notifications_failed_total", "counter",
               "Alerts in batches whose delivery failed (each retry counts again), by URL.",
               labels=("alertmanager",), source="the Alertmanager client", where="server"),
    FamilySpec("vllm_exporter_alert_notifications_dropped_total", "counter",
               "Alerts dropped without delivery: queue full (oldest first) or rejected by "
               "Alertmanager as invalid, by URL.",
               labels=("alertmanager",), source="the Alertmanager client", where="server"),
    FamilySpec("vllm_exporter_alert_queue_length", "gauge",
               "Alerts waiting to be delivered to each Alertmanager.",
               labels=("alertmanager",), source="the Alertmanager client", where="server"),
)
