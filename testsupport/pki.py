"""Certificates and web config files for the metrics port's TLS and basic auth, made fresh per
run with `cryptography` and `bcrypt` (for the tests and the scrape-flood benchmark)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import httpx
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, cert, key=None) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))


def _issue(name: str, key, issuer_name, issuer_key, ca: bool = False, server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                           name)]))
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


@dataclass
class Pki:
    dir: Path
    ca: Path  # CA certificate (PEM)
    server_cert: Path
    server_key: Path
    server2_cert: Path  # a second server certificate, for rotation
    server2_key: Path
    client_cert: Path
    client_key: Path


def make_pki(d: Path) -> Pki:
    """A throwaway CA, two server certificates for localhost/127.0.0.1 and a client one."""
    ca_key = _key()
    ca = _issue("test CA", ca_key, None, None, ca=True)
    _write(d / "ca", ca)
    names = {}
    for name, server in (("server", True), ("server2", True), ("client", False)):
        key = _key()
        _write(d / name, _issue(f"{name}.test", key, ca.subject, ca_key, server=server), key)
        names[name] = (d / f"{name}.crt", d / f"{name}.key")
    return Pki(d, d / "ca.crt", *names["server"], *names["server2"], *names["client"])


def bcrypt_hash(password: str, rounds: int = 4) -> str:
    """Tests use the cheapest cost; a deployment (and the flood benchmark) uses 10 or more."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds)).decode()


def write_web_config(path: Path, pki: Pki | None = None, users: dict[str, str] | None = None,
                     client_certs: bool = False, cert: Path | None = None,
                     key: Path | None = None, headers: dict | None = None,
                     rounds: int = 4) -> Path:
    raw: dict = {}
    if pki is not None:
        tls = {"cert_file": str(cert or pki.server_cert), "key_file": str(key or pki.server_key)}
        if client_certs:
            tls.update(client_auth_type="RequireAndVerifyClientCert", client_ca_file=str(pki.ca))
        raw["tls_server_config"] = tls
    if users:
        raw["basic_auth_users"] = {user: bcrypt_hash(pw, rounds) for user, pw in users.items()}
    if headers:
        raw["http_server_config"] = {"headers": headers}
    path.write_text(yaml.safe_dump(raw))
    return path


def tls_client(pki: Pki, client_cert: bool = False, **kwargs) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client_cert:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    return httpx.Client(verify=context, timeout=10, **kwargs)
