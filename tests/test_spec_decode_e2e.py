"""Issue 15's families on real vLLM engines.

Plugin mode, one engine of this module's own (the only extra engine): vLLM's own OpenAI server,
our stat logger loaded through the entry point, with n-gram speculative decoding, vLLM's opt-in
KV-block residency (every block sampled) and FLOP estimates, a small KV cache (64 blocks, so
blocks get evicted), max_num_seqs 4 (so requests wait for capacity) and a queue limit of 12
(so the API rejects some). A Prometheus scrapes its metrics port while a load runs: every
engine-dashboard query must return data, the new panels included.

Daemon mode, on the session's shared daemon: the families that need no engine flag move there
(prompt-token sources, prefill KV computed, aborted requests' time, capacity from vLLM).

The same engine runs with VLLM_SERVER_DEV_MODE=1, and its last test puts it to sleep and wakes
it through vLLM's /sleep and /wake_up: the CPU build refuses enable_sleep_mode and its worker
frees nothing, but vLLM still pauses the engine and reports the state to the stat loggers, so
the path to vllm_engine_sleep_state is real. Sleep mode that frees memory (CUDA, ROCm, XPU) and
draft-model speculation are verified with bench/verify_engine_features.py
(docs/engine-features-verification.md).
The external prefix cache is tested with vLLM's ExampleConnector in
tests/test_kv_connector_e2e.py; the KV-fetch stages and the `deferred` waiting reason, which
only an asynchronous connector moves, are unit-tested in tests/test_new_families.py.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from exporter.catalog import sample_names
from exporter.dashboards.inspect import substitute
from exporter.default_model import ensure_default_model
from exporter.metrics import CONDITIONAL_FAMILIES
from testsupport.daemon import STARTUP_TIMEOUT, daemon_env
from testsupport.dashboards import (DASHBOARDS, JOB, RATE_INTERVAL, escape_regex, query_problems,
                                    wait_for_rate_windows)
from testsupport.exposition import Samples, scrape
from testsupport.load import SHARED_PREFIX, BackgroundLoad, abandoned_request
from testsupport.net import free_port, http_get
from testsupport.processes import engine_paused, start_group, stop_group, wait_url
from testsupport.prometheus import PROMETHEUS, start_prometheus
from testsupport.waiting import wait_for

MODEL = "spec"
SPEC_TOKENS = 3
QUEUE_LIMIT = 12
LABELS = {"model": MODEL, "engine": "0"}
# No KV connector on this engine: these families stay absent (their panels say so).
NO_CONNECTOR = {name for name, why in CONDITIONAL_FAMILIES.items() if "kv_transfer" in why}


async def _give_up(api_url: str, model: str, timeout: float) -> str:
    client = openai.AsyncOpenAI(base_url=api_url + "/v1", api_key="unused", max_retries=0)
    try:
        return await abandoned_request(client, model, "never mind", timeout=timeout,
                                       max_tokens=64)
    finally:
        await client.close()


def abort_one(root_pid: int, api_url: str, model: str, timeout: float = 1.0) -> None:
    """One request its client gives up on after `timeout` s, while the engine core is paused
    (so it cannot finish first): vLLM's front end aborts it."""
    with engine_paused(root_pid):
        assert asyncio.run(_give_up(api_url, model, timeout)) == "abandoned"


# --- daemon mode, on the shared daemon ------------------------------------------------------------
# First in the module: where the session's daemon is not up yet, it starts before this module's
# engine and load (a busy CPU engine starves another engine's start on the same core).

