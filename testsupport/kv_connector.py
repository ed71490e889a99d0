"""A daemon whose engine runs a KV connector over a local store, and the one prompt the
connector tests send twice.

ExampleConnector (in vLLM) saves each prompt's KV to files under the store and loads it back
for a later identical prompt; the local prefix cache is off, so a repeated prompt's KV can only
come from the connector.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from . import ROOT
from .daemon import Daemon, daemon_config, daemon_env, start_daemon
from .net import free_port

STAGES = ("waiting_to_start", "in_progress", "completed_waiting")
# Long enough for two full blocks of 128 tokens (the CPU build's block size), short enough for
# max_model_len 512 with the tests' tokenizer.
PROMPT = " ".join(f"word{i} the quick brown fox" for i in range(30))


def start_connector_daemon(tmp: Path, model: str, connector: dict) -> Daemon:
    """`connector`: kv_transfer_config keys besides kv_role (kv_both) and the store, which is
    tmp/kv-store (the daemon's `storage`). The engine can import connectors from the
    repository root (kv_connector_module_path)."""
    storage = tmp / "kv-store"
    storage.mkdir()
    extra = {"shared_storage_path": str(storage), **connector.pop("extra_config", {})}
    config = daemon_config(
        free_port(), free_port(),
        engine={"served_model_name": model, "enable_prefix_caching": False,
                "extra_args": {"kv_transfer_config": {
                    **connector, "kv_role": "kv_both", "kv_connector_extra_config": extra}}},
        gpu={"enabled": False})
    env = daemon_env()
    env["PYTHONPATH"] = ":".join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    daemon = start_daemon(tmp, config, name=model, env=env)
    daemon.storage = storage
    return daemon


def complete(api_url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """A greedy completion of exactly `max_tokens` tokens."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True}).encode()
    request = urllib.request.Request(f"{api_url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())
