"""Requests against a daemon's OpenAI API, sent from a thread of their own beside a test."""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field

import httpx

from .daemon import DEFAULT_MODEL


class BackgroundLoad:
    """Workers sending completions from a thread of their own until stop().

    Subclasses set `api_url`, `concurrency`, `_stop` (a threading.Event) and `_thread`, and
    write `_worker(client, index)`; this class owns the thread and the openai client.
    """

    def start(self):
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(120)

    async def _main(self) -> None:
        import openai

        client = openai.AsyncOpenAI(base_url=self.api_url + "/v1", api_key="unused",
                                    max_retries=0, timeout=120)
        await asyncio.gather(*(self._worker(client, i) for i in range(self.concurrency)))
        await client.close()

    async def _worker(self, client, index: int) -> None:
        raise NotImplementedError


async def abandoned_request(client, model: str, prompt: str, timeout: float,
                            max_tokens: int) -> str:
    """A non-streamed completion whose client gives up after `timeout` s: "abandoned", or
    "finished" if it came back first. vLLM cancels such a request (an abort) as soon as its
    connection closes. `client` is an openai.AsyncOpenAI."""
    import openai

    try:
        await client.with_options(timeout=timeout).completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, extra_body={"ignore_eos": True})
    except openai.APITimeoutError:
        return "abandoned"
    return "finished"


# ~280 tokens of the default model: two full KV-cache blocks (128 tokens), so that requests
# sharing it hit the prefix cache.
SHARED_PREFIX = ("You are a helpful assistant for the operators of a large language model "
                 "service. Answer briefly. ") * 5
PROMPTS = ("The quick brown fox jumps over the lazy dog", "Tell me a story about a cat",
           "Prometheus scrapes metrics every few seconds", "Once upon a time",
           "Grafana draws dashboards from queries " * 4)


@dataclass
class Load(BackgroundLoad):
    """Keeps `concurrency` workers sending completions (plain, streamed, and, with `abandons`,
    requests the client abandons) until stopped; counts what finished and what was aborted."""

    api_url: str
    model: str
    concurrency: int = 4
    abandons: bool = True
    finished: int = 0
    aborted: int = 0
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    async def _worker(self, client, index: int) -> None:
        n = 0
        while not self._stop.is_set():
            prompt = PROMPTS[(index + n) % len(PROMPTS)]
            if n % 3 == 1:
                prompt = SHARED_PREFIX + prompt
            max_tokens = (8, 24, 48)[(index + n) % 3]
            try:
                if self.abandons and n % 7 == 3:  # a client that gives up after 0.3 s: an abort at the API
                    outcome = await abandoned_request(client, self.model,
                                                      PROMPTS[(index + n) % len(PROMPTS)],
                                                      timeout=0.3, max_tokens=480)
                    if outcome == "abandoned":
                        self.aborted += 1
                    else:  # a fast engine finished 480 tokens within 0.3 s
                        self.finished += 1
                elif n % 2:
                    stream = await client.completions.create(
                        model=self.model, prompt=prompt, max_tokens=max_tokens, stream=True)
                    async for _chunk in stream:
                        pass
                else:
                    await client.completions.create(model=self.model, prompt=prompt,
                                                    max_tokens=max_tokens)
                self.finished += 1
            except Exception as exc:  # recorded; the test asserts there were none
                self.errors.append(repr(exc))
                await asyncio.sleep(0.5)  # a pause before the next try, not a wait
            n += 1


class Saturation(BackgroundLoad):
    """Far more concurrent long requests than the engine's max_num_seqs, until stopped.

    Lengths differ per worker so requests finish at different steps: the queue stays long
    instead of emptying in waves (same-length requests finish together).
    """

    def __init__(self, api_url: str, model: str, concurrency: int = 96, max_tokens: int = 256):
        self.api_url, self.model = api_url, model
        self.concurrency, self.max_tokens = concurrency, max_tokens
        self.finished = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    async def _worker(self, client, index: int) -> None:
        max_tokens = self.max_tokens // 4 + (index * 37) % self.max_tokens
        while not self._stop.is_set():
            try:
                await client.completions.create(model=self.model, prompt="the queue grows",
                                                max_tokens=max_tokens,
                                                extra_body={"ignore_eos": True})
                self.finished += 1
            except Exception as exc:
                self.errors.append(repr(exc))
                await asyncio.sleep(0.5)  # a pause before the next try, not a wait


class InFlightStream(threading.Thread):
    """A streaming request (200 tokens, EOS ignored) that is mid-generation when the daemon is
    told to stop; `outcome` is its finish reason, or what went wrong. `started` is set at the
    first line of the stream."""

    def __init__(self, api_url: str, model: str = DEFAULT_MODEL):
        super().__init__(daemon=True)
        self.api_url, self.model, self.outcome = api_url, model, "not finished"
        self.started = threading.Event()
        self.start()

    def run(self) -> None:
        payload = {"model": self.model, "prompt": "drain me", "max_tokens": 200,
                   "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", self.api_url + "/v1/completions", json=payload,
                              timeout=60) as response:
                for line in response.iter_lines():
                    self.started.set()
                    if line.startswith("data: {"):
                        reason = json.loads(line[6:])["choices"][0]["finish_reason"]
                        if reason:
                            self.outcome = reason
        except httpx.HTTPError as exc:
            self.outcome = f"error: {exc!r}"
        finally:
            self.started.set()
