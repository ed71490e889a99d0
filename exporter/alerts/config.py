"""The `alerts:` section of the config file."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from ..config_files import HostProblem

LABEL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
ENV_REF_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Labels an external label may not set: alertname and severity come from the rule, instance
# from alerts.instance; names starting with __ are Prometheus' own.
RESERVED_LABELS = ("alertname", "severity", "instance")


def expand_env(text: str) -> str:
    """`${VAR}` replaced by the environment variable VAR (KeyError if it is not set)."""
    return ENV_REF_RE.sub(lambda m: os.environ[m.group(1)], text)


def references_env(text: str) -> bool:
    return bool(ENV_REF_RE.search(text))


@dataclass
class AlertmanagerConfig:
    # Alertmanager base URLs (e.g. http://alertmanager:9093); every alert goes to each of them.
    # Empty: rules are still evaluated and exported as metrics and JSON, nothing is sent.
    urls: list[str] = field(default_factory=list)
    timeout_seconds: float = 5.0
    # Firing alerts are sent again this often (Alertmanager resolves an alert it has not heard
    # of for its resolve_timeout, 5 m by default; endsAt is set to 4 x this interval).
    resend_interval_seconds: float = 30.0
    # Notifications waiting for an unreachable Alertmanager, per URL; the oldest are dropped
    # beyond this (vllm_exporter_alert_notifications_dropped_total counts them).
    queue_size: int = 1000
    # Retries after a failed send: first after this long, doubling up to retry_max_seconds.
    retry_initial_seconds: float = 0.5
    retry_max_seconds: float = 30.0
    basic_auth_username: str | None = None
    basic_auth_password_file: str | None = None
    bearer_token_file: str | None = None
    tls_ca_file: str | None = None
    tls_insecure_skip_verify: bool = False

    def problems(self) -> list[tuple[str, str]]:
        out = []
        for i, url in enumerate(self.urls):
            if not url.startswith(("http://", "https://")):
                out.append((f"urls[{i}]", f"must start with http:// or https://, got {url!r}"))
        for name in ("timeout_seconds", "resend_interval_seconds", "retry_initial_seconds"):
            if getattr(self, name) <= 0:
                out.append((name, f"must be > 0, got {getattr(self, name)}"))
        if self.retry_max_seconds < self.retry_initial_seconds:
            out.append(("retry_max_seconds", "must be >= retry_initial_seconds"))
        if self.queue_size < 1:
            out.append(("queue_size", f"must be >= 1, got {self.queue_size}"))
        if self.basic_auth_username and not self.basic_auth_password_file:
            out.append(("basic_auth_password_file", "required with basic_auth_username"))
        if self.basic_auth_username and self.bearer_token_file:
            out.append(("bearer_token_file", "use basic auth or a bearer token, not both"))
        for name in ("basic_auth_password_file", "bearer_token_file", "tls_ca_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                out.append((name, f"file {path} does not exist"))
        return out


@dataclass
class AlertsConfig:
    # Evaluate the rules in the daemon (state metric + /alerts JSON), and notify Alertmanager
    # when alertmanager.urls is set.
    enabled: bool = True
    # A rule file (docs/alerts.md); None: the default pack shipped with the package.
    rules_file: str | None = None
    # How often the rules are evaluated (and the history sampled).
    evaluation_interval_seconds: float = 2.0
    # Every tick is kept this long; older history is kept at coarse_step_seconds resolution
    # as far back as the longest rule window needs (6 h for the slow SLO burn rule).
    fine_history_seconds: float = 3900.0
    coarse_step_seconds: float = 30.0
    # Base of the generatorURL in notifications; None: http://<metrics host>:<port>.
    external_url: str | None = None
    # Where your team publishes docs/runbook.md; the default pack's runbook_url annotations
    # become <this>#<alert name in lower case>. None: the project's own docs/runbook.md.
    runbook_base_url: str | None = None
    # The `instance` label of every alert the daemon pushes (docs/alerts.md#replica-identity):
    # set it to the address Prometheus scrapes this daemon at. None: <host name>:<metrics.port>.
    # `${VAR}` is replaced by the environment variable VAR.
    instance: str | None = None
    # Labels added to every alert the daemon pushes, like Prometheus' external_labels (a label
    # the alert already has wins). Constant values are added to the exported alerting rules
    # too; values with `${VAR}` are per replica and are not exported.
    external_labels: dict[str, str] = field(default_factory=dict)
    # Overrides of the default pack's thresholds, by key (docs/alerts.md lists them).
    thresholds: dict[str, float] = field(default_factory=dict)
    alertmanager: AlertmanagerConfig = field(default_factory=AlertmanagerConfig)

    def problems(self) -> list[tuple[str, str]]:
        from .defaults import DEFAULT_THRESHOLDS, RENAMED_THRESHOLDS, THRESHOLD_RANGES

        out = []
        if self.evaluation_interval_seconds <= 0:
            out.append(("evaluation_interval_seconds",
                        f"must be > 0, got {self.evaluation_interval_seconds}"))
        if self.fine_history_seconds < 60:
            out.append(("fine_history_seconds", "must be >= 60"))
        if self.coarse_step_seconds <= 0:
            out.append(("coarse_step_seconds", "must be > 0"))
        for key, value in self.thresholds.items():
            if key in RENAMED_THRESHOLDS:
                out.append((f"thresholds.{key}", RENAMED_THRESHOLDS[key]))
            elif key not in DEFAULT_THRESHOLDS:
                out.append((f"thresholds.{key}",
                            f"unknown threshold; known: {', '.join(DEFAULT_THRESHOLDS)}"))
            elif value < 0:
                out.append((f"thresholds.{key}", f"must be >= 0, got {value}"))
            elif key in THRESHOLD_RANGES and not THRESHOLD_RANGES[key][0](value):
                out.append((f"thresholds.{key}", f"must be {THRESHOLD_RANGES[key][1]}, got "
                                                 f"{value}"))
        if self.rules_file is not None and self.thresholds:
            out.append(("thresholds", "only applies to the default pack (rules_file is set)"))
        if self.external_url is not None and not self.external_url.startswith(("http://",
                                                                              "https://")):
            out.append(("external_url", f"must be an http(s) URL, got {self.external_url!r}"))
        out += self._identity_problems()
        return out

    def _identity_problems(self) -> list[tuple[str, str]]:
        out = []
        values = [("instance", self.instance)] if self.instance is not None else []
        if self.instance is not None and not self.instance.strip():
            out.append(("instance", "must not be empty (leave it out for <host name>:<port>)"))
        for name, value in self.external_labels.items():
            where = f"external_labels.{name}"
            if not LABEL_NAME_RE.match(name) or name.startswith("__"):
                out.append((where, f"not a valid label name ({LABEL_NAME_RE.pattern}, not "
                                   f"starting with __)"))
            elif name in RESERVED_LABELS:
                reason = ("set it with alerts.instance" if name == "instance"
                          else "set by the rule itself")
                out.append((where, f"{name} is reserved: {reason}"))
            elif not value:
                out.append((where, "must not be empty"))
            values.append((where, value))
        for where, value in values:
            for var in ENV_REF_RE.findall(value):
                if var not in os.environ:
                    out.append((where, HostProblem(f"environment variable {var} is not set")))
            if "$" in ENV_REF_RE.sub("", value):
                out.append((where, "a $ must start ${VAR} (an environment variable)"))
        return out

    def replica_labels(self, metrics_port: int) -> dict[str, str]:
        """The labels that identify this replica on every pushed alert: instance (default
        <host name>:<metrics port>) and the external labels, environment references expanded."""
        instance = self.instance if self.instance is not None \
            else f"{socket.gethostname()}:{metrics_port}"
        labels = {name: expand_env(value) for name, value in self.external_labels.items()}
        return {**labels, "instance": expand_env(instance)}

    def exported_labels(self) -> dict[str, str]:
        """The external labels the exported alerting rules carry: the constant ones."""
        return {name: value for name, value in self.external_labels.items()
                if not references_env(value)}
