"""Middleware for the API port (vLLM's own app): puts vLLM's profiling routes behind a bearer
token.

vLLM's --api-key middleware guards only /v1 paths, so once an engine runs with a profiler
config, POST /start_profile and /stop_profile on the API port answer anyone. This guard, for
the daemon to install on the API app (through vLLM's own `--middleware` option),
lets through only requests with `Authorization: Bearer <token>` to those paths. With no token
configured it refuses them all: profiling must be switched on deliberately. Every other path
passes untouched. The tuning command `profile` (tuning/profile.py) sends the token.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets

GUARDED_PATHS = ("/start_profile", "/stop_profile")
TOKEN_ENV = "VLLM_EXPORTER_PROFILE_TOKEN"


class ProfileGuard:
    def __init__(self, app, token: str | None = None):
        """`token` None: read VLLM_EXPORTER_PROFILE_TOKEN (vLLM's --middleware passes no
        arguments, so that is how the daemon installs it)."""
        self.app = app
        if token is None:
            token = os.environ.get(TOKEN_ENV)
        self._digest = hashlib.sha256(token.encode()).digest() if token else None

    def allowed(self, authorization: str | None) -> bool:
        if self._digest is None or not authorization:
            return False
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return secrets.compare_digest(hashlib.sha256(value.encode()).digest(), self._digest)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path", "").rstrip("/") not in GUARDED_PATHS:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        if self.allowed(headers.get("authorization")):
            return await self.app(scope, receive, send)
        status, message = ((401, "a bearer token is required for the profiling routes")
                           if self._digest else
                           (403, f"profiling routes are disabled: no {TOKEN_ENV} configured"))
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
