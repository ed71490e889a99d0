"""The load generator: streaming completions at a fixed concurrency or arrival rate.

Latency is measured client-side from the stream: TTFT is send -> first streamed chunk, the
inter-token latencies are the gaps between consecutive chunks (vLLM streams one chunk per
engine step per request), end-to-end is send -> end of stream. Token counts come from the
server's `usage` (stream_options.include_usage), so they can be compared with the daemon's
counters exactly.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx

from .errors import UsageError
from .progress import Progress
from .workload import RequestSpec, Workload


@dataclass(frozen=True)
class LoadSpec:
    """How requests arrive and when the run ends.

    Exactly one of `concurrency` (closed loop: that many requests always in flight) and `rate`
    (open loop: requests/s, evenly spaced or Poisson) is set; the run ends after `requests`
    requests or after `duration` seconds of sending (in-flight requests are then awaited).
    """

    concurrency: int | None = None
    rate: float | None = None
    poisson: bool = False
    requests: int | None = None
    duration: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise UsageError("give exactly one of --concurrency and --rate")
        if self.concurrency is not None and self.concurrency < 1:
            raise UsageError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.rate is not None and self.rate <= 0:
            raise UsageError(f"--rate must be > 0 requests/s, got {self.rate}")
        if (self.requests is None) == (self.duration is None):
            raise UsageError("give exactly one of --requests and --duration")
        if self.requests is not None and self.requests < 1:
            raise UsageError(f"--requests must be >= 1, got {self.requests}")
        if self.duration is not None and self.duration <= 0:
            raise UsageError(f"--duration must be > 0 seconds, got {self.duration}")

    def describe(self) -> dict:
        mode = "concurrency" if self.concurrency else ("poisson" if self.poisson else "fixed-rate")
        return {"mode": mode, "concurrency": self.concurrency, "rate": self.rate,
                "requests": self.requests, "duration": self.duration}


@dataclass
class RequestRecord:
    index: int
    sent: float  # monotonic seconds
    ok: bool = False
    error: str = ""
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    e2e: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = None


@dataclass
class LoadResult:
    records: list[RequestRecord]
    started: float
    finished: float

    @property
    def wall_seconds(self) -> float:
        return max(self.finished - self.started, 1e-9)


async def _one_request(client: httpx.AsyncClient, url: str, headers: dict, model: str,
                       request: RequestSpec) -> RequestRecord:
    payload = {"model": model, "prompt": request.prompt_token_ids,
               "max_tokens": request.max_tokens, "stream": True,
               "stream_options": {"include_usage": True}, "ignore_eos": True,
               "temperature": 0.0}
    record = RequestRecord(request.index, time.monotonic())
    last_chunk = None
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                record.error = f"HTTP {response.status_code}: {body[:200]}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                now = time.monotonic()
                if chunk.get("choices"):
                    if last_chunk is None:
                        record.ttft = now - record.sent
                    else:
                        record.itls.append(now - last_chunk)
                    last_chunk = now
                    record.finish_reason = (chunk["choices"][0].get("finish_reason")
                                            or record.finish_reason)
                if chunk.get("usage"):
                    record.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    record.output_tokens = chunk["usage"]["completion_tokens"]
        record.e2e = time.monotonic() - record.sent
        record.ok = record.finish_reason is not None
        if not record.ok:
            record.error = "stream ended without a finish reason"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    return record


async def run_load(api_url: str, model: str, workload: Workload, load: LoadSpec, *,
                   api_key: str | None = None, progress: Progress | None = None,
                   request_timeout: float = 600.0, first_index: int = 0) -> LoadResult:
    """Send the workload's requests first_index, first_index+1, ... as `load` says."""
    url = api_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    records: list[RequestRecord] = []
    started = time.monotonic()
    deadline = started + load.duration if load.duration else None
    counter = iter(range(first_index, first_index + (load.requests or 10**12)))

    def next_index() -> int | None:
        if deadline is not None and time.monotonic() >= deadline:
            return None
        return next(counter, None)

    async with httpx.AsyncClient(timeout=request_timeout, limits=limits) as client:
        async def send(index: int) -> None:
            record = await _one_request(client, url, headers, model, workload.request(index))
            records.append(record)
            if progress:
                progress.advance(record.ok)

        if load.concurrency:
            async def worker() -> None:
                while (index := next_index()) is not None:
                    await send(index)

            await asyncio.gather(*(worker() for _ in range(load.concurrency)))
        else:
            rng = random.Random(f"arrivals-{load.seed}")
            tasks = []
            next_send = started
            while (index := next_index()) is not None:
                delay = next_send - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                    if deadline is not None and time.monotonic() >= deadline:
                        break
                tasks.append(asyncio.create_task(send(index)))
                gap = rng.expovariate(load.rate) if load.poisson else 1.0 / load.rate
                next_send += gap
            await asyncio.gather(*tasks)
    if progress:
        progress.close()
    records.sort(key=lambda r: r.index)
    return LoadResult(records, started, time.monotonic())


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p95/p99 and mean (numpy's linear interpolation); None for no values."""
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    import numpy as np

    array = np.asarray(values, dtype=float)
    p50, p95, p99 = np.percentile(array, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(array.mean())}


def summarize(result: LoadResult) -> dict:
    """Client-side counts, throughput and latency percentiles of one run."""
    ok = [r for r in result.records if r.ok]
    failed = [r for r in result.records if not r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    wall = result.wall_seconds
    finish: dict[str, int] = {}
    for r in ok:
        finish[r.finish_reason] = finish.get(r.finish_reason, 0) + 1
    return {
        "requests_ok": len(ok),
        "requests_failed": len(failed),
        "errors": sorted({r.error for r in failed})[:5],
        "finish_reasons": finish,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "wall_seconds": wall,
        "requests_per_second": len(ok) / wall,
        "output_tokens_per_second": output_tokens / wall,
        "total_tokens_per_second": (output_tokens + prompt_tokens) / wall,
        "ttft_seconds": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl_seconds": percentiles([gap for r in ok for gap in r.itls]),
        "e2e_seconds": percentiles([r.e2e for r in ok if r.e2e is not None]),
    }
