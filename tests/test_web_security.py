"""The metrics port's web layer: web config validation, TLS, basic auth, reload, resource limits.

Real servers and real clients: an in-process Runtime + MetricsServer (no engine) on a free port,
httpx and raw sockets as clients, a self-signed CA made with `cryptography`, and the real
`prometheus` binary scraping with basic_auth and tls_config. One test sends SIGHUP to the shared
real daemon.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import generate_latest

from exporter import cli, metrics_process, web_config
from exporter.config import ConfigError, load_config
from exporter.runtime import Runtime
from exporter.web_config import load_web_config
from testsupport.exposition import Samples
from testsupport.net import free_port, http_get
from testsupport.pki import Pki, bcrypt_hash, make_pki, tls_client, write_web_config
from testsupport.prometheus import PROMETHEUS, make_prometheus, scrape_job
from testsupport.waiting import wait_for

USER, PASSWORD = "prometheus", "s3cret-scrape"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def start_runtime(web_config_file: Path | None, **metrics) -> Runtime:
    overrides = {"gpu.enabled": False, "metrics.port": free_port()}
    if web_config_file is not None:
        overrides["metrics.web_config_file"] = str(web_config_file)
    overrides.update({f"metrics.{k}": v for k, v in metrics.items()})
    rt = Runtime(load_config(None, overrides), mode="daemon")
    rt.start()
    return rt


def samples(rt: Runtime) -> Samples:
    return Samples(generate_latest(rt.registry).decode())


# --- validation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("content, field, words", [
    ("tls_server_config: {cert_file: missing.crt, key_file: missing.key}",
     "tls_server_config.cert_file", "does not exist"),
    ("tls_server_config: {key_file: x.key}", "tls_server_config.cert_file", "required"),
    ("basic_auth_users: {alice: plain-password}", "basic_auth_users.alice", "bcrypt hash"),
    ("basic_auth_users: {'a:b': '$2b$04$" + "a" * 53 + "'}", "basic_auth_users.a:b", "':'"),
    ("basic_auth_user: {}", "basic_auth_user", "unknown key"),
    ("http_server_config: {headers: {Server: evil}}", "http_server_config.headers.Server",
     "not settable"),
    ("tls_server_config: [1]", "tls_server_config", "mapping"),
    ("{{{", "-", "not valid YAML"),
])
def test_invalid_web_config_names_the_file_and_field(tmp_path, content, field, words):
    path = tmp_path / "web.yml"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        load_web_config(path)
    assert err.value.source == str(path)
    assert err.value.field_path == field
    assert words in err.value.problem


def test_tls_options_are_validated(tmp_path, pki):
    base = {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}
    cases = [
        ({"client_auth_type": "RequireAndVerifyClientCert"}, "client_ca_file", "required"),
        ({"client_ca_file": str(pki.ca)}, "client_ca_file", "NoClientCert"),
        ({"client_auth_type": "RequireAnyClientCert", "client_ca_file": str(pki.ca)},
         "client_auth_type", "not supported"),
        ({"client_auth_type": "Sometimes"}, "client_auth_type", "must be one of"),
        ({"min_version": "TLS14"}, "min_version", "must be one of"),
        ({"min_version": "TLS13", "max_version": "TLS12"}, "min_version", "max_version"),
        ({"cipher_suites": ["TLS_AES_128_GCM_SHA256"]}, "cipher_suites", "not supported"),
        ({"key_file": str(pki.server2_key)}, "cert_file", "cannot load"),  # mismatched pair
    ]
    for extra, field, words in cases:
        path = tmp_path / "web.yml"
        path.write_text(yaml.safe_dump({"tls_server_config": {**base, **extra}}))
        with pytest.raises(ConfigError) as err:
            load_web_config(path)
        assert err.value.field_path == f"tls_server_config.{field}", extra
        assert words in err.value.problem, (extra, err.value.problem)


def test_relative_paths_are_relative_to_the_web_config_file(tmp_path, pki):
    path = pki.dir / "relative.yml"
    path.write_text(yaml.safe_dump({"tls_server_config": {"cert_file": "server.crt",
                                                          "key_file": "server.key"}}))
    assert load_web_config(path).tls


def test_bad_web_config_exits_2_before_anything_starts(tmp_path, capsys):
    bad = tmp_path / "web.yml"
    bad.write_text("basic_auth_users: {alice: hunter2}\n")
    port = free_port()
    assert cli.main(["check-config", "--web-config-file", str(bad)]) == 2
    assert cli.main(["serve", "--web-config-file", str(bad), "--metrics-port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: field 'basic_auth_users.alice'" in err
    with socket.socket() as probe:  # nothing was left listening
        probe.bind(("127.0.0.1", port))


# --- TLS and basic auth end to end ----------------------------------------------------------------

def test_tls_and_basic_auth_end_to_end(tmp_path, pki):
    path = write_web_config(tmp_path / "web.yml", pki, {USER: PASSWORD},
                            headers={"Strict-Transport-Security": "max-age=31536000"})
    rt = start_runtime(path)
    url = f"https://127.0.0.1:{rt.server.port}"
    try:
        with tls_client(pki) as client:
            ok = client.get(url + "/metrics", auth=(USER, PASSWORD))
            assert ok.status_code == 200
            assert "vllm_exporter_build_info" in ok.text
            assert ok.headers["Strict-Transport-Security"] == "max-age=31536000"

            wrong = client.get(url + "/metrics", auth=(USER, PASSWORD + "x"))
            assert wrong.status_code == 401
            assert wrong.headers["WWW-Authenticate"].startswith("Basic")
            assert "vllm_exporter" not in wrong.text
            assert client.get(url + "/metrics", auth=("nobody", PASSWORD)).status_code == 401
            none = client.get(url + "/metrics")
            assert none.status_code == 401 and none.headers["WWW-Authenticate"].startswith("Basic")
            assert client.get(url + "/").status_code == 401
            assert client.get(url + "/metrics",
                              headers={"Authorization": "Basic !!!notbase64"}).status_code == 401
            # Probes need no credentials (Kubernetes), but still speak TLS.
            assert client.get(url + "/-/healthy").status_code == 200

        # Plain HTTP to the TLS port is refused: no HTTP response comes back.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{rt.server.port}/metrics", auth=(USER, PASSWORD),
                      timeout=5)
        # A client that does not trust our CA refuses the server.
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/metrics", auth=(USER, PASSWORD), timeout=5)
        # The port keeps serving after all of that.
        with tls_client(pki) as client:
            assert client.get(url + "/metrics", auth=(USER, PASSWORD)).status_code == 200

        s = samples(rt)
        assert s.get("vllm_exporter_scrapes_total", path="/metrics", code="401") == 4
        assert s.get("vllm_exporter_scrapes_total", path="/", code="401") == 1
        assert s.get("vllm_exporter_scrapes_total", path="/metrics", code="200") == 2
    finally:
        rt.stop()


def test_client_certificates_are_required_and_verified(tmp_path, pki):
    rt = start_runtime(write_web_config(tmp_path / "web.yml", pki, client_certs=True))
    url = f"https://127.0.0.1:{rt.server.port}/metrics"
    try:
        with tls_client(pki, client_cert=True) as client:
            assert client.get(url).status_code == 200
        with pytest.raises(httpx.HTTPError):
            with tls_client(pki) as client:
                client.get(url)
    finally:
        rt.stop()


def test_basic_auth_without_tls(tmp_path):
    rt = start_runtime(write_web_config(tmp_path / "web.yml", users={USER: PASSWORD}))
    url = f"http://127.0.0.1:{rt.server.port}/metrics"
    try:
        assert httpx.get(url, auth=(USER, PASSWORD)).status_code == 200
        assert httpx.get(url).status_code == 401
    finally:
        rt.stop()


def test_successful_checks_are_cached_and_failures_are_not(monkeypatch):
    calls = []
    real = web_config.bcrypt_check
    monkeypatch.setattr(web_config, "bcrypt_check",
                        lambda pw, hashed: calls.append(hashed) or real(pw, hashed))
    config = web_config.WebConfig(users={USER: bcrypt_hash(PASSWORD).encode()})
    good = httpx.BasicAuth(USER, PASSWORD)._auth_header
    bad = httpx.BasicAuth(USER, "nope")._auth_header
    stranger = httpx.BasicAuth("stranger", PASSWORD)._auth_header
    assert config.check_authorization(good) and config.check_authorization(good)
    assert len(calls) == 1  # the second scrape cost no bcrypt round
    assert not config.check_authorization(bad) and not config.check_authorization(bad)
    assert len(calls) == 3  # failures are checked every time
    assert not config.check_authorization(stranger)
    assert calls[-1] == web_config._DUMMY_HASH  # an unknown user still costs a bcrypt round
    # A new configuration (a reload) starts with an empty cache.
    assert not web_config.WebConfig(users={USER: bcrypt_hash("rotated").encode()}) \
        .check_authorization(good)


# --- reload ---------------------------------------------------------------------------------------

def test_reload_picks_up_a_new_user_and_an_invalid_file_keeps_the_old(tmp_path, pki):
    path = write_web_config(tmp_path / "web.yml", pki, {USER: PASSWORD})
    rt = start_runtime(path)
    url = f"https://127.0.0.1:{rt.server.port}/metrics"
    previous = signal.getsignal(signal.SIGHUP)
    try:
        metrics_process.install_reload_handler(rt)
        with tls_client(pki) as client:
            assert client.get(url, auth=("alice", "wonderland")).status_code == 401
            write_web_config(path, pki, {"alice": "wonderland"})
            os.kill(os.getpid(), signal.SIGHUP)
            wait_for(lambda: client.get(url, auth=("alice", "wonderland")).status_code == 200,
                     10, 0.1, "SIGHUP to load the new user")
            # The user removed by the reload is refused, although it was cached before.
            assert client.get(url, auth=(USER, PASSWORD)).status_code == 401

            path.write_text("basic_auth_users: {alice: not-a-hash}\n")
            assert rt.reload_web_config() is False
            assert client.get(url, auth=("alice", "wonderland")).status_code == 200
            path.unlink()
            assert rt.reload_web_config() is False
            assert client.get(url, auth=("alice", "wonderland")).status_code == 200
        s = samples(rt)
        assert s.get("vllm_exporter_config_reloads_total", result="success") == 1
        assert s.get("vllm_exporter_config_reloads_total", result="failure") == 2
    finally:
        signal.signal(signal.SIGHUP, previous)
        rt.stop()


def _peer_certificate(port: int, pki: Pki) -> bytes:
    context = ssl.create_default_context(cafile=str(pki.ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.getpeercert(binary_form=True)


def test_reload_rotates_the_certificate_for_new_connections(tmp_path, pki):
    path = write_web_config(tmp_path / "web.yml", pki)
    rt = start_runtime(path)
    try:
        first = _peer_certificate(rt.server.port, pki)
        assert first == ssl.PEM_cert_to_DER_cert(pki.server_cert.read_text())
        write_web_config(path, pki, cert=pki.server2_cert, key=pki.server2_key)
        assert rt.reload_web_config()
        assert _peer_certificate(rt.server.port, pki) == \
            ssl.PEM_cert_to_DER_cert(pki.server2_cert.read_text())
    finally:
        rt.stop()


# --- Prometheus itself ----------------------------------------------------------------------------

@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed")
def test_prometheus_scrapes_with_basic_auth_and_tls(tmp_path, pki):
    rt = start_runtime(write_web_config(tmp_path / "web.yml", pki, {USER: PASSWORD}))
    target = f"127.0.0.1:{rt.server.port}"
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD)

    def job(name: str, password_file: Path) -> dict:
        return scrape_job(name, [target], scheme="https", tls_config={"ca_file": str(pki.ca)},
                          basic_auth={"username": USER, "password_file": str(password_file)})

    wrong_file = tmp_path / "wrong"
    wrong_file.write_text("not-the-password")
    prom = make_prometheus(tmp_path / "prometheus",
                           [job("good", password_file), job("wrong", wrong_file)]).start()
    log_path = prom.log_path
    try:
        def up(job_name: str) -> float | None:
            try:
                result = prom.query(f'up{{job="{job_name}"}}')
            except OSError:
                return None
            return float(result[0]["value"][1]) if result else None

        wait_for(lambda: up("good") == 1.0 and up("wrong") == 0.0, 60, 0.5,
                 f"up==1 for the right password and 0 for the wrong one "
                 f"(log: {log_path})")
        result = prom.query('vllm_exporter_build_info{job="good"}')
        assert result and result[0]["metric"]["mode"] == "daemon"
    finally:
        prom.stop()
        rt.stop()


# --- resource limits ------------------------------------------------------------------------------

def test_concurrent_requests_beyond_the_limit_get_503_and_are_counted():
    rt = start_runtime(None, max_concurrent_requests=2)
    release = threading.Event()

    def slow() -> tuple[int, str, bytes]:
        release.wait(10)
        return 200, "text/plain", b"slow\n"

    rt.server.add_route("/slow", slow, "a slow route (test)")
    url = f"http://127.0.0.1:{rt.server.port}"
    statuses: list[int] = []

    def get() -> None:
        statuses.append(httpx.get(url + "/slow", timeout=20).status_code)

    threads = [threading.Thread(target=get) for _ in range(5)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: len(statuses) >= 3, 10, 0.05, "the requests beyond the limit")
        assert statuses == [503, 503, 503]  # answered at once, while two are still in progress
        # Probes are not held back by a full port.
        assert httpx.get(url + "/-/healthy", timeout=5).status_code == 200
        release.set()
        for t in threads:
            t.join(20)
        assert sorted(statuses) == [200, 200, 503, 503, 503]
        s = samples(rt)
        assert s.get("vllm_exporter_scrapes_rejected_total", reason="concurrency") == 3
        assert s.get("vllm_exporter_scrapes_total", path="/slow", code="503") == 3
        # The slots came back.
        assert httpx.get(url + "/metrics", timeout=5).status_code == 200
    finally:
        release.set()
        rt.stop()


def test_connections_beyond_the_limit_are_closed_and_idle_ones_time_out():
    rt = start_runtime(None, max_concurrent_requests=2, max_connections=3,
                       request_timeout_seconds=1.0)
    port = rt.server.port
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    try:
        wait_for(lambda: rt.server.connections == 3, 5, 0.02, "three open connections")
        extra = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert extra.recv(100) == b""  # closed by the server without a response
        extra.close()
        assert samples(rt).get("vllm_exporter_scrapes_rejected_total",
                               reason="connections") == 1
        # A client that sends nothing (or half a request line) is dropped after the timeout.
        idle[0].sendall(b"GET /metr")
        started = time.monotonic()
        for conn in idle:
            assert conn.recv(100) == b""
        assert time.monotonic() - started < 5
        wait_for(lambda: rt.server.connections == 0, 5, 0.05, "the connections to be released")
        assert http_get(f"http://127.0.0.1:{port}/metrics")[0] == 200
    finally:
        for conn in idle:
            conn.close()
        rt.stop()


def _raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(request)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_a_route_that_raises_gets_500_is_counted_and_the_port_keeps_serving():
    rt = start_runtime(None)
    base = f"http://127.0.0.1:{rt.server.port}"

    def broken():
        raise RuntimeError("a bug in a route")

    rt.server.add_route("/broken", broken, "always fails")
    try:
        assert http_get(base + "/broken")[0] == 500
        assert http_get(base + "/metrics")[0] == 200
        assert samples(rt).get("vllm_exporter_errors_total", component="metrics_server") == 1
    finally:
        rt.stop()


def test_oversized_request_lines_and_headers_are_refused():
    rt = start_runtime(None)
    port = rt.server.port
    try:
        long_line = b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        assert _raw_request(port, long_line).startswith(b"HTTP/1.1 414")
        big_headers = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"".join(
            b"X-Filler-%d: %s\r\n" % (i, b"b" * 4000) for i in range(10)) + b"\r\n"
        assert _raw_request(port, big_headers).startswith(b"HTTP/1.1 431")
        long_header = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"c" * 9000 + b"\r\n\r\n"
        assert _raw_request(port, long_header).startswith(b"HTTP/1.1 431")
        normal = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        assert _raw_request(port, normal).startswith(b"HTTP/1.1 200")
        assert samples(rt).get("vllm_exporter_scrapes_rejected_total", reason="too_large") == 3
    finally:
        rt.stop()


# --- the real daemon ------------------------------------------------------------------------------

def test_sighup_does_not_disturb_the_real_daemon(daemon):
    """SIGHUP's default action would kill the process: the daemon must handle it and keep its
    engine serving."""
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload requested" in daemon.log_tail(200), 10, 0.2,
             "the daemon to log the reload request")
    assert daemon.process.poll() is None
    s = daemon.scrape()
    assert s.get("vllm_engine_up") == 1
    response = httpx.post(daemon.api_url + "/v1/completions", timeout=60,
                          json={"model": daemon.model, "prompt": "still here", "max_tokens": 4})
    assert response.status_code == 200
    assert s.get("vllm_exporter_scrapes_rejected_total", reason="concurrency") == 0


def test_the_documented_example_is_valid(tmp_path, pki):
    """docs/security.md's example web config loads (with this test's certificate paths)."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    example = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    example["tls_server_config"].update(cert_file=str(pki.server_cert),
                                        key_file=str(pki.server_key),
                                        client_ca_file=str(pki.ca))
    path = tmp_path / "web.yml"
    path.write_text(yaml.safe_dump(example))
    loaded = load_web_config(path)
    assert loaded.tls and loaded.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert loaded.check_authorization(httpx.BasicAuth("prometheus", "change-me")._auth_header)
    assert loaded.headers["X-Content-Type-Options"] == "nosniff"
