"""Alerting around a daemon under test: a rule it can be made to fire quickly, the rule files
(the daemon's and the same rules exported for Prometheus), and a real Alertmanager that
notifies a webhook receiver."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from .prometheus import ALERTMANAGER, ManagedServer, make_alertmanager
from .webhook import WebhookReceiver

# A rule the e2e tests can trigger quickly on the CPU engine: saturate it (far more concurrent
# requests than max_num_seqs, 32 in the test config) and requests queue before being
# scheduled. A windowed quantile of the queue time rides out the bursts of this small engine
# (its gauges flicker between 0 and their peak as batches turn over in a second or two).
E2E_ALERT = "E2eQueueTimeHigh"
E2E_RULE = {
    "alert": E2E_ALERT, "kind": "threshold",
    "signal": {"quantile": 0.5, "histogram": "vllm_request_queue_time_seconds",
               "window": "15s"},
    "above": 0.25, "min_rate": 0.5,
    "for": "1s", "severity": "info", "labels": {"test": "e2e"},
    "annotations": {"summary": "median queue time {{ $value | humanizeDuration }} on "
                               "{{ $labels.model }}",
                    "description": "e2e saturation test",
                    "runbook_url": "https://example.invalid/runbook#e2e"},
}


@dataclass
class Alerting:
    webhook: WebhookReceiver
    alertmanager: ManagedServer | None  # None where the binary is missing
    rules_file: Path  # the daemon's rule file: the default pack plus E2E_RULE
    prometheus_rules_file: Path  # the same rules exported as PromQL
    evaluation_interval: float = 0.5

    def daemon_section(self) -> dict:
        """The daemon config's `alerts` section that uses all this."""
        return {
            "rules_file": str(self.rules_file),
            "evaluation_interval_seconds": self.evaluation_interval,
            "alertmanager": {
                "urls": [self.alertmanager.url] if self.alertmanager else [],
                "resend_interval_seconds": 5.0, "retry_initial_seconds": 0.2,
                "retry_max_seconds": 2.0,
            },
        }

    def close(self) -> None:
        if self.alertmanager is not None:
            self.alertmanager.stop()
        self.webhook.close()


def write_rule_files(directory: Path) -> tuple[Path, Path]:
    """(the daemon's rule file, the same rules for Prometheus): the default pack plus
    E2E_RULE."""
    from exporter.alerts.defaults import default_rule_file
    from exporter.alerts.promql import prometheus_rule_file, to_yaml
    from exporter.alerts.rules import parse_rules
    from exporter.slo import SloConfig

    raw = default_rule_file()
    raw["rules"].append(E2E_RULE)
    rules_file = directory / "rules.yml"
    rules_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    exported = directory / "rules.prometheus.yml"
    exported.write_text(to_yaml(prometheus_rule_file(parse_rules(raw, SloConfig(), "e2e"))))
    return rules_file, exported


def start_alerting(directory: Path) -> Alerting:
    """Rule files, a webhook receiver and a started Alertmanager (none without the binary)."""
    directory.mkdir(parents=True, exist_ok=True)
    rules_file, exported = write_rule_files(directory)
    receiver = WebhookReceiver()
    try:
        am = (make_alertmanager(directory / "alertmanager", receiver.url).start()
              if ALERTMANAGER else None)
    except BaseException:
        receiver.close()
        raise
    return Alerting(receiver, am, rules_file, exported)
