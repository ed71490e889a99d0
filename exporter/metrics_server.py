"""The metrics port: /metrics, /-/healthy, /-/ready, a landing page, and routes others add.

A plain `http.server.ThreadingHTTPServer` on its own thread: a scrape renders the registry's
current values (prometheus-client's encoders, with OpenMetrics negotiation and gzip) and never
waits on the engine or on NVML.

Protection (docs/security.md): an optional web config (TLS, basic auth, response headers; see
web_config.py) that can be swapped while serving; at most `max_connections` open connections
(more are closed at accept) and `max_concurrent_requests` requests in progress (more get 503);
a socket timeout on every read and write; a request line of at most 8 KiB and a request head of
at most 32 KiB. The TLS handshake runs on the connection's own thread, never on the accept loop,
so a client that connects and stalls cannot block other clients.
"""

from __future__ import annotations

import contextlib
import gzip
import html
import http.client
import json
import logging
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .exposition import RendersItself, render_families
from .metrics import EngineMetrics
from .web_config import WebConfig

log = logging.getLogger("exporter.metrics_server")

# A route returns (status, content type, body).
Route = Callable[[], tuple[int, str, bytes]]

MAX_REQUEST_LINE = 8 * 1024  # bytes; longer gets 414
MAX_REQUEST_HEAD = 32 * 1024  # bytes of request line + headers; more gets 431
# Probes answer from a cached state, cost nothing, and must not fail because scrapes flood the
# port or because Kubernetes probes cannot send credentials: no auth, no concurrency slot.
UNPROTECTED_PATHS = ("/-/healthy", "/-/ready")


class MetricsServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry, metrics: EngineMetrics,
                 health: Callable[[], tuple[bool, bool, str]], web_config: WebConfig | None = None,
                 max_concurrent_requests: int = 8, max_connections: int = 64,
                 request_timeout_seconds: float = 10.0, shards: Any = None):
        """`health()` returns (healthy, ready, a one-line state for humans); `shards`, a
        ShardCollector registered in `registry`, renders its families itself (with any other
        collector given to `add_renderer`)."""
        self.registry = registry
        self.renderers: list[RendersItself] = [shards] if shards is not None else []
        self.metrics = metrics
        self.health = health
        self.routes: dict[str, tuple[Route, str]] = {}
        self._scrape_duration = metrics.scrape_duration_seconds
        self.web_config = web_config or WebConfig()  # replaced whole by set_web_config()
        self.request_timeout_seconds = request_timeout_seconds
        self.max_connections = max_connections
        self.request_slots = threading.BoundedSemaphore(max_concurrent_requests)
        self.connections = 0
        self._connections_lock = threading.Lock()
        handler = _make_handler(self)
        # Binding happens here, so a port in use fails before anything else starts.
        self.httpd = _Server((host, port), handler, self)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    def set_web_config(self, web_config: WebConfig) -> None:
        """Use `web_config` for every request from now on (TLS: for new connections)."""
        old, self.web_config = self.web_config, web_config
        if old.tls != web_config.tls:
            log.warning("metrics port TLS is now %s for new connections",
                        "on" if web_config.tls else "OFF")

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def add_renderer(self, collector: RendersItself) -> None:
        """A collector registered in `registry` that renders its own text (exposition.py)."""
        self.renderers = [*self.renderers, collector]

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
        body = self._render_fast(content_type) or encoder(self.registry)
        if accept_encoding and "gzip" in accept_encoding:
            body, encoding = gzip.compress(body, compresslevel=1), "gzip"
        else:
            encoding = None
        self._scrape_duration.observe(time.perf_counter() - started)
        return content_type, body, encoding

    def _render_fast(self, content_type: str) -> bytes | None:
        """Each renderer's own text (the shards, the alert states, the GPUs), the other
        families through exposition.py; None where prometheus-client's encoder must do it."""
        renderers = self.renderers
        if not renderers:
            return None
        openmetrics = content_type.startswith("application/openmetrics-text; version=1.0.0")
        if not openmetrics and not content_type.startswith("text/plain; version=0.0.4"):
            return None
        with contextlib.ExitStack() as apart:
            for renderer in renderers:
                apart.enter_context(renderer.rendered_apart())
            rest = render_families(self.registry.collect(), openmetrics)
        if rest is None:
            return None
        body = "".join(renderer.render(openmetrics) for renderer in renderers) + rest
        return (body + "# EOF\n" if openmetrics else body).encode()

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


