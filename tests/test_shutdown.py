"""How a daemon ends, each on a daemon of its own (no other test shares it):

- SIGTERM with requests in flight: they finish (drain, up to daemon.shutdown_timeout_seconds)
  and the daemon exits 0 in bounded time.
- Its engine core SIGKILLed mid-load (its metrics port behind TLS and basic auth, as in
  production): the metrics port keeps answering with vllm_engine_up 0, counters never go
  backwards, the VllmEngineDied alert reaches Alertmanager before the process exits, and the
  daemon exits 1 in bounded time so that systemd or Kubernetes restarts it.
"""

from __future__ import annotations

import os
import signal
import ssl
import threading
import time

import httpx
import pytest

from testsupport.daemon import STOP_TIMEOUT, daemon_config, start_daemon
from testsupport.load import InFlightStream
from testsupport.markers import needs_alertmanager
from testsupport.net import free_port
from testsupport.pki import make_pki, write_web_config
from testsupport.processes import engine_core_pids
from testsupport.prometheus import make_alertmanager
from testsupport.waiting import wait_for
from testsupport.webhook import WebhookReceiver

pytestmark = pytest.mark.engine

MODEL = "doomed-model"  # not the shared daemon's name, so no alert can be mistaken for its
EXIT_DELAY = 3.0
USER, PASSWORD = "prometheus", "doomed-password"
MONOTONIC = ("vllm_engine_steps_total", "vllm_generation_tokens_total",
             "vllm_prompt_tokens_total", "vllm_requests_finished_total")


def test_sigterm_with_requests_in_flight_lets_them_finish_and_exits_0(tmp_path):
    config = daemon_config(free_port(), free_port(), daemon={"shutdown_timeout_seconds": 40.0})
    daemon = start_daemon(tmp_path, config, name="drained")
    try:
        in_flight = [InFlightStream(daemon.api_url) for _ in range(3)]
        wait_for(lambda: all(stream.started.is_set() for stream in in_flight), 60,
                 what="the 3 streams to be generating")
        started = time.monotonic()
        code = daemon.stop(timeout=STOP_TIMEOUT)
        took = time.monotonic() - started
        for stream in in_flight:
            stream.join(30)
    finally:
        daemon.stop()
    assert code == 0, f"SIGTERM gave exit code {code}:\n{daemon.log_tail()}"
    assert took < STOP_TIMEOUT, f"the daemon took {took:.1f} s to stop"
    outcomes = [stream.outcome for stream in in_flight]
    assert outcomes == ["length"] * 3, f"in-flight requests at SIGTERM: {outcomes}"


def _load(api_url: str, stop: threading.Event) -> None:
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            try:
                client.post(api_url + "/v1/completions",
                            json={"model": MODEL, "prompt": "load", "max_tokens": 64,
                                  "ignore_eos": True})
            except httpx.HTTPError:
                stop.wait(0.05)  # a pause before the next try


@needs_alertmanager
def test_engine_sigkill_mid_load(tmp_path):
    pki = make_pki(tmp_path)
    web_config = write_web_config(tmp_path / "web.yml", pki, {USER: PASSWORD})
    webhook = WebhookReceiver()
    alertmanager = make_alertmanager(tmp_path / "alertmanager", webhook.url)
    config = daemon_config(
        free_port(), free_port(), engine={"served_model_name": MODEL},
        metrics={"web_config_file": str(web_config)},
        daemon={"exit_delay_seconds": EXIT_DELAY},
        alerts={"evaluation_interval_seconds": 1.0,
                "alertmanager": {"urls": [alertmanager.url], "retry_initial_seconds": 0.2,
                                 "retry_max_seconds": 1.0}})
    stop = threading.Event()
    daemon = None
    try:
        alertmanager.start()
        daemon = start_daemon(tmp_path, config, name="doomed", auth=(USER, PASSWORD),
                              tls=ssl.create_default_context(cafile=str(pki.ca)))
        for _ in range(3):
            threading.Thread(target=_load, args=(daemon.api_url, stop), daemon=True).start()
        wait_for(lambda: daemon.scrape().get("vllm_generation_tokens_total") > 0, 60,
                 what="tokens generated under the load")
        assert daemon.scrape().get("vllm_generation_tokens_total") > 0
        victims = engine_core_pids(daemon.process.pid)
        assert victims, "no engine core process found under the daemon"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()

        last: dict[str, float] = {}
        saw_down_at = None
        # Scrapes every 0.2 s until the process exits: each is checked, none awaited.
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
                assert samples.get("vllm_engine_state", model=MODEL, state="dead") == 1
                assert samples.get("vllm_engine_state", model=MODEL, state="serving") == 0
                assert daemon.get("/-/ready")[0] == 503
                assert daemon.get("/-/healthy")[0] == 503
            time.sleep(0.2)
        assert saw_down_at is not None, f"never saw vllm_engine_up 0:\n{daemon.log_tail()}"
        assert saw_down_at - killed_at < 10
        code = daemon.process.wait(60)
        exited_after = time.monotonic() - killed_at
        assert code == 1, f"exit code {code}:\n{daemon.log_tail()}"
        # The metrics port stayed up for the exit delay, then the process went: bounded.
        assert EXIT_DELAY <= exited_after < EXIT_DELAY + 30, exited_after
        assert "alerts delivered to Alertmanager before exit" in daemon.log_tail(200)

        # The daemon is gone; its alert is in Alertmanager, which notifies the webhook.
        died = webhook.wait("VllmEngineDied", timeout=30)
        assert {a["labels"]["model"] for a in died} == {MODEL}
        assert died[0]["labels"]["severity"] == "critical"
        assert "died" in died[0]["annotations"]["summary"]
    finally:
        stop.set()
        if daemon is not None:
            daemon.stop()
        alertmanager.stop()
        webhook.close()
