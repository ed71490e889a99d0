"""A webhook receiver on a port of its own: records every JSON body POSTed to it (Alertmanager's
notifications, or the alerts an Alertmanager client sends when it stands in for one)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .waiting import wait_for


class WebhookReceiver:
    """Answers every POST with `status`; `payloads`, `headers` and `arrivals` (time.time())
    hold each request's JSON body, headers and arrival, in order. Binds port 0: `port` and
    `url` say what it got."""

    def __init__(self, status: int = 200):
        self.payloads: list = []
        self.headers: list[dict[str, str]] = []
        self.arrivals: list[float] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.payloads.append(json.loads(body))
                    receiver.headers.append(dict(self.headers))
                    receiver.arrivals.append(time.time())
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def received(self) -> list[tuple[float, dict]]:
        """(arrival, payload) of every request so far."""
        with self._lock:
            return list(zip(self.arrivals, self.payloads))

    def alerts(self, alertname: str | None = None, status: str | None = None) -> list[dict]:
        """Every alert of every notification so far, filtered (status: firing | resolved)."""
        out = []
        for _, payload in self.received():
            for alert in payload.get("alerts", []):
                if alertname and alert["labels"].get("alertname") != alertname:
                    continue
                if status and alert["status"] != status:
                    continue
                out.append(alert)
        return out

    def wait(self, alertname: str, status: str = "firing", timeout: float = 30) -> list[dict]:
        """The alerts named `alertname` with `status`, once there is one."""
        return wait_for(lambda: self.alerts(alertname, status), timeout,
                        what=f"{status} {alertname} at the webhook")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