def _complete(api_url: str, model: str, prompt: str, max_tokens: int = 4) -> dict:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "ignore_eos": True}).encode()
    request = urllib.request.Request(f"{api_url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.engine
def test_daemon_mode_families_move_on_the_shared_engine(daemon):
    labels = {"model": daemon.model, "engine": "0"}
    before = daemon.scrape()
    for i in range(3):  # the shared prefix spans two full blocks: hits from the second on
        _complete(daemon.api_url, daemon.model, f"{SHARED_PREFIX} issue 15 daemon {i}")

    def counted() -> Samples | None:
        s = daemon.scrape()
        return s if s.get("vllm_requests_finished_total", **labels) >= \
            before.get("vllm_requests_finished_total", **labels) + 3 else None

    after = wait_for(counted, 30, 0.2, "the 3 requests in the daemon's metrics")

    def delta(name: str, **extra) -> float:
        return after.get(name, **labels, **extra) - before.get(name, **labels, **extra)

    assert delta("vllm_prompt_tokens_by_source_total", source="local_cache_hit") >= 256
    assert delta("vllm_prompt_tokens_by_source_total") == delta("vllm_prompt_tokens_total")
    assert delta("vllm_request_prefill_kv_computed_tokens_count") == \
        delta("vllm_requests_finished_total")
    assert {l["reason"] for l, _ in after.series("vllm_requests_waiting_by_reason")} == \
        {"capacity", "deferred"}
    # vLLM's own capacity figure: for this full-attention model with max_model_len 512 (a
    # multiple of the block size) it equals blocks x block size.
    concurrency = after.get("vllm_kv_cache_max_concurrency", **labels)
    assert concurrency > 0
    assert after.get("vllm_kv_cache_capacity_tokens", **labels) == round(concurrency * 512) == \
        after.get("vllm_kv_cache_blocks", **labels) * \
        after.get("vllm_kv_cache_block_size_tokens", **labels)
    assert after.get("vllm_engine_sleep_state", sleep_state="awake", **labels) == 1
    assert {l["reason"] for l, _ in after.series("vllm_admission_rejections_total")} == \
        {"max_num_queued_reqs", "max_num_queued_tokens"}  # present at 0 (vLLM 0.32+)
    for name in ("vllm_spec_decode_drafts_total", "vllm_kv_block_lifetime_seconds_count",
                 "vllm_estimated_flops_per_gpu_total"):
        assert not after.series(name), f"{name}: the shared engine has no such feature"


@pytest.mark.engine
def test_daemon_mode_times_client_aborts(daemon):
    before = daemon.scrape()
    started = time.monotonic()
    abort_one(daemon.process.pid, daemon.api_url, daemon.model, timeout=1.0)
    waited = time.monotonic() - started

    def counted() -> Samples | None:
        s = daemon.scrape()
        return s if s.get("vllm_aborted_request_duration_seconds_count", model=daemon.model) > \
            before.get("vllm_aborted_request_duration_seconds_count", model=daemon.model) \
            else None

    after = wait_for(counted, 30, 0.2, "the abort's time observed")
    name = "vllm_aborted_request_duration_seconds"
    assert after.get(name + "_count", model=daemon.model) - \
        before.get(name + "_count", model=daemon.model) == 1
    assert after.get("vllm_requests_aborted_total", model=daemon.model) - \
        before.get("vllm_requests_aborted_total", model=daemon.model) == 1
    seconds = after.get(name + "_sum", model=daemon.model) - \
        before.get(name + "_sum", model=daemon.model)
    # vLLM stamps the arrival once the HTTP request is parsed, after the client's clock
    # started: 0.1 s of slack, as in plugin mode below.
    assert 0.9 <= seconds <= waited + 1
    try:  # the engine serves again
        _complete(daemon.api_url, daemon.model, "after the abort")
    except urllib.error.URLError as exc:  # pragma: no cover - a failure message
        pytest.fail(f"the shared daemon does not serve after the abort: {exc}")


# --- plugin mode, this module's engine with the features on ------------------------------------

class FeatureLoad(BackgroundLoad):
    """Workers that keep the features busy: repetitive prompts (n-gram drafts match them),
    prompts sharing a prefix for three requests each and then never again (blocks reused, then
    evicted: residency and reuse gaps), and long unique prompts that push blocks out. More
    workers than max_num_seqs + the queue limit, so requests wait and some are refused."""

    def __init__(self, api_url: str, concurrency: int = 15):
        self.api_url, self.concurrency = api_url, concurrency
        self.finished = self.rejected = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = None
        self._counter = 0

    async def _worker(self, client, index: int) -> None:
        while not self._stop.is_set():
            n = self._counter = self._counter + 1
            kind = n % 3
            if kind == 0:
                prompt, max_tokens = "alpha beta gamma delta epsilon " * 12 + str(n), 40
            elif kind == 1:
                prompt, max_tokens = f"Prefix {n // 9}. {SHARED_PREFIX} question {n}", 8
            else:
                prompt, max_tokens = f"request {n} " + "other words on many topics " * 12, 8
            try:
                await client.completions.create(model=MODEL, prompt=prompt, temperature=0,
                                                max_tokens=max_tokens)
                self.finished += 1
            except openai.APIStatusError as exc:
                if exc.status_code != 503:
                    self.errors.append(repr(exc))
                self.rejected += 1
                await asyncio.sleep(0.2)  # a pause before the next try, not a wait
            except Exception as exc:  # recorded; the tests assert there were none
                self.errors.append(repr(exc))
                await asyncio.sleep(0.5)


def start_plugin_server(tmp_path) -> tuple:
    """vLLM's own server with the features on; (process, API URL, metrics URL) once healthy."""
    api_port, metrics_port = free_port(), free_port()
    config = tmp_path / "exporter.yaml"
    config.write_text(json.dumps({
        "daemon": {"idle_timeout_seconds": 1.0, "check_interval_seconds": 0.25},
        "gpu": {"enabled": False},
        # Above any acceptance: the low-acceptance rule must go pending on real data.
        "alerts": {"evaluation_interval_seconds": 1.0,
                   "thresholds": {"spec_decode_acceptance_ratio": 1.01,
                                  "min_draft_token_rate": 0.0}}}))
    env = dict(daemon_env(), VLLM_EXPORTER_CONFIG=str(config),
               VLLM_EXPORTER_METRICS_PORT=str(metrics_port),
               VLLM_SERVER_DEV_MODE="1")  # /sleep and /wake_up, for the last test
    log = tmp_path / "vllm.log"
    process = start_group(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
         "--model", str(ensure_default_model()), "--served-model-name", MODEL,
         "--max-model-len", "512", "--max-num-seqs", "4", "--seed", "0",
         "--host", "127.0.0.1", "--port", str(api_port),
         "--speculative-config", json.dumps({"method": "ngram",
                                             "num_speculative_tokens": SPEC_TOKENS,
                                             "prompt_lookup_max": 4, "prompt_lookup_min": 2}),
         "--kv-cache-metrics", "--kv-cache-metrics-sample", "1.0", "--enable-mfu-metrics",
         "--num-gpu-blocks-override", "64", "--max-num-queued-reqs", str(QUEUE_LIMIT)],
        log, env)
    api_url = f"http://127.0.0.1:{api_port}"
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        wait_url(f"{api_url}/health", process, STARTUP_TIMEOUT, log, what="vLLM", interval=1)
        wait_url(metrics_url, process, 60, log, what="our metrics port", interval=0.5)
    except BaseException:
        stop_group(process)
        raise
    return process, api_url, metrics_url


