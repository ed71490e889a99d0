"""The output-health canary (opt-in, advice.canary_interval_seconds > 0).

Every interval the metrics process sends one greedy completion (temperature 0, a fixed seed)
of a fixed prompt to the daemon's own API and compares it with the first answer the engine
gave: the share of the reference tokens it reproduced before the first difference, and the
largest change of a token's log-probability along that common prefix. A quantization or
FP8 KV-cache fault that corrupts output moves both; a healthy engine repeats itself (up to
the kernels' batch-dependent rounding, which shows as small log-probability drift).

Each request carries `X-Request-Id: vllm-exporter-canary-<n>`, which vLLM turns into the
request id `cmpl-vllm-exporter-canary-<n>-0`: the stat logger (stats.py) leaves requests with
that id out of the per-request families (finished requests, request latency and length
histograms, SLO counters). The step-level families (token counters, TTFT, inter-token latency,
running/waiting, KV-cache usage) cannot tell requests apart and include them. The families
here are `vllm_canary_*`; nothing here raises into the process.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from ..stats import CANARY_REQUEST_HEADER_PREFIX

log = logging.getLogger("exporter.advice.canary")


@dataclass(frozen=True)
class Answer:
    tokens: tuple[str, ...]
    logprobs: tuple[float, ...]


def compare(reference: Answer, answer: Answer) -> tuple[float, float]:
    """(token match ratio, largest |log-probability change|) over the common prefix."""
    common = 0
    for mine, theirs in zip(answer.tokens, reference.tokens):
        if mine != theirs:
            break
        common += 1
    drift = max((abs(a - b) for a, b in zip(answer.logprobs[:common],
                                            reference.logprobs[:common])), default=0.0)
    return common / max(len(reference.tokens), 1), drift


def parse(body: dict) -> Answer:
    logprobs = body["choices"][0]["logprobs"]
    return Answer(tuple(logprobs["tokens"]),
                  tuple(float(x) if x is not None else 0.0 for x in logprobs["token_logprobs"]))


class Canary:
    def __init__(self, api_url: str, prompt: str, max_tokens: int, interval: float,
                 on_result, timeout: float = 30.0):
        """`on_result(model, match_ratio | None, drift | None)`: None values for a failure."""
        self.api_url = api_url.rstrip("/")
        self.prompt, self.max_tokens, self.interval = prompt, max_tokens, interval
        self.on_result, self.timeout = on_result, timeout
        self.reference: dict[str, Answer] = {}
        self.sent = 0  # completions sent, numbering their request ids
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="canary", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.probe()

    def _request(self, path: str, body: dict | None = None,
                 request_id: str | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if request_id is not None:
            headers["X-Request-Id"] = request_id
        key = os.environ.get("VLLM_API_KEY")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.api_url + path, data=data, headers=headers)
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read())

    def probe(self) -> None:
        model = next(iter(self.reference), None)  # for a failure before the model list
        try:
            model = self._request("/v1/models")["data"][0]["id"]
            self.sent += 1
            answer = parse(self._request("/v1/completions", {
                "model": model, "prompt": self.prompt, "max_tokens": self.max_tokens,
                "temperature": 0, "seed": 0, "logprobs": 0},
                request_id=f"{CANARY_REQUEST_HEADER_PREFIX}{self.sent}"))
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as exc:
            # the engine still starting, or gone: not an output fault
            log.debug("canary request failed: %s", exc)
            if model is not None:
                self.on_result(model, None, None)
            return
        reference = self.reference.setdefault(model, answer)
        match, drift = compare(reference, answer)
        if match < 1:
            log.warning("canary: %s reproduced %.0f%% of its first answer (%s)", model,
                        match * 100, time.strftime("%H:%M:%S"))
        self.on_result(model, match, drift)
