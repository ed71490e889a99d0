"""A second real daemon, deployed the way production runs it.

Its metrics port sits behind TLS and basic auth (a web config file), its inference API needs
vLLM's API key, and it serves two LoRA adapters besides the base model. The web layer is checked
end to end on this real process: the right password gets 200, a wrong one 401, plain HTTP is
refused, SIGHUP picks up a new user while the engine keeps serving, and the API refuses requests
without the key. The adapters' requests show in their own series. (A daemon's death and its
stop are tested on daemons of their own, in test_shutdown.py.)
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

from exporter.default_model import ensure_default_model
from testsupport.daemon import Daemon, daemon_config, start_daemon
from testsupport.exposition import Samples
from testsupport.lora import make_adapter
from testsupport.net import free_port
from testsupport.pki import Pki, make_pki, tls_client, write_web_config
from testsupport.processes import engine_paused
from testsupport.waiting import wait_for

pytestmark = pytest.mark.engine

MODEL = "secured-model"  # not the shared daemon's name
USER, PASSWORD = "prometheus", "first-password"
NEW_USER, NEW_PASSWORD = "rotated", "second-password"
API_KEY = "inference-key"  # engine.extra_args.api_key: vLLM's own --api-key
API_AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADAPTERS = ("tenant-a", "tenant-b")


@dataclass
class Secured:
    daemon: Daemon
    pki: Pki
    web_config: Path


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secured")
    pki = make_pki(tmp)
    web_config = write_web_config(tmp / "web.yml", pki, {USER: PASSWORD})
    config = daemon_config(
        free_port(), free_port(),
        engine={"served_model_name": MODEL, "extra_args": {
            "api_key": API_KEY, "enable_lora": True, "max_loras": 2, "max_lora_rank": 8,
            "lora_modules": [f"{name}={make_adapter(tmp / name, ensure_default_model(), seed)}"
                             for seed, name in enumerate(ADAPTERS)]}},
        metrics={"web_config_file": str(web_config)})
    daemon = start_daemon(tmp, config, name="secured",
                          tls=ssl.create_default_context(cafile=str(pki.ca)),
                          auth=(USER, PASSWORD))
    yield Secured(daemon, pki, web_config)
    daemon.stop()


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
            # Slices until the engine has scheduled the batch: the engine runs 0.1 s, then
            # holds still 0.3 s while its stats reach the front end. The sleeps are the slices;
            # what is awaited is the full batch.
            for _ in range(50):
                for sig in (signal.SIGCONT, signal.SIGSTOP):
                    for pid in engine:
                        os.kill(pid, sig)
                    time.sleep(0.1 if sig == signal.SIGCONT else 0.3)
                s = d.scrape()
                in_batch, queued = s.get("vllm_requests_running"), s.get("vllm_requests_waiting")
                # max_num_seqs: the batch is full, and the engine has taken in the rest
                if in_batch >= 32 and in_batch + queued == len(requests):
                    break
            else:
                pytest.fail(f"no full batch with every request in the engine after 50 slices: "
                            f"running {in_batch}, waiting {queued}")
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

