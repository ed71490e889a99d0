"""`tune gpu-memory` on the CPU engine: real engines in child processes, one of them failing.

Two engine starts (~40-90 s each here): the high candidate asks for a 64 GiB KV cache, which
vLLM's CPU worker refuses (more than the machine has), the low one (1 GiB) starts, serves the
verification load and reports its capacity. The parent process survives the failure.
"""

from __future__ import annotations

import json

import pytest
import yaml

from exporter.cli import main

pytestmark = pytest.mark.engine


def test_bisection_runs_candidates_in_children_and_survives_a_failure(capsys, tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({
        # Eager mode with an explicit KV-cache size skips vLLM's compile warm-up: faster starts.
        "engine": {"max_model_len": 512, "max_num_seqs": 8, "seed": 0,
                   "extra_args": {"enforce_eager": True}},
        "daemon": {"shutdown_timeout_seconds": 5.0, "exit_delay_seconds": 0.0},
    }))
    logs = tmp_path / "logs"
    code = main(["tune", "gpu-memory", "--config", str(base), "--knob", "kv_cache_space_gib",
                 "--low", "1", "--high", "64", "--max-starts", "2", "--verify-requests", "6",
                 "--verify-concurrency", "3", "--prompt-len", "fixed:32", "--output-len",
                 "fixed:8", "--log-dir", str(logs), "--json", "--no-progress"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0, result["candidates"]
    high, low = result["candidates"]
    assert (high["value"], high["survived"], high["stage"]) == (64, False, "start")
    assert "memory" in high["reason"].lower(), high["reason"]
    assert (low["value"], low["survived"], low["stage"]) == (1, True, "ok")
    assert low["requests_ok"] == 6
    # 1 GiB of KV cache at 1,024 bytes per token (the default model).
    assert low["capacity_tokens"] == 2**30 // 1024
    assert result["best"]["value"] == 1 and result["lowest_failure"] == 64
    assert result["converged"] is False  # the start budget (2) ran out before 1 GiB steps
    assert sorted(p.name for p in logs.iterdir()) == ["candidate-0-64.log",
                                                      "candidate-1-1.log"]
