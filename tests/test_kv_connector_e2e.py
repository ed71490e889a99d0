"""The KV-connector families on a real engine with a real KV connector.

One daemon of this module's own runs vLLM's ExampleConnector (it ships inside vLLM and runs on
the CPU build with no extra package: it saves each new prompt's KV cache to safetensors files
under a directory and loads it back when the same prompt comes again) as kv_both, with the
local prefix cache off, so that a repeated prompt's KV can only come from the connector.
The same long prompt, sent twice, moves the external prefix cache families and the
external_kv_transfer prompt-token source; they must equal vLLM's own /metrics exactly (the API
port serves it unchanged) and the figures the connector's rule gives.

What this connector cannot move, and why: the KV-fetch stages (vllm_requests_waiting_kv_fetch)
and the `deferred` waiting reason count requests waiting for an asynchronous KV load
(WAITING_FOR_REMOTE_KVS). ExampleConnector loads synchronously, in the step that schedules the
request (`get_num_new_matched_tokens` returns load_async False), so no request ever waits for
one: both stay 0 here, and this test checks that they are present (the engine is a KV consumer)
and agree with vLLM's. The connectors that load asynchronously do not run on the CPU build:
OffloadingConnector ("CPU Offloading is currently only supported on CUDA-alike and XPU GPUs"),
SimpleCPUOffloadConnector (torch.cuda.Stream.priority_range at start-up), and NIXL, Mooncake,
LMCache, ... need packages of their own. tests/test_kv_async_connector_e2e.py moves them with
a test connector that loads ExampleConnector's files asynchronously.
"""

from __future__ import annotations


import pytest

from testsupport.exposition import Samples, scrape
from testsupport.kv_connector import PROMPT, STAGES, complete, start_connector_daemon
from testsupport.waiting import wait_for

MODEL = "kvc"
LABELS = {"model": MODEL, "engine": "0"}
VLLM_LABELS = {"model_name": MODEL, "engine": "0"}


@pytest.fixture(scope="module")
def connector_daemon(tmp_path_factory):
    daemon = start_connector_daemon(tmp_path_factory.mktemp("kv-connector"), MODEL,
                                    {"kv_connector": "ExampleConnector"})
    yield daemon
    daemon.stop()


def _complete(api_url: str, prompt: str) -> dict:
    return complete(api_url, MODEL, prompt, max_tokens=4)


def _vllm_own(api_url: str) -> Samples:
    return scrape(f"{api_url}/metrics")


@pytest.mark.engine
def test_external_prefix_hits_and_prompt_sources_match_vllm(connector_daemon):
    d = connector_daemon
    # Bound at 0 before any request: the engine's config names a KV connector, and kv_both is
    # a KV consumer (StatsRecorder.expect).
    s = d.scrape()
    assert s.series("vllm_external_prefix_cache_queries_total")
    assert s.get("vllm_external_prefix_cache_queries_total", **LABELS) == 0
    assert s.get("vllm_external_prefix_cache_hits_total", **LABELS) == 0
    assert {l["stage"] for l, _ in s.series("vllm_requests_waiting_kv_fetch")} == \
        set(STAGES) | {"other"}
    block = int(s.get("vllm_kv_cache_block_size_tokens", **LABELS))
    assert block > 0

    first = _complete(d.api_url, PROMPT)
    n = first["usage"]["prompt_tokens"]
    assert 2 * block + 2 <= n <= 512
    # The connector stored this prompt's KV (one file per attention layer).
    assert list(d.storage.glob("*/*.safetensors")), "ExampleConnector saved nothing"
    second = _complete(d.api_url, PROMPT)
    assert second["usage"]["prompt_tokens"] == n

    def both_counted() -> tuple[Samples, Samples] | None:
        ours, own = d.scrape(), _vllm_own(d.api_url)
        if ours.get("vllm_requests_finished_total", **LABELS) < 2 or \
                own.get("vllm:request_success_total", **VLLM_LABELS) < 2:
            return None
        return ours, own

    ours, own = wait_for(both_counted, 30, 0.2, "both requests in our and vLLM's metrics")

    # The connector's rule: it holds the prompt minus its last token, in whole blocks; the
    # first request looks up all n tokens and finds nothing, the second finds that many.
    hits = (n - 2) // block * block
    assert hits >= 2 * block
    assert ours.get("vllm_external_prefix_cache_queries_total", **LABELS) == 2 * n == \
        own.get("vllm:external_prefix_cache_queries_total", **VLLM_LABELS)
    assert ours.get("vllm_external_prefix_cache_hits_total", **LABELS) == hits == \
        own.get("vllm:external_prefix_cache_hits_total", **VLLM_LABELS)
    # The worker loaded exactly those tokens from the files (vLLM's own log line).
    assert f"Inject KV cache of {hits} tokens to the paged memory" in \
        d.log_path.read_text(errors="replace")

    expected = {"local_compute": 2 * n - hits, "local_cache_hit": 0,
                "external_kv_transfer": hits}
    for source, value in expected.items():
        assert ours.get("vllm_prompt_tokens_by_source_total", source=source, **LABELS) == \
            value == own.get("vllm:prompt_tokens_by_source_total", source=source,
                             **VLLM_LABELS), source
    total = ours.get("vllm_prompt_tokens_total", **LABELS)
    assert total == 2 * n == own.get("vllm:prompt_tokens_total", **VLLM_LABELS)
    assert sum(v for l, v in ours.series("vllm_prompt_tokens_by_source_total")
               if l.get("model") == MODEL) == total
    # The local prefix cache is off: nothing came from it.
    assert ours.get("vllm_prefix_cache_hits_total", **LABELS) == 0 == \
        own.get("vllm:prefix_cache_hits_total", **VLLM_LABELS)
    # Cached tokens by tier, as vLLM splits them: this connector names no tier.
    tiers = {l["tier"]: v for l, v in ours.series("vllm_prefix_cache_hits_by_tier_total")
             if l.get("model") == MODEL}
    assert tiers == {"device": 0, "host": 0, "p2p": 0, "disk": 0,
                     "external_unspecified": hits}
    for tier, value in tiers.items():
        assert own.get("vllm:prompt_tokens_cached_by_source_total", source=tier,
                       **VLLM_LABELS) == value, tier

    # A synchronous connector: no request waited for a KV load (see the module's docstring).
    for stage in STAGES:
        assert ours.get("vllm_requests_waiting_kv_fetch", stage=stage, **LABELS) == 0 == \
            own.get("vllm:num_requests_kv_fetch_by_stage", stage=stage, **VLLM_LABELS), stage
    assert ours.get("vllm_requests_waiting_kv_fetch", stage="other", **LABELS) == 0
    assert ours.get("vllm_requests_waiting_by_reason", reason="deferred", **LABELS) == 0 == \
        own.get("vllm:num_requests_waiting_by_reason", reason="deferred", **VLLM_LABELS)
