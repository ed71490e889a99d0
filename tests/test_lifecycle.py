"""Engine death: the engine core is SIGKILLed mid-load. The metrics port must keep answering with
vllm_engine_up 0, counters must never go backwards, and the daemon must exit non-zero in bounded
time so systemd or Kubernetes restarts it. (SIGTERM with requests in flight is checked by the
shared daemon's teardown in conftest.py.)"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import daemon_config, start_daemon, stop_process_group
from helpers import free_port, http_get

EXIT_DELAY = 3.0
MONOTONIC = ("vllm_engine_steps_total", "vllm_generation_tokens_total",
             "vllm_prompt_tokens_total", "vllm_requests_finished_total")


def engine_core_pids(root: int) -> list[int]:
    """Descendants of `root` whose process title names vLLM's engine core."""
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
            if b"EngineCore" in title:
                found.append(pid)
    return found


def _load(api_url: str, stop: threading.Event) -> None:
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            try:
                client.post(api_url + "/v1/completions",
                            json={"model": "vllm-exporter-default", "prompt": "load",
                                  "max_tokens": 64, "ignore_eos": True})
            except httpx.HTTPError:
                time.sleep(0.05)


@pytest.mark.engine
def test_engine_sigkill_mid_load(tmp_path):
    config = daemon_config(free_port(), free_port(),
                           daemon={"exit_delay_seconds": EXIT_DELAY})
    daemon = start_daemon(tmp_path, config, name="doomed")
    stop = threading.Event()
    loaders = [threading.Thread(target=_load, args=(daemon.api_url, stop), daemon=True)
               for _ in range(3)]
    try:
        for thread in loaders:
            thread.start()
        time.sleep(3)
        assert daemon.scrape().get("vllm_generation_tokens_total") > 0
        victims = engine_core_pids(daemon.process.pid)
        assert victims, "no engine core process found under the daemon"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()

        last: dict[str, float] = {}
        saw_down_at = None
        while daemon.process.poll() is None and time.monotonic() - killed_at < 60:
            try:
                samples = daemon.scrape()
            except OSError:
                break  # the port closes when the process exits
            for name in MONOTONIC:
                value = samples.get(name)
                assert value >= last.get(name, 0), f"{name} went backwards: {value} < {last[name]}"
                last[name] = value
            if samples.get("vllm_engine_up") == 0 and saw_down_at is None:
                saw_down_at = time.monotonic()
                base = f"http://127.0.0.1:{daemon.metrics_port}"
                assert http_get(base + "/-/ready")[0] == 503
                assert http_get(base + "/-/healthy")[0] == 503
            time.sleep(0.2)
        assert saw_down_at is not None, f"never saw vllm_engine_up 0:\n{daemon.log_tail()}"
        assert saw_down_at - killed_at < 10
        code = daemon.process.wait(60)
        exited_after = time.monotonic() - killed_at
        assert code == 1, f"exit code {code}:\n{daemon.log_tail()}"
        # The metrics port stayed up for the exit delay, then the process went: bounded.
        assert EXIT_DELAY <= exited_after < EXIT_DELAY + 30, exited_after
    finally:
        stop.set()
        stop_process_group(daemon.process)
