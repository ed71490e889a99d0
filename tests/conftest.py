"""Session fixtures: ONE real daemon (real vLLM CPU engine, embedded default model) per session,
and the Alertmanager it notifies.

Starting an engine costs 30-60 s on these machines, so every test that needs a live engine and
leaves it as it found it shares the `daemon` fixture. Tests that kill, stop or reconfigure an
engine start their own (test_lifecycle.py, test_shutdown.py, test_topologies.py) and stay few.
What they share with the benchmarks lives in the `testsupport` package (pyproject.toml puts the
repository root on pytest's path).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from testsupport.alerting import start_alerting
from testsupport.daemon import daemon_config, start_daemon
from testsupport.net import free_port
from testsupport.webhook import WebhookReceiver

# Daemons started with a profiler config accept the profiling routes only with this token; the
# `profile` command reads it from the same variable.
os.environ.setdefault("VLLM_EXPORTER_PROFILE_TOKEN", "test-profile-token")


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def alerting(tmp_path_factory):
    """A webhook receiver and a real Alertmanager for the whole session (None without the
    binary), and the rule files the shared daemon and the e2e Prometheus load."""
    setup = start_alerting(tmp_path_factory.mktemp("alerting"))
    yield setup
    setup.close()


@pytest.fixture(scope="session")
def daemon(session_tmp: Path, alerting):
    """The shared daemon: it evaluates the alert rules and notifies the session Alertmanager.
    Tests must leave it serving (test_shutdown.py checks stopping on daemons of its own)."""
    d = start_daemon(session_tmp, daemon_config(free_port(), free_port(),
                                                alerts=alerting.daemon_section()))
    yield d
    d.stop()


@pytest.fixture
def webhook():
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()
