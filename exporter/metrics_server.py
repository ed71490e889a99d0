"""The metrics port: /metrics, /-/healthy, /-/ready, a landing page, and routes others add.

A plain `http.server.ThreadingHTTPServer` on its own thread: a scrape renders the registry's
current values (prometheus-client's encoders, with OpenMetrics negotiation and gzip) and never
waits on the engine or on NVML.
"""

from __future__ import annotations

import gzip
import html
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .metrics import EngineMetrics

log = logging.getLogger("exporter.metrics_server")

# A route returns (status, content type, body).
Route = Callable[[], tuple[int, str, bytes]]


class MetricsServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry, metrics: EngineMetrics,
                 health: Callable[[], tuple[bool, bool, str]]):
        """`health()` returns (healthy, ready, a one-line state for humans)."""
        self.registry = registry
        self.metrics = metrics
        self.health = health
        self.routes: dict[str, tuple[Route, str]] = {}
        self._scrape_duration = metrics.scrape_duration_seconds
        handler = _make_handler(self)
        # Binding happens here, so a port in use fails before anything else starts.
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def add_route(self, path: str, route: Route, description: str) -> None:
        self.routes[path] = (route, description)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-server",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() waits for serve_forever(), so only if started
            self.httpd.shutdown()
            self._thread = None
        self.httpd.server_close()

    # --- responses -------------------------------------------------------------------------
    def render_metrics(self, accept: str | None, accept_encoding: str | None):
        started = time.perf_counter()
        encoder, content_type = choose_encoder(accept or "")
        body = encoder(self.registry)
        if accept_encoding and "gzip" in accept_encoding:
            body, encoding = gzip.compress(body, compresslevel=1), "gzip"
        else:
            encoding = None
        self._scrape_duration.observe(time.perf_counter() - started)
        return content_type, body, encoding

    def landing_page(self) -> bytes:
        healthy, ready, state = self.health()
        links = [("/metrics", "Prometheus metrics"), ("/-/healthy", "liveness"),
                 ("/-/ready", "readiness")]
        links += [(path, desc) for path, (_, desc) in sorted(self.routes.items())]
        items = "".join(f'<li><a href="{p}">{html.escape(p)}</a> &mdash; {html.escape(d)}</li>'
                        for p, d in links)
        return (f"<!doctype html><html><head><title>vllm-exporter</title></head><body>"
                f"<h1>vllm-exporter</h1><p>Engine: {html.escape(state)}</p><ul>{items}</ul>"
                f"</body></html>").encode()


def _make_handler(server: MetricsServer):
    class Handler(BaseHTTPRequestHandler):
        server_version = "vllm-exporter"
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            try:
                if path == "/metrics":
                    content_type, body, encoding = server.render_metrics(
                        self.headers.get("Accept"), self.headers.get("Accept-Encoding"))
                    self._send(200, content_type, body, encoding)
                elif path in ("/-/healthy", "/-/ready"):
                    healthy, ready, state = server.health()
                    ok = healthy if path == "/-/healthy" else ready
                    self._send(200 if ok else 503, "text/plain; charset=utf-8",
                               f"{'OK' if ok else 'Unavailable'}: {state}\n".encode())
                elif path == "/":
                    self._send(200, "text/html; charset=utf-8", server.landing_page())
                elif path in server.routes:
                    status, content_type, body = server.routes[path][0]()
                    self._send(status, content_type, body)
                else:
                    self._send(404, "application/json",
                               json.dumps({"error": f"no route {path}"}).encode())
            except Exception:  # a broken route must not take the port down
                log.exception("error serving %s", path)
                server.metrics.errors.labels("metrics_server").inc()
                self._send(500, "text/plain; charset=utf-8", b"internal error\n")

        def do_HEAD(self) -> None:  # noqa: N802
            self.do_GET()

        def _send(self, status: int, content_type: str, body: bytes,
                  encoding: str | None = None) -> None:
            path = self.path.split("?", 1)[0]
            known = path in ("/metrics", "/-/healthy", "/-/ready", "/") or path in server.routes
            server.metrics.scrapes.labels(path if known else "other", str(status)).inc()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if encoding:
                self.send_header("Content-Encoding", encoding)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            log.debug("%s %s", self.address_string(), format % args)

    return Handler
