"""One typed configuration, loaded from a YAML file and overridden by flags.

Every section is a dataclass; `load_config` walks the YAML mapping against the dataclass fields,
so an unknown key, a wrong type or an out-of-range value raises `ConfigError` naming the file,
the dotted field and the problem. Nothing is started before the whole config is valid.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .advice.config import AdviceConfig
from .alerts.config import AlertsConfig
from .config_files import ConfigError, HostProblem, read_yaml_file
from .engine_settings import SETTABLE
from .gpu.config import GpuConfig
from .metrics import DEFAULT_BUCKETS
from .slo import SloConfig
from .web_config import load_web_config

# ConfigError and read_yaml_file live in config_files.py (web_config.py and the rule loader read
# their files with them too) and are re-exported here, where callers look for them.

DEFAULT_API_PORT = 8000
DEFAULT_METRICS_PORT = 9410
# Plugin mode (vLLM's own server) reads its configuration from the environment.
ENV_CONFIG = "VLLM_EXPORTER_CONFIG"
ENV_METRICS_HOST = "VLLM_EXPORTER_METRICS_HOST"
ENV_METRICS_PORT = "VLLM_EXPORTER_METRICS_PORT"


class _EngineChecks:
    """EngineConfig's checks: each setting's own (engine_settings.py), then those that look at
    several settings or at the disk."""

    def problems(self) -> list[tuple[str, str]]:
        out = []
        for setting in SETTABLE:
            value = getattr(self, setting.name)
            if value is not None and setting.check is not None:
                problem = setting.check(value)
                if problem:
                    out.append((setting.name, problem))
        out += self.extra_args_problems()
        if self.model is not None and _looks_like_path(self.model):
            path = Path(self.model).expanduser()
            if not path.is_dir():
                out.append(("model", HostProblem(f"model directory {self.model} does not "
                                                 "exist")))
            elif not (path / "config.json").is_file():
                out.append(("model", HostProblem(f"{self.model} has no config.json: not a "
                                                 "model directory")))
        return out

    def extra_args_problems(self) -> list[tuple[str, str]]:
        """extra_args that would pass vLLM a second value for a setting the daemon passes or
        reads itself (vLLM would take the last one, behind the daemon's back), and process
        topologies the daemon cannot run; refused before anything starts."""
        out = []
        extra = {key.replace("-", "_"): value for key, value in self.extra_args.items()}
        for setting in SETTABLE:
            if setting.name not in extra:
                continue
            if setting.name in ("api_server_count", "data_parallel_size"):
                why = "the daemon starts one metrics endpoint for all its processes from it"
            else:
                why = f"flag {setting.flag}; the daemon passes it to vLLM itself"
            out.append((f"extra_args.{setting.name}",
                        f"set {setting.config_key} instead ({why})"))
        for name in ("host", "port"):
            if name in extra:
                out.append((f"extra_args.{name}", f"set api.{name} instead (flag --{name}; "
                            "the daemon passes it to vLLM itself)"))
        if extra.get("headless"):
            out.append(("extra_args.headless", "a headless vLLM serves no API; run it with "
                        "`vllm serve --headless` beside a daemon that serves the API"))
        local = extra.get("data_parallel_size_local")
        if isinstance(local, int) and self.data_parallel_size is not None \
                and local > self.data_parallel_size:
            out.append(("extra_args.data_parallel_size_local",
                        f"{local} local ranks exceed data_parallel_size {self.data_parallel_size}"))
        external = extra.get("data_parallel_external_lb") or \
            extra.get("data_parallel_rank") is not None
        if external and (self.api_server_count or 1) > 1:
            out.append(("api_server_count", "external load balancing runs one API server per "
                        "rank; api_server_count must be 1 (or unset) with it"))
        return out


# The engine's tuning knobs, one field per settable row of engine_settings.ENGINE_SETTINGS
# (None: vLLM's own default), and `extra_args`: any other vLLM engine or server argument, by its
# vLLM name (dashes or underscores).
EngineConfig = dataclasses.make_dataclass(
    "EngineConfig",
    [(s.name, s.type | None, field(default=s.default)) for s in SETTABLE]
    + [("extra_args", dict[str, Any], field(default_factory=dict))],
    bases=(_EngineChecks,),
    namespace={"__module__": __name__,
               "__doc__": "The engine's tuning knobs; None means vLLM's own default."},
)


@dataclass
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_API_PORT

    def problems(self) -> list[tuple[str, str]]:
        if not 0 <= self.port <= 65535:
            return [("port", f"must be a TCP port 0-65535, got {self.port}")]
        return []


@dataclass
class MetricsListenConfig(ListenConfig):
    """The metrics port: where it listens, its web config (TLS, basic auth) and its limits."""

    port: int = DEFAULT_METRICS_PORT
    # exporter-toolkit web configuration file (docs/security.md); None: plain HTTP, no auth.
    web_config_file: str | None = None
    # Requests handled at once; more get 503 at once (each may cost a bcrypt check or a render).
    max_concurrent_requests: int = 8
    # Open connections (each holds a thread); beyond this a new connection is closed at once.
    max_connections: int = 64
    # Socket timeout for each read and write of a request; a slow client is dropped after it.
    request_timeout_seconds: float = 10.0

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems()
        for name in ("max_concurrent_requests", "max_connections"):
            if getattr(self, name) < 1:
                out.append((name, f"must be >= 1, got {getattr(self, name)}"))
        if self.max_connections < self.max_concurrent_requests:
            out.append(("max_connections", "must be >= max_concurrent_requests"))
        if self.request_timeout_seconds <= 0:
            out.append(("request_timeout_seconds",
                        f"must be > 0, got {self.request_timeout_seconds}"))
        return out


@dataclass
class DaemonConfig:
    # No engine step for this long and no unfinished request: the engine is idle, and the
    # running/waiting/KV-usage gauges are set to 0 (vLLM itself leaves them at stale values).
    idle_timeout_seconds: float = 2.0
    # How often the engine's health is checked and side gauges are refreshed.
    check_interval_seconds: float = 0.5
    # After the engine dies the metrics port keeps answering (engine_up 0) this long, then the
    # process exits non-zero so systemd or Kubernetes restarts it.
    exit_delay_seconds: float = 5.0
    # SIGTERM/SIGINT: in-flight requests get this long to finish, then they are aborted.
    shutdown_timeout_seconds: float = 20.0
    log_level: str = "INFO"
    # Distinct engine indexes that get their own `engine` label; more fold into engine="other".
    max_engines: int = 64
    # LoRA adapter names that get their own `adapter` label at once. When the table is full, a
    # new name takes the place of the adapter idle for longest (its series go); with every
    # known adapter busy, it folds into adapter="other".
    max_lora_adapters: int = 64

    def problems(self) -> list[tuple[str, str]]:
        out = []
        for name in ("max_engines", "max_lora_adapters"):
            if getattr(self, name) < 1:
                out.append((name, f"must be >= 1, got {getattr(self, name)}"))
        for name in ("idle_timeout_seconds", "check_interval_seconds"):
            if getattr(self, name) <= 0:
                out.append((name, f"must be > 0, got {getattr(self, name)}"))
        for name in ("exit_delay_seconds", "shutdown_timeout_seconds"):
            if getattr(self, name) < 0:
                out.append((name, f"must be >= 0, got {getattr(self, name)}"))
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            out.append(("log_level", f"must be DEBUG, INFO, WARNING or ERROR, got {self.log_level}"))
        return out


@dataclass
class Config:
    engine: EngineConfig = field(default_factory=EngineConfig)
    api: ListenConfig = field(default_factory=ListenConfig)
    metrics: MetricsListenConfig = field(default_factory=MetricsListenConfig)
    # Per histogram family group (keys of metrics.DEFAULT_BUCKETS): upper bounds in base units.
    histogram_buckets: dict[str, list[float]] = field(default_factory=dict)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    slo: SloConfig = field(default_factory=SloConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    advice: AdviceConfig = field(default_factory=AdviceConfig)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        for key, bounds in self.histogram_buckets.items():
            where = f"histogram_buckets.{key}"
            if key not in DEFAULT_BUCKETS:
                out.append((where, f"unknown histogram group; known: {', '.join(DEFAULT_BUCKETS)}"))
            elif not bounds:
                out.append((where, "must list at least one bucket bound"))
            elif any(b <= 0 for b in bounds) or list(bounds) != sorted(set(bounds)):
                out.append((where, "bounds must be positive and strictly increasing"))
        if self.api.port and self.api.port == self.metrics.port:
            out.append(("metrics.port", f"must differ from api.port ({self.api.port})"))
        return out

    def buckets(self) -> dict[str, tuple[float, ...]]:
        merged = dict(DEFAULT_BUCKETS)
        merged.update({k: tuple(float(b) for b in v) for k, v in self.histogram_buckets.items()})
        return merged


def _looks_like_path(model: str) -> bool:
    """Absolute or explicitly relative paths must exist; anything else may be a hub id."""
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()


def load_config(path: str | os.PathLike | None = None,
                overrides: dict[str, Any] | None = None, host_checks: bool = True) -> Config:
    """Build the config from a YAML file (optional) and dotted-key overrides (flags win).
    `host_checks=False` leaves out what depends on this machine (HostProblem: paths, the
    environment; the web config file), for commands that only render the file's content."""
    raw: dict[str, Any] = {}
    source = str(path) if path else "<defaults>"
    if path is not None:
        loaded = read_yaml_file(path, "file")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(source, "-", "the top level must be a mapping of sections")
        raw = loaded
    config = _build(Config, raw, source, "")
    for dotted, value in (overrides or {}).items():
        _apply_override(config, dotted, value)
    _check(config, source, "", host_checks)
    if host_checks and config.metrics.web_config_file:
        load_web_config(config.metrics.web_config_file)  # raises ConfigError naming that file
    return config


def _apply_override(config: Config, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    target = config
    for name in parents:
        target = getattr(target, name)
    hints = typing.get_type_hints(type(target))
    setattr(target, leaf, _convert(hints[leaf], value, "command line", f"--{dotted}"))


def _check(obj: Any, source: str, prefix: str, host_checks: bool = True) -> None:
    if not dataclasses.is_dataclass(obj):
        return
    problems = getattr(obj, "problems", None)
    if problems is not None:
        for name, problem in problems():
            if host_checks or not isinstance(problem, HostProblem):
                raise ConfigError(source, prefix + name, problem)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, list):
            for i, item in enumerate(value):
                _check(item, source, f"{prefix}{f.name}[{i}].", host_checks)
        else:
            _check(value, source, f"{prefix}{f.name}.", host_checks)


def _build(cls: type, raw: Any, source: str, prefix: str):
    where = prefix.rstrip(".") or "-"
    if not isinstance(raw, dict):
        raise ConfigError(source, where, f"must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(source, prefix + str(unknown[0]),
                          f"unknown key; known keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, source, f"{prefix}{name}.")
        else:
            kwargs[name] = _convert(hint, value, source, prefix + name)
    return cls(**kwargs)


def _convert(hint: Any, value: Any, source: str, where: str) -> Any:
    """Check `value` against a simple type hint; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _convert(non_none[0], value, source, where)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, where + ".")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(source, where, f"must be a mapping, got {_type_name(value)}")
        return {str(k): _convert(args[1], v, source, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(source, where, f"must be a list, got {_type_name(value)}")
        return [_convert(args[0], v, source, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(source, where, f"must be true or false, got {_type_name(value)} {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(source, where, f"must be an integer, got {_type_name(value)} {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(source, where, f"must be a number, got {_type_name(value)} {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(source, where, f"must be a string, got {_type_name(value)} {value!r}")
    raise ConfigError(source, where, f"unsupported type {hint}")


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value),
                                                                         type(value).__name__)


def config_from_environment() -> Config:
    """Plugin mode's config: the file VLLM_EXPORTER_CONFIG names (or the defaults), with
    VLLM_EXPORTER_METRICS_HOST / VLLM_EXPORTER_METRICS_PORT over it."""
    overrides: dict[str, Any] = {}
    if os.environ.get(ENV_METRICS_HOST):
        overrides["metrics.host"] = os.environ[ENV_METRICS_HOST]
    if os.environ.get(ENV_METRICS_PORT):
        port = os.environ[ENV_METRICS_PORT]
        if not port.isdigit():
            raise ConfigError(ENV_METRICS_PORT, "metrics.port",
                              f"must be a port number, got {port!r}")
        overrides["metrics.port"] = int(port)
    return load_config(os.environ.get(ENV_CONFIG) or None, overrides)
