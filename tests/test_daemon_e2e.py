"""End to end: the real daemon, the real engine, the official `openai` client.

The load mixes streaming and non-streaming requests, several max_tokens, requests stopped by
EOS and by a stop string, and streams the client aborts. The scrape afterwards must agree
exactly with what the API reported.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import urllib.request

import openai
import pytest

from testsupport.exposition import Samples
from testsupport.load import abandoned_request
from testsupport.net import http_get
from testsupport.processes import engine_paused
from testsupport.waiting import wait_for

EOS_TOKEN_ID = 1  # the default model's </s>
MODEL = "vllm-exporter-default"


def _client(daemon) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=daemon.api_url + "/v1", api_key="unused", max_retries=0)


def _post_json(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


class Ledger:
    """What the client saw: finish reasons and usage of every completed request."""

    def __init__(self):
        self.finish: dict[str, int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.completion_lengths: list[int] = []

    def add(self, finish_reason: str, usage) -> None:
        self.finish[finish_reason] = self.finish.get(finish_reason, 0) + 1
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.completion_lengths.append(usage.completion_tokens)


async def _completion(client, ledger: Ledger, prompt: str, stream: bool, **params) -> str:
    if not stream:
        response = await client.completions.create(model=MODEL, prompt=prompt, **params)
        ledger.add(response.choices[0].finish_reason, response.usage)
        return response.choices[0].text
    text, finish, usage = "", None, None
    chunks = await client.completions.create(model=MODEL, prompt=prompt, stream=True,
                                             stream_options={"include_usage": True}, **params)
    async for chunk in chunks:
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    ledger.add(finish, usage)
    return text


async def _chat(client, ledger: Ledger, content: str, **params) -> None:
    response = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **params)
    ledger.add(response.choices[0].finish_reason, response.usage)


async def _aborted_stream(client, prompt: str, after_chunks: int) -> int:
    chunks = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=480,
                                             stream=True, extra_body={"ignore_eos": True})
    received = 0
    async for chunk in chunks:
        received += 1
        if received >= after_chunks:
            break
    await chunks.close()
    return received


async def _completed_load(client, ledger: Ledger) -> None:
    prompts = [f"request {i}: the engine decodes tokens and Prometheus scrapes" for i in range(24)]
    jobs = []
    for i, prompt in enumerate(prompts):
        max_tokens = (1, 5, 16, 40)[i % 4]
        jobs.append(_completion(client, ledger, prompt, stream=bool(i % 2), max_tokens=max_tokens,
                                temperature=0, extra_body={"ignore_eos": True}))
    for i in range(4):  # EOS forced by a logit bias: finish reason "stop", deterministic
        jobs.append(_completion(client, ledger, f"stop me {i}", stream=bool(i % 2), max_tokens=30,
                                logit_bias={str(EOS_TOKEN_ID): 100}))
    for i in range(4):
        jobs.append(_chat(client, ledger, f"hello {i}", max_tokens=8, temperature=0))
    await asyncio.gather(*jobs)
    # Stop strings: take text the model really produces (greedy), then ask to stop at it.
    for i in range(3):
        prompt = f"stop string probe {i}"
        text = await _completion(client, ledger, prompt, stream=False, max_tokens=24,
                                 temperature=0, extra_body={"ignore_eos": True})
        stop = text[8:11]
        if stop.strip():
            await _completion(client, ledger, prompt, stream=bool(i % 2), max_tokens=24,
                              temperature=0, stop=[stop], extra_body={"ignore_eos": True})


def _delta(after, before, name: str, **labels) -> float:
    return after.get(name, **labels) - before.get(name, **labels)


def _scrape_counting(daemon, before: Samples, finished: int) -> Samples | None:
    """A scrape that counts `finished` more finished requests than `before`, else None."""
    now = daemon.scrape()
    done = _delta(now, before, "vllm_requests_finished_total", model=MODEL)
    return now if done >= finished else None


@pytest.mark.engine
def test_scrape_agrees_exactly_with_the_api(daemon):
    client = _client(daemon)
    labels = {"model": MODEL}
    before = daemon.scrape()
    ledger = Ledger()
    asyncio.run(_completed_load(client, ledger))
    finished = sum(ledger.finish.values())
    # The last step's stats reach the logger right after the last response.
    after = wait_for(lambda: _scrape_counting(daemon, before, finished), 10,
                     what=f"{finished} more finished requests in the scrape")

    assert finished >= 30
    assert ledger.finish.get("stop", 0) >= 4 and ledger.finish.get("length", 0) >= 20
    for reason in ("stop", "length", "abort", "error"):
        assert _delta(after, before, "vllm_requests_finished_total", finish_reason=reason,
                      **labels) == ledger.finish.get(reason, 0), reason
    assert _delta(after, before, "vllm_prompt_tokens_total", **labels) == ledger.prompt_tokens
    assert _delta(after, before, "vllm_generation_tokens_total", **labels) == \
        ledger.completion_tokens
    # Per-request histograms: one observation per finished request.
    for family in ("vllm_e2e_request_latency_seconds", "vllm_request_queue_time_seconds",
                   "vllm_request_prefill_time_seconds", "vllm_request_decode_time_seconds",
                   "vllm_request_prompt_tokens", "vllm_request_generation_tokens",
                   "vllm_time_to_first_token_seconds"):
        assert _delta(after, before, family + "_count", **labels) == finished, family
    assert _delta(after, before, "vllm_request_prompt_tokens_sum", **labels) == \
        ledger.prompt_tokens
    assert _delta(after, before, "vllm_request_generation_tokens_sum", **labels) == \
        ledger.completion_tokens
    # One inter-token gap per token after the first; TPOT only where there is a second token.
    assert _delta(after, before, "vllm_inter_token_latency_seconds_count", **labels) == \
        sum(n - 1 for n in ledger.completion_lengths if n > 0)
    assert _delta(after, before, "vllm_time_per_output_token_seconds_count", **labels) == \
        sum(1 for n in ledger.completion_lengths if n > 1)
    # Every request is judged against each latency objective once.
    assert _delta(after, before, "vllm_slo_requests_total", objective="ttft", **labels) == finished
    assert _delta(after, before, "vllm_engine_steps_total", **labels) > 0
    assert after.get("vllm_requests_running", **labels) == 0
    assert after.get("vllm_requests_waiting", **labels) == 0
    assert after.get("vllm_engine_up", **labels) == 1


@pytest.mark.engine
def test_client_aborts_are_counted_and_gauges_return_to_zero(daemon):
    client = _client(daemon)
    labels = {"model": MODEL}
    before = daemon.scrape()

    background = 16  # long requests that keep the batch full, so each step takes longer

    async def load():
        streams = [_aborted_stream(client, f"abort me {i}", 3 + i) for i in range(5)]
        busy = [client.completions.create(model=MODEL, prompt=f"keep busy {i}", max_tokens=400,
                                          extra_body={"ignore_eos": True})
                for i in range(background)]
        results = await asyncio.gather(*streams, *busy)
        return results[:5]

    received = asyncio.run(load())
    assert all(n >= 3 for n in received)

    def accounted(since: Samples) -> tuple[float, float]:
        now = daemon.scrape()
        return (_delta(now, since, "vllm_requests_aborted_total", **labels),
                _delta(now, since, "vllm_requests_finished_total", finish_reason="length",
                       **labels))

    # The server notices a closed stream asynchronously. The engine runs in its own process, and
    # on a starved machine vLLM's front end can lag behind it by a whole generation: it then
    # finishes the stream ("length") before it notices the disconnect, and vLLM itself never
    # aborts it. So the exact, failable claim here is that every request is counted exactly
    # once, as aborted or as finished (the abort path alone was seen 4 of 4 on the H200 run,
    # docs/gpu-daemon-verification.md, and 5 of 5 on an unloaded CPU run); the part below
    # makes aborts certain.
    wait_for(lambda: sum(accounted(before)) >= 5 + background, 60,
             what="every request to be accounted for")
    aborted, finished = accounted(before)
    assert aborted + finished == 5 + background, (aborted, finished)
    assert aborted <= 5  # only the closed streams can be aborts
    wait_for(lambda: daemon.scrape().get("vllm_requests_running", **labels) == 0, 10,
             what="running to return to 0 after the aborts")
    after = daemon.scrape()
    # Aborted requests never finish inside the engine: no finished-request observations.
    assert _delta(after, before, "vllm_e2e_request_latency_seconds_count", **labels) == finished
    assert _delta(after, before, "vllm_time_to_first_token_seconds_count", **labels) == \
        5 + background
    assert _delta(after, before, "vllm_generation_tokens_total", **labels) >= sum(received)
    assert after.get("vllm_requests_waiting", **labels) == 0
    assert after.get("vllm_kv_cache_usage_ratio", **labels) == 0
    # Sampled by the side loop every check interval (0.25 s here).
    wait_for(lambda: daemon.scrape().get("vllm_frontend_requests_unfinished", **labels) == 0, 5,
             what="the front end's unfinished count to reach 0")

    # Requests whose clients give up while the engine core is paused (SIGSTOP) cannot finish:
    # vLLM's front end cancels each when its connection closes, and each counts as aborted.
    abandoned = 3
    with engine_paused(daemon.process.pid):
        async def give_up() -> list[str]:
            fresh = _client(daemon)  # the first client's connections died with their loop
            return await asyncio.gather(*[abandoned_request(fresh, MODEL, f"give up {i}",
                                                            timeout=1.0, max_tokens=16)
                                          for i in range(abandoned)])

        assert asyncio.run(give_up()) == ["abandoned"] * abandoned
        wait_for(lambda: accounted(after)[0] == abandoned, 10,
                 what="the abandoned requests to count as aborted")
    assert accounted(after) == (abandoned, 0)
    wait_for(lambda: daemon.scrape().get("vllm_frontend_requests_unfinished", **labels) == 0, 5,
             what="the front end to drop the abandoned requests")
    assert daemon.scrape().get("vllm_e2e_request_latency_seconds_count", **labels) == \
        after.get("vllm_e2e_request_latency_seconds_count", **labels)


@pytest.mark.engine
def test_bad_api_requests_get_4xx_and_the_engine_keeps_serving(daemon):
    url = daemon.api_url + "/v1/completions"
    bad_json = urllib.request.Request(url, data=b"{not json", method="POST",
                                      headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(bad_json, timeout=30)
        raise AssertionError("malformed JSON was accepted")
    except urllib.error.HTTPError as exc:
        assert 400 <= exc.code < 500, exc.code
    cases = [
        {"model": MODEL, "prompt": "word " * 2000, "max_tokens": 4},  # longer than max_model_len
        {"model": MODEL, "prompt": "hi", "max_tokens": 4, "temperature": -1},
        {"model": MODEL, "prompt": "hi", "max_tokens": -5},
        {"model": MODEL, "prompt": "hi", "max_tokens": 4, "top_p": 7},
        {"model": "no-such-model", "prompt": "hi", "max_tokens": 4},
    ]
    for payload in cases:
        status, body = _post_json(url, payload)
        assert 400 <= status < 500, (payload, status, body)
    status, body = _post_json(url, {"model": MODEL, "prompt": "still there?", "max_tokens": 3})
    assert status == 200 and body["usage"]["completion_tokens"] == 3
    assert daemon.scrape().get("vllm_engine_up", model=MODEL) == 1


@pytest.mark.engine
def test_prompts_and_completions_never_reach_the_log(daemon):
    """At the default level (INFO) neither our lines nor vLLM's carry request content: not on
    success, and not when a bad request is refused (a too-long prompt, a bad parameter)."""
    marker = "confidential-3f9c"
    url = daemon.api_url + "/v1/completions"
    access_line = '"POST /v1/completions HTTP/1.1"'
    lines_before = daemon.log_path.read_text(errors="replace").count(access_line)
    status, body = _post_json(url, {"model": MODEL, "prompt": f"{marker} say something",
                                    "max_tokens": 8})
    assert status == 200
    completion = body["choices"][0]["text"]
    for refused in ({"model": MODEL, "prompt": f"{marker} " * 600, "max_tokens": 4},
                    {"model": MODEL, "prompt": marker, "max_tokens": 4, "top_p": 7}):
        assert 400 <= _post_json(url, refused)[0] < 500

    def log_with_every_request() -> str | None:
        """The log, once it holds the server's access line of each request (a request logs
        anything of its own before that line)."""
        text = daemon.log_path.read_text(errors="replace")
        return text if text.count(access_line) >= lines_before + 3 else None

    log = wait_for(log_with_every_request, 10, what="the access lines of the 3 requests")
    assert marker not in log
    assert len(completion.strip()) < 8 or completion.strip() not in log


@pytest.mark.engine
def test_metrics_port_endpoints(daemon):
    base = f"http://127.0.0.1:{daemon.metrics_port}"
    status, body, _ = http_get(base + "/")
    assert status == 200 and b'href="/metrics"' in body
    assert http_get(base + "/-/healthy")[0] == 200
    assert http_get(base + "/-/ready")[0] == 200
    assert http_get(base + "/nope")[0] == 404
    status, body, headers = http_get(base + "/metrics", headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("Content-Encoding") == "gzip"
    status, body, headers = http_get(
        base + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200 and "openmetrics" in headers["Content-Type"]
    assert body.rstrip().endswith(b"# EOF")
    samples = daemon.scrape()
    info = samples.series("vllm_engine_config_info")
    assert len(info) == 1
    assert info[0][0]["max_model_len"] == "512" and info[0][0]["max_num_seqs"] == "32"
    assert samples.get("vllm_kv_cache_capacity_tokens", model=MODEL) == \
        samples.get("vllm_kv_cache_blocks", model=MODEL) * \
        samples.get("vllm_kv_cache_block_size_tokens", model=MODEL) > 0
    # The default model: 2 layers x 2 KV heads x head dim 64 x K and V x 2 bytes (bfloat16).
    assert samples.get("vllm_kv_cache_bytes_per_token", model=MODEL) == 2 * 2 * 2 * 64 * 2
    assert samples.get("vllm_exporter_build_info", mode="daemon") == 1


@pytest.mark.engine
def test_vllm_runs_on_uvloop_as_under_its_own_launchers(daemon):
    """On asyncio's default loop vLLM's front end answered about 30 % fewer requests."""
    assert "vLLM's server runs on uvloop" in daemon.log_path.read_text(errors="replace")


@pytest.mark.engine
def test_promtool_accepts_the_exposition(daemon):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: scripts/setup.sh installs it"
    text = daemon.scrape().text
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                            capture_output=True, timeout=60)
    problems = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, problems