class Live:
    def __init__(self, process, api_url, metrics_url, prom, load, target, abort_seconds):
        self.process, self.api_url, self.metrics_url = process, api_url, metrics_url
        self.prom, self.load, self.target = prom, load, target
        self.abort_seconds = abort_seconds  # the client's patience in the abort


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    tmp = tmp_path_factory.mktemp("spec-decode")
    process, api_url, metrics_url = start_plugin_server(tmp)
    prom = load = None
    try:
        target = metrics_url.removeprefix("http://").removesuffix("/metrics")
        prom = start_prometheus(tmp / "prometheus", JOB, [target])
        wait_for(lambda: prom.query(f'count(up{{job="{JOB}"}} == 1) == 1'), 30, 0.5,
                 "first scrapes")
        # One client abort, seen by Prometheus before and after (the $__range panel).
        before = scrape(metrics_url)
        abort_one(process.pid, api_url, MODEL)
        wait_for(lambda: scrape(metrics_url).get("vllm_requests_aborted_total", model=MODEL)
                 > before.get("vllm_requests_aborted_total", model=MODEL), 30,
                 what="the abort counted")
        load = FeatureLoad(api_url).start()
        wait_for_rate_windows(prom)
        # Blocks that were reused and then evicted take the longest to show.
        wait_for(lambda: scrape(metrics_url).get("vllm_kv_block_reuse_gap_seconds_count",
                                                 **LABELS) > 0, 120, 1,
                 "a KV block reuse gap (a reused block evicted)")
        yield Live(process, api_url, metrics_url, prom, load, target, 1.0)
    finally:
        if load is not None:
            load.stop()
        if prom is not None:
            prom.stop()
        stop_group(process)


