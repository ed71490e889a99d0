"""Small helpers shared by the tests: ports, waiting, scraping and parsing expositions."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Callable

from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.2,
             what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_for_vllm(process, api_url: str, log, what: str, timeout: float = 420) -> None:
    """Until vLLM's /health at `api_url` answers 200; fails at once if `process` exits."""

    def healthy() -> bool:
        assert process.poll() is None, log.read_text()[-4000:]
        try:
            return http_get(f"{api_url}/health", timeout=2)[0] == 200
        except OSError:
            return False

    wait_for(healthy, timeout, interval=1, what=what)


def http_get(url: str, timeout: float = 5.0, headers: dict | None = None,
             context: ssl.SSLContext | None = None) -> tuple[int, bytes, dict]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


class Samples:
    """A parsed exposition: value lookups by sample name and label subset."""

    def __init__(self, text: str):
        self.text = text
        self.by_name: dict[str, list[tuple[dict, float]]] = defaultdict(list)
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.by_name[sample.name].append((sample.labels, sample.value))

    def get(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
        return sum(value for sample_labels, value in self.by_name.get(name, [])
                   if all(sample_labels.get(k) == v for k, v in labels.items()))

    def series(self, name: str) -> list[tuple[dict, float]]:
        return self.by_name.get(name, [])


def scrape(metrics_url: str) -> Samples:
    status, body, _ = http_get(metrics_url)
    assert status == 200, f"GET {metrics_url} -> {status}"
    return Samples(body.decode())


class BackgroundLoad:
    """Workers sending completions to the daemon from a thread of their own until stop().

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


def stop_group(process, timeout: float = 60) -> None:
    """SIGTERM a server started in a session of its own, and everything in that session; after
    `timeout` s, SIGKILL what is left."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def engine_core_pids(root: int) -> list[int]:
    """Descendants of `root` whose process title names vLLM's engine core."""
    return descendant_pids(root, b"EngineCore")


def descendant_pids(root: int, marker: bytes) -> list[int]:
    """Descendants of `root` whose command line or process title contains `marker`."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    found = []
    for pid in parents:
        ancestor = parents.get(pid)
        while ancestor and ancestor != root:
            ancestor = parents.get(ancestor)
        if ancestor == root:
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if marker in title:
                found.append(pid)
    return found


@contextlib.contextmanager
def engine_paused(root_pid: int):
    """vLLM's engine core processes under `root_pid` stopped (SIGSTOP) inside the block: the
    API front end keeps accepting and cancelling requests, but none can make progress."""
    pids = engine_core_pids(root_pid)
    assert pids, f"no engine core process under {root_pid}"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield pids
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


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
