"""A second real daemon, deployed the way production runs it, and then killed.

Its metrics port sits behind TLS and basic auth (a web config file), its inference API needs
vLLM's API key, it serves two LoRA adapters besides the base model, and its alerts go to a real
Alertmanager of its own, which notifies a webhook. First the web layer is checked end to end on
this real process: the right password gets 200, a wrong one 401, plain HTTP is refused, SIGHUP
picks up a new user while the engine keeps serving, and the API refuses requests without the
key. The adapters' requests show in their own series. Then its engine core is SIGKILLed
mid-load: the metrics port must keep answering with vllm_engine_up 0, counters must never go
backwards, the VllmEngineDied alert must reach Alertmanager before the process exits, and the
daemon must exit 1 in bounded time so systemd or Kubernetes restarts it. (SIGTERM with requests
in flight is checked by the shared daemon's teardown in conftest.py.)

The tests run in file order and share the daemon; the last one kills it.
"""

from __future__ import annotations

import os
import signal
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from alerting_fixtures import (ALERTMANAGER, ManagedProcess, WebhookReceiver,
                               make_alertmanager)
from conftest import Daemon, daemon_config, start_daemon, stop_process_group
from exporter.default_model import ensure_default_model
from helpers import Samples, engine_core_pids, engine_paused, free_port, wait_for
from lora_adapter import make_adapter
from pki import Pki, make_pki, tls_client, write_web_config

pytestmark = [pytest.mark.engine,
              pytest.mark.skipif(ALERTMANAGER is None, reason="prometheus-alertmanager missing")]

MODEL = "doomed-model"  # not the shared daemon's name, so no alert can be mistaken for its
EXIT_DELAY = 3.0
USER, PASSWORD = "prometheus", "first-password"
NEW_USER, NEW_PASSWORD = "rotated", "second-password"
API_KEY = "inference-key"  # engine.extra_args.api_key: vLLM's own --api-key
API_AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADAPTERS = ("tenant-a", "tenant-b")
MONOTONIC = ("vllm_engine_steps_total", "vllm_generation_tokens_total",
             "vllm_prompt_tokens_total", "vllm_requests_finished_total")


@dataclass
class Secured:
    daemon: Daemon
    pki: Pki
    web_config: Path
    webhook: WebhookReceiver
    alertmanager: ManagedProcess


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secured")
    pki = make_pki(tmp)
    web_config = write_web_config(tmp / "web.yml", pki, {USER: PASSWORD})
    webhook = WebhookReceiver()
    alertmanager = make_alertmanager(tmp, webhook.url).start()
    config = daemon_config(
        free_port(), free_port(),
        engine={"served_model_name": MODEL, "extra_args": {
            "api_key": API_KEY, "enable_lora": True, "max_loras": 2, "max_lora_rank": 8,
            "lora_modules": [f"{name}={make_adapter(tmp / name, ensure_default_model(), seed)}"
                             for seed, name in enumerate(ADAPTERS)]}},
        metrics={"web_config_file": str(web_config)},
        daemon={"exit_delay_seconds": EXIT_DELAY},
        alerts={"evaluation_interval_seconds": 1.0,
                "alertmanager": {"urls": [alertmanager.url], "retry_initial_seconds": 0.2,
                                 "retry_max_seconds": 1.0}})
    daemon = start_daemon(tmp, config, name="secured",
                          tls=ssl.create_default_context(cafile=str(pki.ca)))
    daemon.auth = (USER, PASSWORD)
    try:
        yield Secured(daemon, pki, web_config, webhook, alertmanager)
    finally:
        stop_process_group(daemon.process)
        alertmanager.stop()
        webhook.close()


def complete(api_url: str, headers: dict | None = None, model: str = MODEL,
             max_tokens: int = 4) -> httpx.Response:
    return httpx.post(api_url + "/v1/completions", timeout=120, headers=headers, json={
        "model": model, "prompt": "hello", "max_tokens": max_tokens, "ignore_eos": True})


