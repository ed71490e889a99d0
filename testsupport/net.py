"""Loopback ports and plain HTTP GETs."""

from __future__ import annotations

import socket
import ssl
import urllib.error
import urllib.request


def free_port() -> int:
    """A port nothing listens on right now, for servers that cannot bind port 0 and say
    which port they got (Prometheus, Alertmanager, vLLM)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0, headers: dict | None = None,
             context: ssl.SSLContext | None = None) -> tuple[int, bytes, dict]:
    """(status, body, headers); an HTTP error status is returned, not raised. A connection
    error raises OSError."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)
