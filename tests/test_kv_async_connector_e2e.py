"""The KV-fetch stages and the `deferred` waiting reason on a real engine whose KV connector
loads asynchronously.

One daemon of this module's own runs testsupport/async_kv_connector.py (vLLM's ExampleConnector,
its loads answered load_kv_async=True and reported finished LOAD_DELAY seconds after they
start; the KV itself still comes from ExampleConnector's files) as kv_both, with the local
prefix cache off. A prompt is sent once (its KV is saved), then again while our /metrics and
vLLM's own (the API port) are scraped every SAMPLE_INTERVAL s.

What vLLM 0.32's scheduler does with the second request, and so what this test asserts:
admitted with an asynchronous load, it gets its blocks and goes to WAITING_FOR_REMOTE_KVS in
the same step, so `waiting_to_start` is set and replaced within that step (a scrape sees it
only when the load's blocks cannot be allocated yet, or for a P/D request sent with
kv_transfer_params do_remote_prefill before the scheduler reaches it: not here), and the
request is `in_progress` for the whole delay. The
scheduler skips it in every step meanwhile (`skip_request`), which puts it in
`deferred_waiting`: num_skipped_waiting_reqs counts it, so the `deferred` reason is 1 too.
When the worker reports the load finished the request is `completed_waiting` for the one step
until the scheduler runs it (a scrape rarely sees that), and then every stage and `deferred`
are back to 0. The second answer must equal the first (greedy, the loaded KV being the first
request's own), and the prefix-cache figures must show the load.
"""

from __future__ import annotations

import threading
import time

import pytest

from testsupport.exposition import Samples, scrape
from testsupport.kv_connector import PROMPT, STAGES, complete, start_connector_daemon
from testsupport.waiting import wait_for

MODEL = "kva"
LABELS = {"model": MODEL, "engine": "0"}
VLLM_LABELS = {"model_name": MODEL, "engine": "0"}
LOAD_DELAY = 2.0  # seconds between a load's start and its report as finished
SAMPLE_INTERVAL = 0.1


@pytest.fixture(scope="module")
def async_daemon(tmp_path_factory):
    daemon = start_connector_daemon(
        tmp_path_factory.mktemp("kv-async"), MODEL,
        {"kv_connector": "AsyncExampleConnector",
         "kv_connector_module_path": "testsupport.async_kv_connector",
         "extra_config": {"async_load_delay_seconds": LOAD_DELAY}})
    yield daemon
    daemon.stop()


def _complete(api_url: str, prompt: str) -> dict:
    return complete(api_url, MODEL, prompt, max_tokens=8)


def _fetch_view(ours: Samples, own: Samples) -> dict:
    """The figures of one scrape pair: stages and deferred, ours and vLLM's."""
    return {
        "ours": {s: ours.get("vllm_requests_waiting_kv_fetch", stage=s, **LABELS)
                 for s in STAGES + ("other",)},
        "own": {s: own.get("vllm:num_requests_kv_fetch_by_stage", stage=s, **VLLM_LABELS)
                for s in STAGES},
        "ours_deferred": ours.get("vllm_requests_waiting_by_reason", reason="deferred",
                                  **LABELS),
        "own_deferred": own.get("vllm:num_requests_waiting_by_reason", reason="deferred",
                                **VLLM_LABELS),
        "ours_waiting": ours.get("vllm_requests_waiting", **LABELS),
        "steps": ours.get("vllm_engine_steps_total", **LABELS),
    }


class _Sampler(threading.Thread):
    """Scrapes ours, then vLLM's, every SAMPLE_INTERVAL s until stopped."""

    def __init__(self, daemon):
        super().__init__(daemon=True)
        self.d = daemon
        self.views: list[dict] = []
        self.errors: list[BaseException] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.views.append(_fetch_view(self.d.scrape(), scrape(f"{self.d.api_url}/metrics")))
            except BaseException as exc:  # reported by the test
                self.errors.append(exc)
            self.halt.wait(SAMPLE_INTERVAL)