class _Server(ThreadingHTTPServer):
    """Counts connections (closing those beyond the cap) and does TLS per connection thread."""

    def __init__(self, address, handler, owner: MetricsServer):
        self.owner = owner
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:  # on the accept loop
        owner = self.owner
        with owner._connections_lock:
            full = owner.connections >= owner.max_connections
            if not full:
                owner.connections += 1
        if full:
            owner.metrics.scrapes_rejected.labels("connections").inc()
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # the thread did not start: give the slot back
            self._release_connection()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            request.settimeout(self.owner.request_timeout_seconds)
            context = self.owner.web_config.ssl_context  # the config current at connect time
            if context is not None:
                try:
                    request = context.wrap_socket(request, server_side=True)
                except (ssl.SSLError, OSError) as exc:  # plain HTTP, bad client cert, timeout
                    log.debug("TLS handshake with %s failed: %s", client_address[0], exc)
                    self.shutdown_request(request)
                    return
            super().process_request_thread(request, client_address)
        finally:
            self._release_connection()

    def handle_error(self, request, client_address) -> None:
        # A client that resets or stalls mid-response (scanners, timeouts) is routine here:
        # no traceback on stderr for each one.
        log.debug("connection from %s ended with an error", client_address[0], exc_info=True)

    def _release_connection(self) -> None:
        with self.owner._connections_lock:
            self.owner.connections -= 1


class _HeadLimitedReader:
    """The handler's rfile, refusing request lines and heads beyond the limits."""

    def __init__(self, raw):
        self.raw = raw
        self.left = MAX_REQUEST_HEAD

    def new_request(self) -> None:
        self.left = MAX_REQUEST_HEAD

    def readline(self, limit: int = -1) -> bytes:
        cap = min(MAX_REQUEST_LINE, self.left)
        line = self.raw.readline(cap + 1)
        if len(line) > cap:
            raise http.client.LineTooLong("request line or header")
        self.left -= len(line)
        return line

    def __getattr__(self, name: str):
        return getattr(self.raw, name)


def _make_handler(server: MetricsServer):
    class Handler(BaseHTTPRequestHandler):
        server_version = "vllm-exporter"
        protocol_version = "HTTP/1.1"
        timeout = server.request_timeout_seconds  # every read and write of the socket
        # Headers and body leave in two writes; with Nagle's algorithm on, the body waits for
        # the client's delayed ACK of the headers (40 ms on Linux) on every keep-alive scrape.
        disable_nagle_algorithm = True

        def setup(self) -> None:
            super().setup()
            self.rfile = _HeadLimitedReader(self.rfile)

        def handle_one_request(self) -> None:
            self.rfile.new_request()
            try:
                super().handle_one_request()
            except http.client.LineTooLong:  # the request line (headers are answered 431 inside)
                self.requestline, self.request_version, self.command = "", "", ""
                self.send_error(414)

        def send_error(self, code: int, message: str | None = None,
                       explain: str | None = None) -> None:
            if code in (414, 431):
                server.metrics.scrapes_rejected.labels("too_large").inc()
            super().send_error(code, message, explain)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path in UNPROTECTED_PATHS:
                self._serve(path)
                return
            if not server.request_slots.acquire(blocking=False):
                server.metrics.scrapes_rejected.labels("concurrency").inc()
                self._send(503, "text/plain; charset=utf-8",
                           b"too many concurrent requests, retry later\n",
                           extra={"Retry-After": "1"})
                return
            try:
                web = server.web_config
                if web.auth_required and not web.check_authorization(
                        self.headers.get("Authorization")):
                    self._send(401, "text/plain; charset=utf-8", b"Unauthorized\n",
                               extra={"WWW-Authenticate": 'Basic realm="vllm-exporter"'})
                    return
                self._serve(path)
            finally:
                server.request_slots.release()

        def _serve(self, path: str) -> None:
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
            except (BrokenPipeError, ConnectionResetError):
                # The client went away mid-response: routine, not an error of ours.
                log.debug("client %s left during %s", self.address_string(), path)
                self.close_connection = True
            except Exception:  # a broken route must not take the port down
                log.exception("error serving %s", path)
                server.metrics.errors.labels("metrics_server").inc()
                self._send(500, "text/plain; charset=utf-8", b"internal error\n")

        def do_HEAD(self) -> None:  # noqa: N802
            self.do_GET()

        def _send(self, status: int, content_type: str, body: bytes,
                  encoding: str | None = None, extra: dict[str, str] | None = None) -> None:
            path = self.path.split("?", 1)[0]
            known = path in ("/metrics", "/-/healthy", "/-/ready", "/") or path in server.routes
            server.metrics.scrapes.labels(path if known else "other", str(status)).inc()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if encoding:
                self.send_header("Content-Encoding", encoding)
            for name, value in {**server.web_config.headers, **(extra or {})}.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            log.debug("%s %s", self.address_string(), format % args)

    return Handler
