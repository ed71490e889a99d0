"""The template variables the dashboards share: data source, job, instance, model, gpu."""

from __future__ import annotations

from typing import Any

from .grafana import custom_variable, datasource_variable, query_variable


def scope_variables(source: str) -> list[dict[str, Any]]:
    """datasource, job and instance; `source` is the family whose series define them."""
    return [
        datasource_variable(),
        query_variable("job", "Job", f"label_values({source}, job)"),
        query_variable("instance", "Instance", f'label_values({source}{{job=~"$job"}}, instance)'),
    ]


def model_variable() -> dict[str, Any]:
    return query_variable(
        "model", "Model", 'label_values(vllm_engine_up{job=~"$job", instance=~"$instance"}, model)')


def gpu_variable() -> dict[str, Any]:
    return query_variable(
        "gpu", "GPU", 'label_values(vllm_gpu_up{job=~"$job", instance=~"$instance"}, gpu)')


def slo_variables() -> list[dict[str, Any]]:
    return [
        custom_variable("slo_target", "Latency SLO target", ["0.99", "0.995", "0.999", "0.95"],
                        "The target of the latency objectives (slo.objectives[].target in the "
                        "daemon's config): the burn rate divides the bad fraction by 1 - target."),
        custom_variable("error_target", "Error SLO target", ["0.999", "0.9999", "0.99"],
                        "slo.error_target in the daemon's config."),
    ]
