"""The output-health canary: its requests and the user-traffic families, its alert rule.

The canary's requests carry `X-Request-Id: vllm-exporter-canary-<n>`; the stat logger leaves
them out of the per-request families (finished requests, request latency and length
histograms) while the step-level families (token counters, TTFT) include them. Fast tests feed
the stat logger vLLM's own statistics classes and check the rule's config; the engine test runs
ONE daemon of this module's own (canary every 1 s): on this healthy engine the greedy answer
repeats the reference and the default pack's canary rule stays inactive.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import openai
import pytest
from prometheus_client import generate_latest
from vllm.v1.engine import FinishReason
from vllm.v1.metrics.stats import FinishedRequestStats, IterationStats

from exporter.alerts.defaults import default_rule_file
from exporter.config import load_config
from exporter.runtime import Runtime
from exporter.stats import CANARY_REQUEST_HEADER_PREFIX
from exporter.vllm_compat import finish_reason_name
from testsupport.daemon import daemon_config, start_daemon
from testsupport.exposition import Samples
from testsupport.net import free_port
from testsupport.waiting import wait_for

USER_REQUESTS = 12  # at least; more while fewer than PROBES_DURING canary answers came back
PROBES_DURING = 3
MAX_TOKENS = 8


def test_the_stat_logger_leaves_canary_requests_out_of_the_per_request_families():
    runtime = Runtime(load_config(None, {"gpu.enabled": False}), mode="daemon")
    runtime.attach_stat_logger("m", [0], finish_reason_name)
    try:
        def request(request_id):
            return FinishedRequestStats(
                finish_reason=FinishReason.LENGTH, request_id=request_id, e2e_latency=1.0,
                num_prompt_tokens=10, num_generation_tokens=4, queued_time=0.1,
                prefill_time=0.2, decode_time=0.6, mean_time_per_output_token=0.2)

        stats = IterationStats()
        stats.num_generation_tokens = 12  # step-level: the canary's tokens count here
        stats.time_to_first_tokens_iter = [0.3, 0.3, 0.3]
        stats.finished_requests = [
            request(f"cmpl-{CANARY_REQUEST_HEADER_PREFIX}7-0"),  # what vLLM makes of the header
            request("cmpl-user-0"),
            request(f"chatcmpl-{CANARY_REQUEST_HEADER_PREFIX}7"),  # not the canary's endpoint
            request(None),  # no id: counted
        ]
        runtime.recorder.record(None, stats, engine_idx=0)
        s = Samples(generate_latest(runtime.registry).decode())
    finally:
        runtime.stop()
    for name in ("vllm_requests_finished_total", "vllm_e2e_request_latency_seconds_count",
                 "vllm_request_queue_time_seconds_count", "vllm_request_prefill_time_seconds_count",
                 "vllm_request_decode_time_seconds_count",
                 "vllm_time_per_output_token_seconds_count",
                 "vllm_request_prompt_tokens_count", "vllm_request_generation_tokens_count",
                 "vllm_request_prefill_kv_computed_tokens_count"):
        assert s.get(name, model="m") == 3, name
    assert s.get("vllm_generation_tokens_total", model="m") == 12
    assert s.get("vllm_time_to_first_token_seconds_count", model="m") == 3


def test_the_canary_rule_takes_its_threshold_and_window_from_the_config():
    (rule,) = [r for r in default_rule_file({"canary_token_match_ratio": 0.5,
                                             "canary_window_seconds": 600})["rules"]
               if r["alert"] == "VllmCanaryOutputChanged"]
    assert (rule["for"], rule["below"], rule["severity"]) == ("10m", 0.5, "critical")
    assert rule["signal"] == {"gauge": "vllm_canary_token_match_ratio"}


@pytest.mark.parametrize("key, value, problem", [
    ("canary_token_match_ratio", 0, "must be in (0, 1], got 0"),
    ("canary_token_match_ratio", 1.5, "must be in (0, 1], got 1.5"),
    ("canary_window_seconds", 30, "must be >= 60"),
])
def test_a_bad_canary_threshold_exits_2_naming_file_and_field(tmp_path, key, value, problem):
    config = tmp_path / "bad.yaml"
    config.write_text(f"alerts:\n  thresholds:\n    {key}: {value}\n")
    result = subprocess.run([sys.executable, "-m", "exporter", "check-config", "--config",
                             str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"{config}: field 'alerts.thresholds.{key}': {problem}" in result.stderr


@pytest.fixture(scope="module")
def canary_daemon(tmp_path_factory):
    config = daemon_config(free_port(), free_port(),
                           advice={"interval_seconds": 1.0, "window_seconds": 30.0,
                                   "canary_interval_seconds": 1.0})
    d = start_daemon(tmp_path_factory.mktemp("canary"), config, name="canary")
    yield d
    d.stop()


@pytest.mark.engine
def test_canary_requests_stay_out_of_the_per_request_families(canary_daemon):
    d = canary_daemon

    def canary_ok() -> float:
        return d.scrape().get("vllm_canary_requests_total", model=d.model, result="ok")

    # The reference and a first comparison, taken on the idle engine.
    wait_for(lambda: canary_ok() >= 2, 120, 0.5, "two canary answers")
    before = d.scrape()
    assert before.get("vllm_requests_finished_total", model=d.model) == 0
    assert before.get("vllm_e2e_request_latency_seconds_count", model=d.model) == 0
    assert before.get("vllm_generation_tokens_total", model=d.model) >= 2  # the canary's
    assert before.get("vllm_canary_token_match_ratio", model=d.model) == 1

    client = openai.OpenAI(base_url=d.api_url + "/v1", api_key="unused", max_retries=0)
    ok_start, sent, ratios = canary_ok(), 0, []
    deadline = time.monotonic() + 120
    while sent < USER_REQUESTS or canary_ok() - ok_start < PROBES_DURING:
        assert time.monotonic() < deadline, f"{sent} user requests, too few canary answers"
        out = client.completions.create(model=d.model, prompt=f"user request number {sent}",
                                        max_tokens=MAX_TOKENS, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == MAX_TOKENS
        sent += 1
        ratios.append(d.scrape().get("vllm_canary_token_match_ratio", model=d.model))
    ok_during = canary_ok() - ok_start
    assert ok_during >= PROBES_DURING  # the canary kept answering during the user requests

    # Two more canary answers after the last user request: any canary request in flight then
    # has finished and been recorded (or left out) by now.
    ok_after = canary_ok()
    wait_for(lambda: canary_ok() >= ok_after + 2, 30, 0.2, "two more canary answers")
    s = d.scrape()
    ok_total = s.get("vllm_canary_requests_total", model=d.model, result="ok")
    # Per-request families: exactly the user requests, none of the canary's.
    assert s.get("vllm_requests_finished_total", model=d.model) == sent
    assert s.get("vllm_requests_finished_total", model=d.model, finish_reason="length") == sent
    assert s.get("vllm_e2e_request_latency_seconds_count", model=d.model) == sent
    assert s.get("vllm_request_queue_time_seconds_count", model=d.model) == sent
    assert s.get("vllm_time_per_output_token_seconds_count", model=d.model) == sent
    assert s.get("vllm_request_generation_tokens_sum", model=d.model) == sent * MAX_TOKENS
    assert s.get("vllm_request_generation_tokens_count", model=d.model) == sent
    # Step-level families: the canary's tokens too (each answer has at least one).
    assert s.get("vllm_generation_tokens_total", model=d.model) >= sent * MAX_TOKENS + ok_total
    assert s.get("vllm_time_to_first_token_seconds_count", model=d.model) >= sent + ok_total

    # A healthy engine repeats its reference: during the user requests (one at a time, so a
    # canary answer shares its batch with at most one of them) and once idle again.
    assert min(ratios) == 1, ratios
    assert s.get("vllm_canary_token_match_ratio", model=d.model) == 1
    assert s.get("vllm_canary_logprob_drift", model=d.model) < 0.01
    # The default pack's canary rule is loaded and evaluates without alerts.
    status, raw, _ = d.get("/alerts")
    assert status == 200
    (rule,) = [r for r in json.loads(raw)["rules"] if r["alert"] == "VllmCanaryOutputChanged"]
    assert rule["expr"] == "vllm_canary_token_match_ratio < 0.25"
    assert (rule["state"], rule["alerts"], rule["last_error"]) == ("inactive", [], None), rule
