"""Plugin mode: vLLM's own OpenAI server, started on its own, loads our stat logger through the
`vllm.stat_logger_plugins` entry point and opens our metrics port."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import ROOT, daemon_env, stop_process_group
from exporter.default_model import ensure_default_model
from helpers import free_port, http_get, scrape, wait_for_vllm


def test_entry_point_is_registered():
    points = importlib.metadata.entry_points(group="vllm.stat_logger_plugins")
    assert any(p.value == "exporter.plugin:ExporterStatLogger" for p in points)


@pytest.mark.engine
def test_vllm_own_server_gains_our_metrics_port(tmp_path):
    api_port, metrics_port = free_port(), free_port()
    config = tmp_path / "plugin.yaml"
    config.write_text("daemon: {idle_timeout_seconds: 1.0}\ngpu: {enabled: false}\n")
    env = daemon_env()
    env.update(VLLM_EXPORTER_CONFIG=str(config), VLLM_EXPORTER_METRICS_PORT=str(metrics_port))
    log = tmp_path / "vllm-server.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
         "--model", str(ensure_default_model()), "--served-model-name", "plugged",
         "--max-model-len", "512", "--host", "127.0.0.1", "--port", str(api_port)],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        start_new_session=True)
    try:
        wait_for_vllm(process, f"http://127.0.0.1:{api_port}", log, "vLLM's own server")
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        before = scrape(metrics_url)
        assert before.get("vllm_exporter_build_info", mode="plugin") == 1
        assert before.get("vllm_engine_up", model="plugged") == 1

        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        for i in range(3):
            body = json.dumps({"model": "plugged", "prompt": f"plugin {i}", "max_tokens": 6,
                               "ignore_eos": True}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{api_port}/v1/completions",
                                             data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                answer = json.loads(response.read())
            for key in usage:
                usage[key] += answer["usage"][key]
        time.sleep(0.5)
        after = scrape(metrics_url)
        labels = {"model": "plugged", "engine": "0"}
        assert after.get("vllm_requests_finished_total", finish_reason="length", **labels) == 3
        assert after.get("vllm_prompt_tokens_total", **labels) == usage["prompt_tokens"]
        assert after.get("vllm_generation_tokens_total", **labels) == usage["completion_tokens"]
        assert after.get("vllm_time_to_first_token_seconds_count", **labels) == 3
        # The alert evaluator runs in plugin mode too.
        status, body, _ = http_get(f"http://127.0.0.1:{metrics_port}/alerts")
        assert status == 200 and json.loads(body)
        # vLLM's own /metrics keeps working beside ours.
        status, own, _ = http_get(f"http://127.0.0.1:{api_port}/metrics")
        assert status == 200 and b"vllm:" in own
    finally:
        stop_process_group(process)
