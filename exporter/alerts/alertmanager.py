"""Alertmanager API v2 client: one bounded queue and one sender thread per Alertmanager URL.

`enqueue(alerts)` never blocks: each alert goes into every URL's queue, keyed by its labels,
so a newer state of the same alert (re-sent firing, or resolved) replaces the queued one
instead of piling up. A queue never holds more than `queue_size` alerts: beyond that the
oldest is dropped and counted. The sender POSTs batches to /api/v2/alerts; on failure it
keeps the batch, waits (exponential backoff from retry_initial_seconds to retry_max_seconds)
and tries again, so alerts queued while Alertmanager is down arrive once it is back.

Every alert leaves with the replica's labels (`replica_labels`: instance and the configured
external labels) added where it does not carry them already, as Prometheus adds its
external_labels: N daemons firing the same rule stay N alerts in Alertmanager.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from .config import AlertmanagerConfig

log = logging.getLogger("exporter.alerts.alertmanager")

BATCH_SIZE = 64


class RejectedError(Exception):
    """Alertmanager answered 4xx to the payload itself (not auth, not overload)."""


class SendCounters:
    """Callbacks for the client's counters (the service wires them to metric families)."""

    def __init__(self, sent: Callable[[str, int], None] = lambda url, n: None,
                 failed: Callable[[str, int], None] = lambda url, n: None,
                 dropped: Callable[[str, int], None] = lambda url, n: None):
        self.sent, self.failed, self.dropped = sent, failed, dropped


class AlertQueue:
    """Alerts waiting for one Alertmanager, newest state per label set, oldest first."""

    def __init__(self, bound: int):
        self.bound = bound
        self._items: OrderedDict[tuple, dict] = OrderedDict()
        self._lock = threading.Lock()
        self.max_seen = 0  # the largest length ever reached (tests assert it stays <= bound)

    def put(self, alert: dict) -> int:
        """Add or replace; returns how many older alerts were dropped to stay in bound."""
        key = tuple(sorted(alert["labels"].items()))
        dropped = 0
        with self._lock:
            if key in self._items:
                del self._items[key]
            while len(self._items) >= self.bound:
                self._items.popitem(last=False)
                dropped += 1
            self._items[key] = alert
            self.max_seen = max(self.max_seen, len(self._items))
        return dropped

    def peek(self, n: int) -> list[tuple[tuple, dict]]:
        with self._lock:
            return [item for _, item in zip(range(n), self._items.items())]

    def remove_sent(self, batch: list[tuple[tuple, dict]]) -> None:
        """Drop what was sent, unless a newer state replaced it meanwhile."""
        with self._lock:
            for key, alert in batch:
                if self._items.get(key) is alert:
                    del self._items[key]

    def __len__(self) -> int:
        return len(self._items)


class AlertmanagerClient:
    def __init__(self, config: AlertmanagerConfig, counters: SendCounters | None = None,
                 replica_labels: dict[str, str] | None = None):
        self.config = config
        self.counters = counters or SendCounters()
        self.replica_labels = dict(replica_labels or {})
        self.queues = {url: AlertQueue(config.queue_size) for url in config.urls}
        self._wake = {url: threading.Event() for url in config.urls}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ssl = self._ssl_context()

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not any(u.startswith("https://") for u in self.config.urls):
            return None
        context = ssl.create_default_context(cafile=self.config.tls_ca_file)
        if self.config.tls_insecure_skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def start(self) -> None:
        for url in self.config.urls:
            thread = threading.Thread(target=self._run, args=(url,), daemon=True,
                                      name=f"alertmanager-{len(self._threads)}")
            thread.start()
            self._threads.append(thread)

    def wait_until_delivered(self, timeout: float) -> bool:
        """Wait up to `timeout` s for every queue to empty; True if they did."""
        deadline = time.monotonic() + timeout
        while any(len(q) for q in self.queues.values()):
            if time.monotonic() >= deadline:
                return False
            self._stop.wait(0.02)
        return True

    def stop(self, flush_seconds: float = 0.0) -> None:
        """Stop the senders; first give them up to flush_seconds to empty their queues."""
        if flush_seconds > 0:
            self.wait_until_delivered(flush_seconds)
        self._stop.set()
        for event in self._wake.values():
            event.set()
        for thread in self._threads:
            thread.join(timeout=self.config.timeout_seconds + 1)

    def with_replica_labels(self, alert: dict) -> dict:
        """The alert with the replica's labels under its own (its own win)."""
        if not self.replica_labels:
            return alert
        return {**alert, "labels": {**self.replica_labels, **alert["labels"]}}

    def enqueue(self, alerts: list[dict]) -> None:
        alerts = [self.with_replica_labels(alert) for alert in alerts]
        for url, queue in self.queues.items():
            dropped = sum(queue.put(alert) for alert in alerts)
            if dropped:
                self.counters.dropped(url, dropped)
                log.warning("Alertmanager %s: queue full, dropped %d oldest alert(s)", url,
                            dropped)
            if alerts:
                self._wake[url].set()

    def queue_length(self, url: str) -> int:
        return len(self.queues[url])

    # --- sender ----------------------------------------------------------------------------
    def _run(self, url: str) -> None:
        queue, wake = self.queues[url], self._wake[url]
        backoff = self.config.retry_initial_seconds
        while not self._stop.is_set():
            batch = queue.peek(BATCH_SIZE)
            if not batch:
                wake.wait(1.0)
                wake.clear()
                continue
            try:
                self.post(url, [alert for _, alert in batch])
            except RejectedError as exc:  # retrying the same payload cannot help
                self.counters.failed(url, len(batch))
                self.counters.dropped(url, len(batch))
                log.error("Alertmanager %s rejected %d alert(s), dropped: %s", url, len(batch),
                          exc)
                queue.remove_sent(batch)
                continue
            except Exception as exc:  # any failure: keep the batch, back off, retry
                self.counters.failed(url, len(batch))
                log.warning("sending %d alert(s) to %s failed: %s; retrying in %.1fs",
                            len(batch), url, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.config.retry_max_seconds)
                continue
            backoff = self.config.retry_initial_seconds
            queue.remove_sent(batch)
            self.counters.sent(url, len(batch))

    def post(self, url: str, alerts: list[dict]) -> None:
        body = json.dumps(alerts).encode()
        request = urllib.request.Request(url.rstrip("/") + "/api/v2/alerts", data=body,
                                         method="POST")
        request.add_header("Content-Type", "application/json")
        auth = self._authorization()
        if auth:
            request.add_header("Authorization", auth)
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_seconds,
                                        context=self._ssl) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:200].decode(errors="replace")
            if 400 <= exc.code < 500 and exc.code not in (401, 403, 408, 429):
                raise RejectedError(f"HTTP {exc.code}: {detail}") from None
            raise RuntimeError(f"HTTP {exc.code}: {detail}") from None

    def _authorization(self) -> str | None:
        """Read secrets at each send, so rotated files take effect without a restart."""
        c = self.config
        if c.bearer_token_file:
            return "Bearer " + Path(c.bearer_token_file).read_text().strip()
        if c.basic_auth_username:
            password = Path(c.basic_auth_password_file).read_text().strip()
            pair = f"{c.basic_auth_username}:{password}".encode()
            return "Basic " + base64.b64encode(pair).decode()
        return None
