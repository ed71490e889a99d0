"""Daemon lifecycle: validate, start the metrics process, bind the API port, start the engine,
serve, shut down.

Order matters for the operator: everything that can be checked without the engine (config,
model path, topology, vLLM's own argument validation, both ports) is checked first, so bad input
ends the start with exit code 2 and a precise message before a model loads.

Processes: the daemon runs vLLM's API server and AsyncLLM in its own process (one API server),
or vLLM's own launcher (several API servers, data-parallel ranks; docs/topologies.md). Every
process that runs an AsyncLLM writes its metrics into a shard; the metrics process
(metrics_process.py), started first, alone serves the metrics port, so scrapes never share a
GIL with a front end.

Exit codes: 0 after SIGTERM/SIGINT (in-flight requests drained up to the shutdown timeout, then
aborted); 1 when the engine died (the metrics port first answers `vllm_engine_up 0` for
`daemon.exit_delay_seconds`, and the alerts go out, so Prometheus and Alertmanager record the
outage); 2 for bad input.

SIGHUP re-reads the metrics port's web config file (TLS, basic auth) in the metrics process;
the engine is untouched, and an invalid file leaves the previous configuration active
(docs/security.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from . import frontend as frontend_module
from . import metrics_process
from .config import Config, ConfigError
from .default_model import SERVED_NAME, ensure_default_model
from .engine_settings import SETTABLE
from .shard import default_shard_root

log = logging.getLogger("exporter.daemon")

EXIT_OK, EXIT_ENGINE_DIED, EXIT_BAD_INPUT = 0, 1, 2

METRICS_PROCESS_START_SECONDS = 60.0
PROFILE_GUARD = "exporter.api_middleware.ProfileGuard"


class StartupError(Exception):
    """Bad input found before the engine loads; the message says what and where."""


def vllm_argv(config: Config, model_path: str, served_name: str) -> list[str]:
    """vLLM server flags for this config (flags for None values are left to vLLM's defaults)."""
    argv = ["--model", model_path, "--served-model-name", served_name,
            "--host", config.api.host, "--port", str(config.api.port)]
    values: dict[str, Any] = {setting.name: getattr(config.engine, setting.name)
                              for setting in SETTABLE if setting.to_vllm}
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


def several_processes(config: Config) -> bool:
    """Whether vLLM's own launcher runs the front end (several API servers or engine ranks)
    rather than this process alone."""
    engine = config.engine
    if engine.api_server_count == 1:
        return False
    return (engine.api_server_count or 1) > 1 or (engine.data_parallel_size or 1) > 1


def serve(config: Config, alerts: Any = None) -> int:
    """Run until stopped; `alerts` (what alerts.prepare_alerts(config) returned) is validated
    here and evaluated in the metrics process."""
    shard_dir = Path(default_shard_root()) / f"vllm-exporter-daemon-{os.getpid()}"
    shutil.rmtree(shard_dir, ignore_errors=True)
    shard_dir.mkdir(parents=True)
    metrics = None
    try:
        write_config(config, shard_dir / metrics_process.CONFIG_NAME)
        metrics, metrics_port = _start_metrics_process(shard_dir)
        return _serve(config, shard_dir, metrics, metrics_port)
    finally:
        if metrics is not None:
            _stop_process(metrics)
        shutil.rmtree(shard_dir, ignore_errors=True)


def _serve(config: Config, shard_dir: Path, metrics: subprocess.Popen, metrics_port: int) -> int:
    _forward_sighup(metrics)  # from here on SIGHUP reloads instead of ending the process
    # vLLM's API server imports model_hosting_container_standards, which at import sets the
    # root logger and its handlers to $SAGEMAKER_CONTAINER_LOG_LEVEL (default ERROR), silencing
    # every INFO/WARNING line of ours after start-up (reloads included). Keep our level.
    os.environ.setdefault("SAGEMAKER_CONTAINER_LOG_LEVEL", config.daemon.log_level.upper())
    # vLLM's API-server processes (several_processes) load our stat logger from the entry
    # point and find the shard directory here.
    os.environ[metrics_process.ENV_SHARD_DIR] = str(shard_dir)
    fe = frontend_module.Frontend(config, str(shard_dir), role="daemon")
    fe.serving_when_initialized = False  # serving when vLLM's /health answers
    frontend_module.install(fe)
    try:
        _probe_port(config.api.host, config.api.port)
        several = several_processes(config)
        listen_address, sock, args = _prepare_engine_args(config, bind=not several)
        fe.model = config.engine.served_model_name
        fe.set_engine_state("starting")
        fe.start()
        if several:
            return _run_launcher(fe, args, metrics_port)
        from .plugin import ExporterStatLogger

        try:
            return _run_event_loop(_run(fe, args, listen_address, sock, ExporterStatLogger,
                                        metrics_port))
        finally:
            sock.close()
    except KeyboardInterrupt:
        log.info("interrupted during start-up")
        return EXIT_OK
    finally:
        fe.stop()
        frontend_module.install(None)


def _run_event_loop(main: Any) -> Any:
    """Run vLLM's server on uvloop, as vLLM's own launchers do: on asyncio's default loop its
    front end answered about 30 % fewer requests on the CPU machine."""
    try:
        import uvloop
    except ImportError:  # not a dependency of every vLLM build
        log.warning("uvloop is not installed: vLLM's server runs on asyncio's default loop")
        return asyncio.run(main)
    log.info("vLLM's server runs on uvloop")
    return uvloop.run(main)


def write_config(config: Config, path: Path) -> None:
    """The effective config (file and flags merged), for the metrics process and vLLM's
    API-server processes."""
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=True))