@pytest.mark.engine
def test_async_kv_load_moves_fetch_stages_and_deferred_as_vllm(async_daemon):
    d = async_daemon
    start = _fetch_view(d.scrape(), scrape(f"{d.api_url}/metrics"))
    assert start["ours"] == dict.fromkeys(STAGES + ("other",), 0), start
    assert start["own"] == dict.fromkeys(STAGES, 0), start
    block = int(d.scrape().get("vllm_kv_cache_block_size_tokens", **LABELS))
    assert block > 0

    first = _complete(d.api_url, PROMPT)  # computed locally; the connector saves its KV
    n = first["usage"]["prompt_tokens"]
    assert 2 * block + 2 <= n <= 512
    assert list(d.storage.glob("*/*.safetensors")), "the connector saved nothing"

    sampler = _Sampler(d)
    sampler.start()
    try:
        began = time.monotonic()
        second = _complete(d.api_url, PROMPT)  # its KV is loaded asynchronously
        took = time.monotonic() - began
        time.sleep(3 * SAMPLE_INTERVAL)
    finally:
        sampler.halt.set()
        sampler.join(10)
    assert not sampler.errors, sampler.errors[:3]
    views = sampler.views

    # The request waited for the load, and its answer is the first one's.
    assert took >= LOAD_DELAY, took
    assert second["usage"]["prompt_tokens"] == n
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    hits = (n - 2) // block * block
    log = d.log_path.read_text(errors="replace")
    assert f"Async load of {hits} tokens for " in log

    # in_progress: seen >= 1 on our side and equal to vLLM's in the same scrape pair.
    waiting = [v for v in views if v["ours"]["in_progress"] >= 1]
    assert len(waiting) >= 3, views
    agreed = [v for v in waiting if v["own"]["in_progress"] == v["ours"]["in_progress"]]
    assert agreed, waiting
    # Never more than the one request in flight, in any stage or in all together; nothing
    # outside vLLM's stages.
    for v in views:
        assert all(0 <= v["ours"][s] <= 1 for s in STAGES), v
        assert sum(v["ours"][s] for s in STAGES) <= 1, v
        assert v["ours"]["other"] == 0, v
    # The waiting request is skipped in every step: the `deferred` reason counts it too, on
    # both sides, and our waiting total includes it.
    deferred = [v for v in waiting if v["ours_deferred"] >= 1]
    assert deferred, waiting
    assert [v for v in deferred if v["own_deferred"] == v["ours_deferred"] == 1], deferred
    assert all(v["ours_waiting"] >= v["ours_deferred"] for v in views), views

    # Afterwards: every stage and `deferred` back to 0 on both sides.
    def settled() -> dict | None:
        v = _fetch_view(d.scrape(), scrape(f"{d.api_url}/metrics"))
        zero = all(x == 0 for x in v["ours"].values()) and \
            all(x == 0 for x in v["own"].values()) and \
            v["ours_deferred"] == 0 == v["own_deferred"]
        return v if zero else None

    wait_for(settled, 30, 0.2, "every KV-fetch stage and deferred back to 0")

    # The load's tokens are external prefix-cache hits, as vLLM counts them.
    ours, own = d.scrape(), scrape(f"{d.api_url}/metrics")
    assert ours.get("vllm_external_prefix_cache_hits_total", **LABELS) == hits == \
        own.get("vllm:external_prefix_cache_hits_total", **VLLM_LABELS)

    seen = {s: sum(1 for v in views if v["ours"][s] >= 1) for s in STAGES}
    print(f"\nprompt {n} tokens, {hits} loaded; second request {took:.2f} s; "
          f"{len(views)} scrape pairs; pairs with a stage >= 1 (ours): {seen}; "
          f"in_progress equal to vLLM's in {len(agreed)}/{len(waiting)}; "
          f"deferred >= 1 in {len(deferred)}; engine steps while waiting: "
          f"{waiting[-1]['steps'] - waiting[0]['steps']:.0f}")
