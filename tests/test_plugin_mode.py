"""Plugin mode: vLLM's own OpenAI server, started on its own, loads our stat logger through the
`vllm.stat_logger_plugins` entry point and opens our metrics port. vLLM's own /metrics, in
plugin and daemon mode, serves exactly the families of vLLM alone (no plugin loaded)."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import urllib.request

import pytest

from exporter.default_model import ensure_default_model
from testsupport.daemon import STARTUP_TIMEOUT, daemon_env
from testsupport.exposition import Samples, scrape
from testsupport.net import free_port, http_get
from testsupport.processes import start_group, stop_group, wait_url
from testsupport.waiting import wait_for


def family_shapes(exposition: str) -> dict[str, tuple[str, str, frozenset]]:
    """{family: (type, help, label names)} of an exposition, values and label values aside."""
    return Samples(exposition).family_shapes()


def start_vllm_server(tmp_path, name: str, env: dict) -> tuple[subprocess.Popen, str]:
    """vLLM's own OpenAI server on the default model; returns (process, API URL) once healthy."""
    api_port = free_port()
    log = tmp_path / f"{name}.log"
    process = start_group(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
         "--model", str(ensure_default_model()), "--served-model-name", name,
         "--max-model-len", "512", "--host", "127.0.0.1", "--port", str(api_port)],
        log, env)
    url = f"http://127.0.0.1:{api_port}"
    try:
        wait_url(f"{url}/health", process, STARTUP_TIMEOUT, log, what=name, interval=1)
    except BaseException:
        stop_group(process)
        raise
    return process, url


@pytest.fixture(scope="module")
def vllm_alone_shapes(tmp_path_factory):
    """The /metrics families of vLLM alone (no plugin loaded) on the default model, after one
    request, so that every family vLLM creates on first use exists."""
    tmp = tmp_path_factory.mktemp("vllm-alone")
    process, url = start_vllm_server(tmp, "alone", dict(daemon_env(), VLLM_PLUGINS="none"))
    try:
        complete(url, "alone", "warm up")
        return family_shapes(http_get(f"{url}/metrics", timeout=30)[1].decode())
    finally:
        stop_group(process)


def complete(api_url: str, model: str, prompt: str) -> dict:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 6,
                       "ignore_eos": True}).encode()
    request = urllib.request.Request(f"{api_url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def assert_same_families(ours: dict, alone: dict) -> None:
    missing = sorted(set(alone) - set(ours))
    extra = sorted(set(ours) - set(alone))
    changed = sorted(name for name in set(ours) & set(alone) if ours[name] != alone[name])
    assert not (missing or extra or changed), (
        f"vLLM's /metrics differs from vLLM alone: missing {missing}, extra {extra}, "
        f"changed {[(n, ours[n], alone[n]) for n in changed]}")


def test_entry_point_is_registered():
    points = importlib.metadata.entry_points(group="vllm.stat_logger_plugins")
    assert any(p.value == "exporter.plugin:ExporterStatLogger" for p in points)


@pytest.mark.engine
def test_vllm_own_server_gains_our_metrics_port(tmp_path, vllm_alone_shapes):
    metrics_port = free_port()
    config = tmp_path / "plugin.yaml"
    config.write_text("daemon: {idle_timeout_seconds: 1.0}\ngpu: {enabled: false}\n")
    env = daemon_env()
    env.update(VLLM_EXPORTER_CONFIG=str(config), VLLM_EXPORTER_METRICS_PORT=str(metrics_port))
    process, api_url = start_vllm_server(tmp_path, "plugged", env)
    try:
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        before = scrape(metrics_url)
        assert before.get("vllm_exporter_build_info", mode="plugin") == 1
        assert before.get("vllm_engine_up", model="plugged") == 1

        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        for i in range(3):
            answer = complete(api_url, "plugged", f"plugin {i}")
            for key in usage:
                usage[key] += answer["usage"][key]
        labels = {"model": "plugged", "engine": "0"}

        def counting_all_three() -> Samples | None:
            """A scrape with the 3 requests finished (the last step's stats reach the logger
            right after the last response)."""
            s = scrape(metrics_url)
            return s if s.get("vllm_requests_finished_total", **labels) >= 3 else None

        after = wait_for(counting_all_three, 10, what="the 3 requests in our metrics")
        assert after.get("vllm_requests_finished_total", finish_reason="length", **labels) == 3
        assert after.get("vllm_prompt_tokens_total", **labels) == usage["prompt_tokens"]
        assert after.get("vllm_generation_tokens_total", **labels) == usage["completion_tokens"]
        assert after.get("vllm_time_to_first_token_seconds_count", **labels) == 3
        # The alert evaluator runs in plugin mode too.
        status, body, _ = http_get(f"http://127.0.0.1:{metrics_port}/alerts")
        assert status == 200 and json.loads(body)
        # vLLM's own /metrics beside ours: the very families vLLM alone serves.
        status, own, _ = http_get(f"{api_url}/metrics", timeout=30)
        assert status == 200
        assert_same_families(family_shapes(own.decode()), vllm_alone_shapes)
    finally:
        stop_group(process)


@pytest.mark.engine
def test_vllm_metrics_on_the_daemons_api_port_are_vllm_alones(daemon, vllm_alone_shapes):
    """Our package changes nothing in vLLM's registry (no `_created` stripped, no family added
    or lost), in daemon mode too."""
    complete(daemon.api_url, daemon.model, "warm up")
    status, own, _ = http_get(f"{daemon.api_url}/metrics", timeout=30)
    assert status == 200
    assert_same_families(family_shapes(own.decode()), vllm_alone_shapes)
