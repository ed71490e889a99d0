"""Degradation alerts: rules, in-daemon evaluation, Alertmanager client, PromQL export.

`prepare_alerts(config)` loads and validates the rule file before anything starts (a bad rule
raises ConfigError naming the file, the rule and the field) and returns the `AlertingService`
to start once the runtime is up, or None when alerts are disabled. Modules:
rules.py (schema, validation), defaults.py (the default pack), expr.py (expressions: PromQL
text and in-daemon evaluation), promfuncs.py (Prometheus's rate maths; histogram_quantile
is ../quantile.py),
history.py (in-memory samples), evaluator.py (alert states), alertmanager.py (the client),
service.py (the thread tying them together), hooks.py (what the service needs from the process
it runs in), families.py (the alerting families), promql.py (rule file export), cli.py.
"""

from __future__ import annotations

from typing import Any

from .families import ALERT_FAMILIES

__all__ = ["ALERT_FAMILIES", "prepare_alerts"]


def prepare_alerts(config: Any) -> Any:
    """Validate the alerting config and rules now; None when alerts are disabled."""
    if not config.alerts.enabled:
        return None
    from .service import AlertingService, load_rules

    return AlertingService(config, load_rules(config))
