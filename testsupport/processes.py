"""Servers as process groups: start one with its output in a log file, wait until a URL of it
answers, stop it and everything it started; find processes below it."""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import subprocess
from pathlib import Path

from . import ROOT
from .net import http_get
from .waiting import wait_for


def start_group(argv: list[str], log_path: Path, env: dict | None = None,
                cwd: Path = ROOT) -> subprocess.Popen:
    """Start `argv` as the leader of a new session (so a process group of its own), stdout and
    stderr appended to `log_path`."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)


def log_tail(log_path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def wait_url(url: str, process: subprocess.Popen, timeout: float, log_path: Path | None = None,
             what: str | None = None, interval: float = 0.5, headers: dict | None = None,
             context: ssl.SSLContext | None = None) -> None:
    """Until GET `url` answers 200. Fails at once, with the log's tail, if `process` exits."""

    def answers() -> bool:
        if process.poll() is not None:
            tail = log_tail(log_path) if log_path else ""
            raise RuntimeError(f"{what or process.args[0]} exited with {process.returncode} "
                               f"before {url} answered:\n{tail}")
        try:
            return http_get(url, timeout=2, headers=headers, context=context)[0] == 200
        except OSError:
            return False

    try:
        wait_for(answers, timeout, interval, what or f"{url} to answer 200")
    except AssertionError as exc:
        tail = f"\n{log_tail(log_path)}" if log_path else ""
        raise AssertionError(f"{exc}{tail}") from None


def stop_group(process: subprocess.Popen, sig: int = signal.SIGTERM,
               timeout: float = 60) -> int | None:
    """Send `sig` to the group's leader and wait up to `timeout` s for it to exit; then SIGKILL
    whatever is left in its group. Returns the leader's exit code, or None if it had to be
    killed."""
    code: int | None = process.poll()
    if code is None:
        process.send_signal(sig)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if code is None:
        process.wait(10)
    return code


def descendant_pids(root: int, marker: bytes) -> list[int]:
    """Descendants of `root` whose command line or process title contains `marker`."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    found = []
    for pid in parents:
        ancestor = parents.get(pid)
        while ancestor and ancestor != root:
            ancestor = parents.get(ancestor)
        if ancestor == root:
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if marker in title:
                found.append(pid)
    return found


def engine_core_pids(root: int) -> list[int]:
    """Descendants of `root` whose process title names vLLM's engine core."""
    return descendant_pids(root, b"EngineCore")


@contextlib.contextmanager
def engine_paused(root_pid: int):
    """vLLM's engine core processes under `root_pid` stopped (SIGSTOP) inside the block: the
    API front end keeps accepting and cancelling requests, but none can make progress."""
    pids = engine_core_pids(root_pid)
    assert pids, f"no engine core process under {root_pid}"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield pids
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
