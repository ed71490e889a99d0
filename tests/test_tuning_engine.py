"""The tuning commands against the shared real daemon (real vLLM CPU engine, default model)."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from exporter.cli import main
from exporter.default_model import ensure_default_model
from exporter.tuning.objective import parse_objectives
from exporter.tuning.profile import probe_guard
from exporter.tuning.sweep import choose_point, judge
from exporter.tuning.workload import LengthDistribution, Workload, WorkloadSpec
from testsupport.daemon import daemon_config, start_daemon
from testsupport.net import free_port

pytestmark = pytest.mark.engine


def _json(capsys, argv: list[str]) -> tuple[int, dict]:
    code = main(argv)
    captured = capsys.readouterr()
    assert captured.out.strip(), captured.err
    return code, json.loads(captured.out)


def test_plan_agrees_with_the_capacity_the_engine_reports(daemon, capsys):
    # On the CPU build VLLM_CPU_KVCACHE_SPACE (GiB) sizes the cache: plan from the same figure.
    kv_gib = os.environ.get("VLLM_CPU_KVCACHE_SPACE") or "1"
    code, plan = _json(capsys, ["plan", str(ensure_default_model()), "--kv-cache-gib", kv_gib,
                                "--max-model-len", "512", "--daemon", daemon.metrics_url,
                                "--json"])
    assert code == 0
    compared = plan["daemon"]
    assert compared["engine"]["capacity_tokens"] > 0
    # The default model: 2 layers x 2 KV heads x head dim 64 x K,V x bf16, by both counts.
    assert plan["kv"]["bytes_per_token"] == 2 * 2 * 2 * 64 * 2
    assert compared["bytes_per_token"]["equal"]
    # The plan used the engine's block size, so the capacities agree to within a block.
    assert plan["capacity"]["block_size"] == compared["engine"]["block_size"]
    assert abs(compared["capacity_tokens"]["difference"]) <= plan["capacity"]["block_size"]
    # The table says how far apart they are.
    assert main(["plan", str(ensure_default_model()), "--kv-cache-gib", kv_gib,
                 "--daemon", daemon.metrics_url]) == 0
    assert "compared with the daemon" in capsys.readouterr().out


def _expected_output_tokens(n: int, first: int, prompt_len: str, output_len: str,
                            prefix: int, seed: int) -> tuple[int, int]:
    """(prompt, output) tokens the workload asks for; ignore_eos makes outputs exact."""
    workload = Workload(WorkloadSpec(LengthDistribution.parse(prompt_len, "p"),
                                     LengthDistribution.parse(output_len, "o"), prefix, seed))
    requests = [workload.request(first + i) for i in range(n)]
    return (sum(len(r.prompt_token_ids) for r in requests), sum(r.max_tokens for r in requests))


@pytest.mark.parametrize("load", [
    ["--concurrency", "4", "--requests", "12"],
    ["--rate", "25", "--poisson", "--requests", "12"],
    ["--concurrency", "3", "--duration", "1.0"],
])
def test_bench_counts_equal_the_daemons_counters(daemon, capsys, load):
    flags = ["--prompt-len", "uniform:16:64", "--output-len", "uniform:4:24",
             "--shared-prefix", "8", "--seed", "3"]
    code, report = _json(capsys, ["bench", "--daemon-api", daemon.api_url, "--daemon-metrics",
                                  daemon.metrics_url, *load, *flags, "--json",
                                  "--no-progress"])
    assert code == 0
    client, seen = report["client"], report["daemon"]
    n = client["requests_ok"]
    assert n == 12 if "--requests" in load else n >= 3
    assert client["requests_failed"] == 0
    assert seen["requests_finished"] == n
    assert seen["prompt_tokens"] == client["prompt_tokens"]
    assert seen["generation_tokens"] == client["output_tokens"]
    assert seen["ttft_seconds"]["count"] == seen["e2e_seconds"]["count"] == n
    prompt_tokens, output_tokens = _expected_output_tokens(n, 0, "uniform:16:64",
                                                           "uniform:4:24", 8, 3)
    assert (client["prompt_tokens"], client["output_tokens"]) == (prompt_tokens, output_tokens)
    assert client["finish_reasons"] == {"length": n}
    for key in ("ttft_seconds", "itl_seconds", "e2e_seconds"):
        c, d = client[key], seen[key]
        assert 0 < c["p50"] <= c["p95"] <= c["p99"], key
        assert d["p50"] is not None and d["p50"] <= d["p99"], key
    # Client and daemon measure the same requests: TTFT means agree within a loose factor.
    assert seen["ttft_seconds"]["mean"] <= client["ttft_seconds"]["mean"] * 1.5 + 0.05


def test_tune_batch_size_sweep_table_plot_and_choice(daemon, capsys, tmp_path):
    import matplotlib.image

    png = tmp_path / "sweep.png"
    code, sweep = _json(capsys, [
        "tune", "batch-size", "--daemon-api", daemon.api_url, "--daemon-metrics",
        daemon.metrics_url, "--concurrency", "1,8", "--rounds", "2", "--min-requests", "6",
        "--warmup", "1", "--prompt-len", "fixed:48", "--output-len", "fixed:24",
        "--objective", "ttft_p95=60s,itl_p95=10s", "--plot", str(png), "--json",
        "--no-progress"])
    assert code == 0
    points = sweep["points"]
    assert [p["concurrency"] for p in points] == [1, 8]
    for p in points:
        assert p["client"]["requests_ok"] == max(6, 2 * p["concurrency"])
        assert p["daemon"]["requests_finished"] == p["client"]["requests_ok"]
        assert p["daemon"]["generation_tokens"] == p["client"]["output_tokens"]
        for key in ("ttft_seconds", "itl_seconds"):
            assert p["client"][key]["p95"] > 0 and p["daemon"][key]["p95"] > 0
    # Each point ran at its concurrency: the mean number of requests in flight (the sum of
    # their end-to-end times over the wall time) is at most 1 for one stream and well above 1
    # for eight, so the engine served them side by side. (Whether eight streams also give more
    # tokens/s depends on spare CPU, which a 2-core machine running the engine, its front end
    # and this client may not have.)
    in_flight = [p["client"]["e2e_seconds"]["mean"] * p["client"]["requests_ok"]
                 / p["client"]["wall_seconds"] for p in points]
    assert in_flight[0] <= 1.0 + 1e-6 and in_flight[1] > 4, in_flight
    # A loose objective: every point meets it, the choice is the fastest point.
    assert all(p["meets_objective"] for p in points)
    fastest = max(points, key=lambda p: p["client"]["output_tokens_per_second"])
    assert sweep["chosen_concurrency"] == fastest["concurrency"]
    # A tight objective taken from the measurements: only points at or under it qualify.
    bound = min(p["client"]["ttft_seconds"]["p95"] for p in points)
    for p in points:
        judge(p, parse_objectives(f"ttft_p95={bound}"), "client")
    chosen = choose_point(points)
    assert chosen is not None and chosen["client"]["ttft_seconds"]["p95"] <= bound
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    # The text table marks the choice.
    assert main(["tune", "batch-size", "--daemon-api", daemon.api_url, "--daemon-metrics",
                 daemon.metrics_url, "--concurrency", "2", "--min-requests", "2", "--warmup",
                 "0", "--prompt-len", "fixed:16", "--output-len", "fixed:4", "--objective",
                 "e2e_p99=1ms", "--plot", str(tmp_path / "b.png"), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "no point meets the objective" in out


def _profiler_dir(daemon) -> str | None:
    config = yaml.safe_load(daemon.config_path.read_text())
    profiler = config.get("engine", {}).get("extra_args", {}).get("profiler_config") or {}
    return profiler.get("torch_profiler_dir")


@pytest.fixture
def profiled_daemon(daemon, tmp_path_factory):
    """A daemon whose engine has a profiler: the shared one if it has, else one of our own
    (which the test that uses it stops and checks)."""
    if _profiler_dir(daemon):
        yield daemon
        return
    tmp = tmp_path_factory.mktemp("profiled")
    traces = tmp / "traces"
    traces.mkdir()
    profiler = {"profiler": "torch", "torch_profiler_dir": str(traces),
                "torch_profiler_with_stack": False}
    own = start_daemon(tmp, daemon_config(free_port(), free_port(),
                                          engine={"extra_args": {"profiler_config": profiler}}),
                       name="profiled")
    yield own
    own.stop()  # where the test failed before stopping it


def test_profile_without_a_profiler_says_how_to_enable_it(daemon, capsys, tmp_path):
    if _profiler_dir(daemon):
        pytest.skip("the shared daemon runs with a profiler")
    assert probe_guard(daemon.api_url) == "disabled"
    assert main(["profile", "--daemon-api", daemon.api_url, "--trace-dir", str(tmp_path),
                 "--seconds", "1"]) == 2
    assert "started without a profiler" in capsys.readouterr().err


def test_profile_captures_a_chrome_trace_without_a_restart(profiled_daemon, daemon, capsys,
                                                           tmp_path):
    shared, daemon = daemon, profiled_daemon
    trace_dir = _profiler_dir(daemon)
    pid = daemon.process.pid
    code, result = _json(capsys, ["profile", "--daemon-api", daemon.api_url, "--trace-dir",
                                  trace_dir, "--seconds", "2", "--max-steps", "20",
                                  "--load-concurrency", "2", "--prompt-len", "fixed:16",
                                  "--output-len", "fixed:8", "--out", str(tmp_path), "--json",
                                  "--no-progress"])
    assert code == 0
    assert result["guard"] in ("open", "guarded")
    assert result["requests_during_profile"] > 0
    assert any("rank" in t["path"] for t in result["traces"])
    for trace in result["traces"]:
        data = json.loads(open(trace["path"]).read())
        assert len(data["traceEvents"]) == trace["events"] > 0
    # The engine was not restarted and still serves.
    assert daemon.process.pid == pid and daemon.process.poll() is None
    assert daemon.scrape().get("vllm_engine_up", model=daemon.model) == 1
    assert main(["bench", "--daemon-api", daemon.api_url, "--daemon-metrics",
                 daemon.metrics_url, "--concurrency", "1", "--requests", "2", "--prompt-len",
                 "fixed:8", "--output-len", "fixed:4", "--no-progress"]) == 0
    if daemon is not shared:  # a daemon of our own: profiling left it able to stop cleanly
        assert daemon.stop() == 0, daemon.log_tail()