def test_tls_basic_auth_and_sighup_reload_on_a_real_daemon(secured):
    d = secured.daemon
    url = d.metrics_url
    with tls_client(secured.pki) as client:
        ok = client.get(url, auth=(USER, PASSWORD))
        assert ok.status_code == 200
        assert f'vllm_engine_up{{model="{MODEL}"}} 1.0' in ok.text
        assert client.get(url, auth=(USER, PASSWORD + "x")).status_code == 401
        assert client.get(url).status_code == 401
        assert client.get(url.replace("/metrics", "/-/ready")).status_code == 200  # probes
    with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port gets no HTTP answer
        httpx.get(url.replace("https://", "http://"), auth=(USER, PASSWORD), timeout=5)

    write_web_config(secured.web_config, secured.pki, {NEW_USER: NEW_PASSWORD})
    os.kill(d.process.pid, signal.SIGHUP)
    with tls_client(secured.pki) as client:
        wait_for(lambda: client.get(url, auth=(NEW_USER, NEW_PASSWORD)).status_code == 200,
                 15, 0.2, "SIGHUP to load the new user")
        assert client.get(url, auth=(USER, PASSWORD)).status_code == 401
    d.auth = (NEW_USER, NEW_PASSWORD)
    assert d.scrape().get("vllm_exporter_config_reloads_total", result="success") == 1
    # The reload left the engine alone: same process, still serving.
    assert d.process.poll() is None
    assert complete(d.api_url, API_AUTH).status_code == 200


def test_the_inference_api_key_is_passed_through_to_vllm(secured):
    api_url = secured.daemon.api_url
    assert complete(api_url).status_code == 401
    assert complete(api_url, {"Authorization": "Bearer wrong"}).status_code == 401
    assert complete(api_url, API_AUTH).status_code == 200


def test_lora_adapters_get_their_own_series_from_the_real_engine(secured):
    """More requests than max_num_seqs (32), so that some queue. The engine core is paused
    (SIGSTOP) while they arrive and then let run in short slices, far shorter than the 480
    steps a request needs: the gauges hold still with every request in flight, and the scrape
    can be compared with what was sent whatever the machine's speed."""
    d = secured.daemon
    sent = {"tenant-a": 24, "tenant-b": 16}
    statuses: list[int] = []
    requests = [threading.Thread(target=lambda m=m: statuses.append(
        complete(d.api_url, API_AUTH, m, max_tokens=480).status_code))
        for m, n in sent.items() for _ in range(n)]

    def adapters(s: Samples, family: str) -> dict[str, float]:
        return {labels["adapter"]: value for labels, value in s.series(family)}

    try:
        with engine_paused(d.process.pid) as engine:
            for thread in requests:
                thread.start()
            wait_for(lambda: d.scrape().get("vllm_frontend_requests_unfinished") ==
                     len(requests), 60, 0.2, "every request to reach the front end")
            for _ in range(50):  # slices until the engine has scheduled the batch
                for sig in (signal.SIGCONT, signal.SIGSTOP):
                    for pid in engine:
                        os.kill(pid, sig)
                    time.sleep(0.1 if sig == signal.SIGCONT else 0.3)  # stats reach the front end
                s = d.scrape()
                if s.get("vllm_requests_running") >= 32:  # max_num_seqs: the batch is full
                    break
    finally:
        for thread in requests:
            thread.join(180)
    running = adapters(s, "vllm_lora_requests_running")
    waiting = adapters(s, "vllm_lora_requests_waiting")
    # The batch is full (max_num_seqs) and holds both adapters' requests; the other 8 wait.
    # vLLM lists a waiting request under its adapter only once the engine has reported on it
    # (a preemption), so these 8 show in vllm_requests_waiting only.
    assert sum(running.values()) == s.get("vllm_requests_running") == 32, running
    assert s.get("vllm_requests_waiting") == len(requests) - 32
    assert all(0 < running[name] <= n for name, n in sent.items()), running
    assert all(running[name] + waiting[name] <= n for name, n in sent.items()), waiting
    assert statuses == [200] * len(requests)

    def idle() -> set[float]:
        s = d.scrape()
        return set(adapters(s, "vllm_lora_requests_running").values()) | \
            set(adapters(s, "vllm_lora_requests_waiting").values())

    wait_for(lambda: idle() == {0}, 15, 0.2, "the adapters to go back to 0")
    models = {labels["model"] for labels, _ in d.scrape().series("vllm_lora_requests_running")}
    assert models == {MODEL}  # adapters are a label of the model's series, not models


def _load(api_url: str, stop: threading.Event) -> None:
    with httpx.Client(timeout=30, headers=API_AUTH) as client:
        while not stop.is_set():
            try:
                client.post(api_url + "/v1/completions",
                            json={"model": MODEL, "prompt": "load", "max_tokens": 64,
                                  "ignore_eos": True})
            except httpx.HTTPError:
                time.sleep(0.05)


def test_engine_sigkill_mid_load(secured):
    daemon = secured.daemon
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
        died = secured.webhook.wait("VllmEngineDied", timeout=30)
        assert {a["labels"]["model"] for a in died} == {MODEL}
        assert died[0]["labels"]["severity"] == "critical"
        assert "died" in died[0]["annotations"]["summary"]
    finally:
        stop.set()
        stop_process_group(daemon.process)