@pytest.mark.engine
def test_plugin_mode_exports_ngram_speculative_decoding(live):
    s = scrape(live.metrics_url)
    drafts = s.get("vllm_spec_decode_drafts_total", **LABELS)
    drafted = s.get("vllm_spec_decode_draft_tokens_total", **LABELS)
    accepted = s.get("vllm_spec_decode_accepted_tokens_total", **LABELS)
    assert 0 < drafts <= drafted <= SPEC_TOKENS * drafts
    assert 0 < accepted <= drafted
    per_position = {l["position"]: v for l, v in
                    s.series("vllm_spec_decode_accepted_tokens_per_position_total")}
    assert set(per_position) == {"0", "1", "2"}
    assert sum(per_position.values()) == accepted
    assert per_position["0"] >= per_position["1"] >= per_position["2"]  # a prefix is accepted
    info = s.series("vllm_engine_config_info")[0][0]
    assert (info["speculative_method"], info["num_speculative_tokens"]) == ("ngram", "3")
    assert (info["kv_cache_metrics"], info["enable_mfu_metrics"]) == ("true", "true")


@pytest.mark.engine
def test_opt_in_residency_and_flops_move(live):
    s = scrape(live.metrics_url)
    lifetime = s.get("vllm_kv_block_lifetime_seconds_count", **LABELS)
    assert lifetime > 0 and s.get("vllm_kv_block_idle_before_evict_seconds_count",
                                  **LABELS) == lifetime  # one of each per evicted block
    assert s.get("vllm_kv_block_reuse_gap_seconds_count", **LABELS) > 0
    assert s.get("vllm_kv_block_lifetime_seconds_sum", **LABELS) >= \
        s.get("vllm_kv_block_idle_before_evict_seconds_sum", **LABELS)
    assert s.get("vllm_estimated_flops_per_gpu_total", **LABELS) > 0
    assert s.get("vllm_estimated_read_bytes_per_gpu_total", **LABELS) > 0
    assert s.get("vllm_estimated_write_bytes_per_gpu_total", **LABELS) > 0
    for name in NO_CONNECTOR:
        assert not s.series(name), name


@pytest.mark.engine
def test_admission_rejections_waiting_reasons_and_prompt_sources(live):
    wait_for(lambda: live.load.rejected > 0, 60, 0.5, "the API to refuse a request")

    def rejections_counted() -> Samples | None:
        s = scrape(live.metrics_url)
        return s if s.get("vllm_admission_rejections_total", reason="max_num_queued_reqs") \
            else None

    s = wait_for(rejections_counted, 30, 0.5, "the rejections counted")
    assert s.get("vllm_admission_rejections_total", reason="max_num_queued_tokens") == 0
    # Requests waited for capacity (max_num_seqs 4 under 15 workers), none were deferred.
    # (a gauge: Prometheus sees it at its scrapes; the load keeps the batch full, so one of
    # them finds requests waiting)
    waited = (f'max_over_time(vllm_requests_waiting_by_reason{{job="{JOB}", '
              f'reason="capacity"}}[5m]) > 0')
    wait_for(lambda: live.prom.query(waited), 60, 1, waited)
    assert s.get("vllm_requests_waiting_by_reason", reason="deferred", **LABELS) == 0
    sources = {l["source"]: v for l, v in s.series("vllm_prompt_tokens_by_source_total")}
    assert sources["local_compute"] > 0 and sources["local_cache_hit"] > 0
    assert sources["external_kv_transfer"] == 0
    assert sum(sources.values()) == s.get("vllm_prompt_tokens_total", **LABELS)
    # One observation per finished request, written in the same step as its finish.
    finished = s.get("vllm_requests_finished_total", **LABELS)
    assert s.get("vllm_request_prefill_kv_computed_tokens_count", **LABELS) == finished
    assert 0 < s.get("vllm_request_prefill_kv_computed_tokens_sum", **LABELS) < \
        s.get("vllm_request_prompt_tokens_sum", **LABELS)  # cache hits were not computed
    assert s.get("vllm_kv_cache_max_concurrency", **LABELS) == 16  # 64 x 128 / 512
    assert s.get("vllm_engine_sleep_state", sleep_state="awake", **LABELS) == 1


@pytest.mark.engine
def test_client_aborts_are_counted_and_timed_in_plugin_mode(live):
    s = scrape(live.metrics_url)
    assert s.get("vllm_requests_aborted_total", model=MODEL) >= 1
    count = s.get("vllm_aborted_request_duration_seconds_count", model=MODEL)
    assert count == s.get("vllm_requests_aborted_total", model=MODEL)
    # The client waited `abort_seconds` before it gave up: the request was in the engine about
    # that long (and not minutes). vLLM stamps its arrival once the HTTP request is parsed,
    # a few milliseconds after the client's clock started, hence the 0.1 s of slack.
    mean = s.get("vllm_aborted_request_duration_seconds_sum", model=MODEL) / count
    assert live.abort_seconds - 0.1 <= mean < 30