def _start_metrics_process(shard_dir: Path) -> tuple[subprocess.Popen, int]:
    """Start the metrics process and wait for its port: a port in use is bad input (exit 2)."""
    lock = metrics_process.try_lock(shard_dir)
    assert lock is not None, "a fresh shard directory is locked"
    read_end, write_end = os.pipe()
    try:
        process = metrics_process.spawn(shard_dir, lock, "daemon", os.getpid(),
                                        ready_fd=write_end,
                                        config_file=str(shard_dir / metrics_process.CONFIG_NAME))
    finally:
        os.close(lock)
        os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        ready, _, _ = select.select([pipe], [], [], METRICS_PROCESS_START_SECONDS)
        line = pipe.readline().decode().strip() if ready else ""
    if line.startswith("ok "):
        return process, int(line.split()[1])
    _stop_process(process)
    problem = line.removeprefix("error: ") or "the metrics process did not start"
    if problem.startswith("cannot listen"):
        raise ConfigError("metrics", "metrics.port", problem)
    raise StartupError(problem)


def _stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _forward_sighup(metrics: subprocess.Popen) -> None:
    """SIGHUP -> the metrics process reloads its web config. vLLM's server handles only
    SIGINT/SIGTERM, so a handler set here in the main thread stays in place."""

    def on_sighup(*_: Any) -> None:
        if metrics.poll() is None:
            metrics.send_signal(signal.SIGHUP)

    signal.signal(signal.SIGHUP, on_sighup)


def _api_health_target(args) -> tuple[str, int, ssl.SSLContext | None]:
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(args.host or "", args.host)
    tls = None
    if getattr(args, "ssl_certfile", None):
        tls = ssl.create_default_context()
        tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE  # our own server, by address
    return host, args.port, tls


async def _mark_serving_when_healthy(fe: frontend_module.Frontend, args, metrics_port: int):
    """`/-/ready` turns 200 (and vllm_engine_up 1) when vLLM's own /health answers 200: the
    engine is up and the API app is built and accepting requests."""
    host, port, tls = _api_health_target(args)
    request = b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port, ssl=tls)
            try:
                writer.write(request)
                await writer.drain()
                status_line = await asyncio.wait_for(reader.readline(), 5)
            finally:
                writer.close()
            if status_line.split(b" ")[1:2] == [b"200"]:
                fe.set_engine_state("serving")
                log.info("serving %s: API on %s:%d, metrics on port %d", fe.model, host, port,
                         metrics_port)
                return
        except (OSError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(0.25)


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


def _prepare_engine_args(config: Config, bind: bool = True):
    """Resolve the model, let vLLM's own parser validate the engine flags, bind the API port
    (unless vLLM's launcher binds it, for several API servers)."""
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
    if not bind:
        return None, None, args
    try:
        listen_address, sock = vllm_compat.setup_server(args)
    except OSError as exc:
        raise _port_error("api", config.api.host, config.api.port, exc) from None
    return listen_address, sock, args


async def _run(fe: frontend_module.Frontend, args, listen_address: str, sock, stat_logger,
               metrics_port: int) -> int:
    """One API server in this process: vLLM's own app over an AsyncLLM built here."""
    from . import vllm_compat

    # Until vLLM's server installs its own handlers, a SIGTERM interrupts the engine start.
    def interrupt_start(*_: Any) -> None:
        raise KeyboardInterrupt("terminated during start-up")

    signal.signal(signal.SIGTERM, interrupt_start)
    # The stat logger wires itself to the engine it belongs to (aborts, unfinished requests,
    # death, and the shutdown that tells a stop from a death: vllm_compat.watch_async_llm).
    try:
        engine = vllm_compat.build_engine(args, [stat_logger])
    except vllm_compat.EngineConfigRefused as exc:
        raise StartupError(f"vLLM refused the engine configuration ({exc}); check the engine "
                           "section of the config file, its extra_args and any --engine-arg"
                           ) from None
    try:
        ready_probe = asyncio.create_task(_mark_serving_when_healthy(fe, args, metrics_port))
        shutdown = await vllm_compat.serve(engine, listen_address, sock, args)
        ready_probe.cancel()
        if asyncio.iscoroutine(shutdown) or isinstance(shutdown, asyncio.Future):
            await shutdown
    finally:
        fe.check_engine_health()  # a death not yet seen by the side thread
        engine.shutdown()
    if fe.engine_state == "dead":
        await asyncio.sleep(_death_delay(fe))
        return EXIT_ENGINE_DIED
    return EXIT_OK


def _run_launcher(fe: frontend_module.Frontend, args, metrics_port: int) -> int:
    """Several API servers or engine ranks: vLLM's own launcher runs them, in this process's
    main thread (it installs its signal handlers); each API-server process loads our stat
    logger from the entry point and writes its own shard."""
    from . import vllm_compat

    def probe() -> None:
        asyncio.run(_mark_serving_when_healthy(fe, args, metrics_port))

    threading.Thread(target=probe, name="ready-probe", daemon=True).start()
    try:
        vllm_compat.run_server_processes(args)
    except SystemExit:  # SIGTERM/SIGINT, through vLLM's handler: a stop
        fe.mark_stopping()
        return EXIT_OK
    except Exception as exc:  # a process of vLLM's died
        log.error("vLLM's processes failed: %s", exc)
        fe.mark_engine_dead()
    else:
        fe.mark_stopping()
        return EXIT_OK
    time.sleep(_death_delay(fe))
    return EXIT_ENGINE_DIED


def _death_delay(fe: frontend_module.Frontend) -> float:
    """The engine died: the metrics process shows it and sends the alerts meanwhile."""
    delay = fe.config.daemon.exit_delay_seconds
    log.error("engine died; exiting with code %d in %.0f s", EXIT_ENGINE_DIED, delay)
    return delay
