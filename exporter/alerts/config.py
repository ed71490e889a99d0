"""The `alerts:` section of the config file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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
    # Overrides of the default pack's thresholds, by key (docs/alerts.md lists them).
    thresholds: dict[str, float] = field(default_factory=dict)
    alertmanager: AlertmanagerConfig = field(default_factory=AlertmanagerConfig)

    def problems(self) -> list[tuple[str, str]]:
        from .defaults import DEFAULT_THRESHOLDS, RENAMED_THRESHOLDS

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
        if self.rules_file is not None and self.thresholds:
            out.append(("thresholds", "only applies to the default pack (rules_file is set)"))
        if self.external_url is not None and not self.external_url.startswith(("http://",
                                                                              "https://")):
            out.append(("external_url", f"must be an http(s) URL, got {self.external_url!r}"))
        return out