@pytest.mark.engine
def test_every_engine_panel_has_data_with_the_features_on(live):
    """The dashboards' every-query check, on the engine where the new panels have data: every
    engine-dashboard query returns a number (only the KV-connector panels may be empty)."""
    variables = {"__rate_interval": RATE_INTERVAL, "__range": "5m", "job": JOB,
                 "instance": escape_regex(live.target), "model": MODEL}
    problems, count = query_problems(
        live.prom, ((panel["title"], target) for panel, target in _engine_targets()),
        variables, set(sample_names(NO_CONNECTOR)))
    assert not problems, "\n".join(problems)
    titles = {panel["title"] for panel, _ in _engine_targets()}
    assert {"Draft acceptance rate", "Mean accepted length", "Acceptance by draft position",
            "Admission rejections", "Waiting requests by reason", "KV block residency (p50, p95)",
            "Estimated model FLOP/s and memory traffic per GPU"} <= titles
    assert count > 30 and not live.load.errors, live.load.errors[:3]
    acceptance = substitute(_target("Draft acceptance rate")["expr"], variables)

    def accepted() -> float | None:
        """The panel's rate once its 15 s window holds an accepted draft token (random
        weights accept few)."""
        rate = live.prom.query(acceptance)
        value = float(rate[0]["value"][1]) if rate else float("nan")
        return value if value > 0 else None

    assert wait_for(accepted, 60, 1, f"accepted draft tokens in {acceptance}") <= 1


@pytest.mark.engine
def test_low_acceptance_rule_evaluates_on_the_real_engine(live):
    """With the threshold above any acceptance, the rule's expression is true on real data:
    the rule goes pending (its `for` is 15 minutes)."""
    def state() -> dict | None:
        status, body, _ = http_get(live.metrics_url.removesuffix("/metrics") + "/alerts")
        rule = next(r for r in json.loads(body)["rules"]
                    if r["alert"] == "VllmSpecDecodeLowAcceptance")
        return rule if rule["state"] in ("pending", "firing") else None

    rule = wait_for(state, 30, 0.5, "VllmSpecDecodeLowAcceptance pending")
    assert rule["last_error"] is None
    value = rule["alerts"][0]["value"]
    assert 0 < value <= 1 and rule["alerts"][0]["labels"]["model"] == MODEL


def _engine_targets():
    from exporter.dashboards.inspect import iter_panels

    for panel in iter_panels(DASHBOARDS["engine.json"]):
        for target in panel["targets"]:
            yield panel, target


def _target(title: str) -> dict:
    return next(t for p, t in _engine_targets() if p["title"] == title)




def _post(url: str) -> int:
    request = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status


@pytest.mark.engine
def test_sleep_and_wake_reach_the_sleep_state_gauge(live):
    """Last in the module (it stops the load): vLLM's /sleep and /wake_up move our
    vllm_engine_sleep_state as they move vLLM's own gauge, level by level."""
    live.load.stop()
    ours = {"model": MODEL, "engine": "0"}
    theirs = {"model_name": MODEL, "engine": "0"}

    def states() -> tuple[set, set]:
        """The states at 1 in our gauge and in vLLM's (every state each one has)."""
        mine, own = scrape(live.metrics_url), scrape(live.api_url + "/metrics")
        return (mine.label_values_at("vllm_engine_sleep_state", "sleep_state", 1, **ours),
                own.label_values_at("vllm:engine_sleep_state", "sleep_state", 1, **theirs))

    assert states() == ({"awake"}, {"awake"})
    for level, state in ((1, "weights_offloaded"), (2, "discard_all")):
        assert _post(f"{live.api_url}/sleep?level={level}") == 200
        wait_for(lambda: states() == ({state}, {state}), 30, 0.5,
                 f"{state} after /sleep?level={level}, in ours and in vLLM's gauge")
        assert _post(f"{live.api_url}/wake_up") == 200
        wait_for(lambda: states() == ({"awake"}, {"awake"}), 30, 0.5,
                 "awake after /wake_up, in ours and in vLLM's gauge")
    assert _complete(live.api_url, MODEL, "after waking up")["usage"]["completion_tokens"] == 4
