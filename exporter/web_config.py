"""The metrics port's web configuration file, in the Prometheus exporter-toolkit format.

```yaml
tls_server_config:
  cert_file: server.crt          # relative paths are relative to this file's directory
  key_file: server.key
  client_auth_type: RequireAndVerifyClientCert   # optional; NoClientCert by default
  client_ca_file: ca.crt
  min_version: TLS12             # TLS10 .. TLS13; TLS12 by default
basic_auth_users:
  prometheus: $2b$12$...         # bcrypt hashes only
http_server_config:
  headers:
    Strict-Transport-Security: max-age=31536000
```

`load_web_config(path)` validates everything (the TLS files are loaded into an `ssl.SSLContext`
right away) and raises `ConfigError(source=path, ...)` naming the field. The result is
immutable; a reload builds a new one and the server swaps its reference, so a request sees
either the old or the new configuration, never a mix.

Password checks: the username is compared with `hmac.compare_digest` against every configured
user, and the password with bcrypt (against a fixed dummy hash when the user is unknown, so the
time taken does not tell which users exist). A successful check is remembered, keyed by a
SHA-256 of (user, password), for the lifetime of this configuration object: Prometheus sends the
same credentials on every scrape, and a bcrypt round (~0.2 s at cost 10) per scrape would cost
more than the scrape. Failures are never cached; their cost is bounded by the server's limit on
concurrent requests.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import importlib.util
import re
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config_files import ConfigError, read_yaml_file

TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# exporter-toolkit's client_auth_type values that Python's ssl module can honour. Go's
# RequestClientCert / RequireAnyClientCert accept a certificate without verifying it, which
# Python's ssl cannot do: they are rejected rather than silently weakened or strengthened.
CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
UNSUPPORTED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")
# The response headers exporter-toolkit lets users set (the others are the server's own).
ALLOWED_HEADERS = ("Strict-Transport-Security", "X-Content-Type-Options", "X-Frame-Options",
                   "X-XSS-Protection", "Content-Security-Policy")
TLS_KEYS = ("cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version",
            "max_version")
# Keys of the toolkit's format that this server does not implement: an error, not ignored,
# because ignoring e.g. client_allowed_sans would accept clients the operator meant to refuse.
UNSUPPORTED_TLS_KEYS = ("cert", "key", "client_ca", "cipher_suites", "curve_preferences",
                        "prefer_server_cipher_suites", "client_allowed_sans")
BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
# A valid bcrypt hash of a random password nobody knows: checked for unknown users.
_DUMMY_HASH = b"$2b$10$F/E/oGuxn98ruFMEFyZL5.NaIO0Fqhy.tgESg1T1Xcl2LukxCC826"
_CACHE_MAX = 256


@dataclass(frozen=True)
class WebConfig:
    """A validated web configuration. `WebConfig()` is the default: plain HTTP, no auth."""

    source: str = "<none>"
    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    headers: dict[str, str] = field(default_factory=dict)
    _ok_cache: dict[bytes, bool] = field(default_factory=dict, compare=False, repr=False)
    _cache_lock: threading.Lock = field(default_factory=threading.Lock, compare=False,
                                        repr=False)

    @property
    def tls(self) -> bool:
        return self.ssl_context is not None

    @property
    def auth_required(self) -> bool:
        return bool(self.users)

    def check_authorization(self, header: str | None) -> bool:
        """True if `header` (an Authorization value) carries valid credentials."""
        if not self.users:
            return True
        credentials = parse_basic_auth(header)
        if credentials is None:
            return False
        user, password = credentials
        key = hashlib.sha256(user.encode() + b"\0" + password.encode()).digest()
        if self._ok_cache.get(key):
            return True
        stored = None
        for name, hashed in self.users.items():  # no early exit: constant in the match position
            if hmac.compare_digest(name.encode(), user.encode()):
                stored = hashed
        try:
            ok = bcrypt_check(password.encode(), stored or _DUMMY_HASH) and stored is not None
        except ValueError:
            ok = False
        if ok:
            with self._cache_lock:
                if len(self._ok_cache) >= _CACHE_MAX:
                    self._ok_cache.clear()
                self._ok_cache[key] = True
        return ok


def bcrypt_check(password: bytes, hashed: bytes) -> bool:
    import bcrypt

    return bcrypt.checkpw(password, hashed)


def parse_basic_auth(header: str | None) -> tuple[str, str] | None:
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user, password


def load_web_config(path: str | Path | None) -> WebConfig:
    """Read and validate the file; raises ConfigError(source=path, field, problem)."""
    if path is None:
        return WebConfig()
    source = str(path)
    raw = read_yaml_file(path, "web config file")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, "-", "the top level must be a mapping")
    known = ("tls_server_config", "basic_auth_users", "http_server_config")
    for key in raw:
        if key not in known:
            raise ConfigError(source, str(key), f"unknown key; known keys: {', '.join(known)}")
    base = Path(path).resolve().parent
    return WebConfig(
        source=source,
        ssl_context=_tls(raw.get("tls_server_config"), source, base),
        users=_users(raw.get("basic_auth_users"), source),
        headers=_headers(raw.get("http_server_config"), source),
    )


def _mapping(value: Any, source: str, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(source, where, f"must be a mapping, got {type(value).__name__}")
    return value


def _string(section: dict, key: str, source: str, where: str) -> str | None:
    value = section.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(source, f"{where}.{key}", f"must be a string, got {value!r}")
    return value


def _tls(value: Any, source: str, base: Path) -> ssl.SSLContext | None:
    where = "tls_server_config"
    section = _mapping(value, source, where)
    if not section:
        return None
    for key in section:
        if key in UNSUPPORTED_TLS_KEYS:
            raise ConfigError(source, f"{where}.{key}", "not supported by vllm-exporter "
                              f"(supported: {', '.join(TLS_KEYS)})")
        if key not in TLS_KEYS:
            raise ConfigError(source, f"{where}.{key}",
                              f"unknown key; known: {', '.join(TLS_KEYS)}")
    cert = _string(section, "cert_file", source, where)
    key = _string(section, "key_file", source, where)
    if cert is None or key is None:
        missing = "cert_file" if cert is None else "key_file"
        raise ConfigError(source, f"{where}.{missing}", "required when tls_server_config is set")
    cert_path, key_path = base / cert, base / key
    for name, file in (("cert_file", cert_path), ("key_file", key_path)):
        if not file.is_file():
            raise ConfigError(source, f"{where}.{name}", f"{file} does not exist")

    versions = {}
    for name, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        spelled = _string(section, name, source, where) or default
        if spelled not in TLS_VERSIONS:
            raise ConfigError(source, f"{where}.{name}",
                              f"must be one of {', '.join(TLS_VERSIONS)}, got {spelled!r}")
        versions[name] = TLS_VERSIONS[spelled]
    if versions["min_version"] > versions["max_version"]:
        raise ConfigError(source, f"{where}.min_version", "must not exceed max_version")

    auth = _string(section, "client_auth_type", source, where) or "NoClientCert"
    if auth in UNSUPPORTED_CLIENT_AUTH:
        raise ConfigError(source, f"{where}.client_auth_type",
                          f"{auth} (a client certificate accepted without verification) is not "
                          f"supported; use one of {', '.join(CLIENT_AUTH)}")
    if auth not in CLIENT_AUTH:
        raise ConfigError(source, f"{where}.client_auth_type",
                          f"must be one of {', '.join(CLIENT_AUTH)}, got {auth!r}")
    ca = _string(section, "client_ca_file", source, where)
    if ca is not None and auth == "NoClientCert":
        raise ConfigError(source, f"{where}.client_ca_file",
                          "set, but client_auth_type is NoClientCert: set client_auth_type to "
                          "RequireAndVerifyClientCert or VerifyClientCertIfGiven")
    if ca is None and auth != "NoClientCert":
        raise ConfigError(source, f"{where}.client_ca_file", f"required with {auth}")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.minimum_version = versions["min_version"]
        context.maximum_version = versions["max_version"]
    except (ValueError, ssl.SSLError) as exc:
        raise ConfigError(source, f"{where}.min_version", f"not available here: {exc}") from None
    try:
        context.load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(source, f"{where}.cert_file",
                          f"cannot load the certificate {cert_path} with key {key_path}: {exc}"
                          ) from None
    context.verify_mode = CLIENT_AUTH[auth]
    if ca is not None:
        ca_path = base / ca
        if not ca_path.is_file():
            raise ConfigError(source, f"{where}.client_ca_file", f"{ca_path} does not exist")
        try:
            context.load_verify_locations(cafile=str(ca_path))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(source, f"{where}.client_ca_file",
                              f"cannot load CA certificates from {ca_path}: {exc}") from None
    return context


def _users(value: Any, source: str) -> dict[str, bytes]:
    where = "basic_auth_users"
    section = _mapping(value, source, where)
    users = {}
    for user, hashed in section.items():
        if not isinstance(user, str) or not user or ":" in user:
            raise ConfigError(source, f"{where}.{user}",
                              "a user name must be a non-empty string without ':'")
        if not isinstance(hashed, str) or not BCRYPT_HASH.fullmatch(hashed):
            raise ConfigError(source, f"{where}.{user}",
                              "must be a bcrypt hash ($2a$/$2b$/$2y$, e.g. from "
                              "`htpasswd -nBC 10 USER`), not a plain password")
        users[user] = hashed.encode()
    if users and importlib.util.find_spec("bcrypt") is None:  # fail the start, not a request
        raise ConfigError(source, where, "needs the Python package bcrypt (pip install bcrypt)")
    return users


def _headers(value: Any, source: str) -> dict[str, str]:
    where = "http_server_config"
    section = _mapping(value, source, where)
    for key in section:
        if key == "http2":  # accepted for compatibility; this server speaks HTTP/1.1
            if not isinstance(section[key], bool):
                raise ConfigError(source, f"{where}.http2", "must be true or false")
        elif key != "headers":
            raise ConfigError(source, f"{where}.{key}", "unknown key; known: headers, http2")
    headers = {}
    for name, text in _mapping(section.get("headers"), source, f"{where}.headers").items():
        canonical = next((h for h in ALLOWED_HEADERS if h.lower() == str(name).lower()), None)
        if canonical is None:
            raise ConfigError(source, f"{where}.headers.{name}",
                              f"not settable; allowed: {', '.join(ALLOWED_HEADERS)}")
        if not isinstance(text, str) or "\r" in text or "\n" in text:
            raise ConfigError(source, f"{where}.headers.{name}",
                              "must be a one-line string")
        headers[canonical] = text
    return headers
