"""The tuning toolkit's pure parts: workload, histogram quantiles, objectives, the choice."""

from __future__ import annotations

import pytest

from exporter.cli import main
from exporter.tuning.daemon_view import Snapshot, bucket_delta, period_quantile, period_view
from exporter.tuning.errors import UsageError
from exporter.tuning.loadgen import LoadSpec, percentiles
from exporter.tuning.objective import parse_objectives
from exporter.tuning.sweep import choose_point, judge, parse_concurrency_list
from exporter.tuning.workload import LengthDistribution, Workload, WorkloadSpec


def test_workload_is_reproducible_and_honours_lengths_and_prefix():
    spec = WorkloadSpec(prompt_len=LengthDistribution.parse("uniform:40:80", "p"),
                        output_len=LengthDistribution.parse("normal:32:8", "o"),
                        shared_prefix_len=16, seed=7)
    first, again = Workload(spec), Workload(spec)
    requests = [first.request(i) for i in range(50)]
    assert requests == [again.request(i) for i in range(50)]
    assert all(40 <= len(r.prompt_token_ids) <= 80 for r in requests)
    assert all(r.max_tokens >= 1 for r in requests)
    assert all(r.prompt_token_ids[:16] == requests[0].prompt_token_ids[:16] for r in requests)
    assert len({tuple(r.prompt_token_ids[16:]) for r in requests}) == 50
    assert all(16 <= t < 500 for r in requests for t in r.prompt_token_ids)
    other_seed = Workload(WorkloadSpec(prompt_len=spec.prompt_len, seed=8))
    assert other_seed.request(0) != Workload(WorkloadSpec(prompt_len=spec.prompt_len)).request(0)


@pytest.mark.parametrize("text", ["fixed:0", "uniform:9:3", "normal:x:1", "poisson:3", "fixed"])
def test_bad_length_distributions(text):
    with pytest.raises(UsageError):
        LengthDistribution.parse(text, "--prompt-len")


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = [(0.1, 10.0), (0.2, 30.0), (0.5, 40.0), (float("inf"), 40.0)]
    assert period_quantile(0.25, buckets) == pytest.approx(0.1)
    assert period_quantile(0.5, buckets) == pytest.approx(0.15)
    assert period_quantile(0.95, buckets) == pytest.approx(0.2 + 0.3 * 0.8)
    assert period_quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    # Everything above the last finite bound: the last finite bound, as Prometheus answers.
    assert period_quantile(0.99, [(1.0, 0.0), (float("inf"), 5.0)]) == 1.0


def test_period_view_subtracts_the_scrape_before():
    def exposition(n_fast, n_slow, tokens):
        return f"""# TYPE vllm_time_to_first_token_seconds histogram
vllm_time_to_first_token_seconds_bucket{{engine="0",le="0.1",model="m"}} {n_fast}
vllm_time_to_first_token_seconds_bucket{{engine="0",le="1.0",model="m"}} {n_fast + n_slow}
vllm_time_to_first_token_seconds_bucket{{engine="0",le="+Inf",model="m"}} {n_fast + n_slow}
vllm_time_to_first_token_seconds_count{{engine="0",model="m"}} {n_fast + n_slow}
vllm_time_to_first_token_seconds_sum{{engine="0",model="m"}} {n_fast * 0.05 + n_slow * 0.5}
# TYPE vllm_generation_tokens counter
vllm_generation_tokens_total{{engine="0",model="m"}} {tokens}
"""
    before, after = Snapshot(exposition(100, 0, 1000)), Snapshot(exposition(100, 10, 1500))
    view = period_view(before, after, "m")
    assert view["generation_tokens"] == 500
    # Only the 10 slow requests happened in the period: the median lies in (0.1, 1.0].
    assert view["ttft_seconds"]["count"] == 10
    assert 0.1 < view["ttft_seconds"]["p50"] <= 1.0
    assert view["ttft_seconds"]["mean"] == pytest.approx(0.5)
    assert bucket_delta([(1.0, 5.0)], [(1.0, 2.0)]) == [(1.0, 3.0)]
    assert period_view(before, after, "other-model")["generation_tokens"] == 0


def test_percentiles():
    p = percentiles([float(i) for i in range(1, 101)])
    assert p["p50"] == pytest.approx(50.5) and p["p99"] == pytest.approx(99.01)
    assert percentiles([])["p95"] is None


def test_objectives_parse_and_reject_the_impossible():
    objectives = parse_objectives("ttft_p95=0.5, itl_p99=50ms,e2e_p50=2s")
    assert [(o.name, o.threshold) for o in objectives] == [
        ("ttft_p95", 0.5), ("itl_p99", pytest.approx(0.05)), ("e2e_p50", 2.0)]
    for text, message in [("ttft_p95=0", "impossible"), ("ttft_p95=-1", "impossible"),
                          ("ttft_p90=1", "NAME one of"), ("speed=3", "NAME one of"),
                          ("ttft_p95=fast", "not a number"), ("", "empty"),
                          ("itl_p95=1,itl_p95=2", "twice")]:
        with pytest.raises(UsageError, match=message):
            parse_objectives(text)


def _point(concurrency, tokens_per_s, ttft_p95, failed=0):
    latency = {"p50": ttft_p95 / 2, "p95": ttft_p95, "p99": ttft_p95, "mean": ttft_p95 / 2}
    return {"concurrency": concurrency,
            "client": {"output_tokens_per_second": tokens_per_s, "requests_failed": failed,
                       "ttft_seconds": latency, "itl_seconds": latency,
                       "e2e_seconds": latency},
            "daemon": {"ttft_seconds": latency, "itl_seconds": latency, "e2e_seconds": latency}}


def test_the_choice_is_the_fastest_point_within_the_objective():
    points = [_point(1, 100, 0.05), _point(4, 300, 0.2), _point(16, 500, 0.9),
              _point(8, 400, 0.3, failed=1)]
    for p in points:
        judge(p, parse_objectives("ttft_p95=0.5"), "client")
    assert [p["meets_objective"] for p in points] == [True, True, False, False]
    assert choose_point(points)["concurrency"] == 4
    for p in points:
        judge(p, parse_objectives("ttft_p95=0.01"), "daemon")
    assert choose_point(points) is None


def test_load_spec_and_concurrency_list_validation():
    with pytest.raises(UsageError):
        LoadSpec(concurrency=2, rate=3, requests=1)
    with pytest.raises(UsageError):
        LoadSpec(concurrency=2)
    with pytest.raises(UsageError):
        LoadSpec(rate=-1, requests=3)
    assert parse_concurrency_list("8,1,4,4") == [1, 4, 8]
    with pytest.raises(UsageError):
        parse_concurrency_list("0,2")


@pytest.mark.parametrize("argv, message", [
    (["bench", "--daemon-api", "http://127.0.0.1:9", "--concurrency", "2", "--requests", "4"],
     "not reachable"),
    (["bench", "--concurrency", "0", "--requests", "4"], "--concurrency must be >= 1"),
    (["bench", "--concurrency", "2", "--requests", "4", "--prompt-len", "uniform:9:1"],
     "--prompt-len"),
    (["bench", "--concurrency", "2", "--requests", "4", "--poisson"], "--poisson needs --rate"),
    (["tune", "batch-size", "--objective", "ttft_p95=0"], "impossible"),
    (["tune", "batch-size", "--objective", "ttft_p95=1", "--concurrency", "a,b"], "integers"),
    (["tune", "batch-size", "--objective", "ttft_p95=1", "--daemon-api",
      "http://127.0.0.1:9"], "not reachable"),
    (["tune", "gpu-memory", "--low", "0.9", "--high", "0.5"], "low < high"),
    (["tune", "gpu-memory", "--knob", "kv_cache_space_gib", "--low", "1.5", "--high", "4"],
     "whole numbers"),
    (["tune", "gpu-memory", "--config", "/no/such.yaml"], "/no/such.yaml"),
    (["profile", "--trace-dir", "/no/such/dir"], "not a directory"),
])
def test_bad_input_exits_2_before_any_load(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vllm-exporter ") and message in err


def test_every_tuning_command_has_help_with_an_example(capsys):
    for argv in (["plan"], ["bench"], ["tune", "batch-size"], ["tune", "gpu-memory"],
                 ["profile"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "example" in out and "vllm-exporter " + " ".join(argv) in out


def test_bisection_order_and_stopping_rule(monkeypatch):
    """The search logic with a fake engine that survives up to 0.87 (no engine started)."""
    from exporter.tuning import gpu_memory

    tried = []

    def fake_candidate(value, settings, workload, number):
        tried.append(value)
        return gpu_memory.Candidate(value, survived=value <= 0.87, stage="ok",
                                    capacity_tokens=value * 1000)

    monkeypatch.setattr(gpu_memory, "run_candidate", fake_candidate)
    settings = gpu_memory.SearchSettings(gpu_memory.KNOBS["gpu_memory_utilization"], 0.5, 0.98,
                                         0.02, progress=False)
    result = gpu_memory.search(settings, None)
    assert tried[:2] == [0.98, 0.5]  # the high end first, then the low end
    assert result["best"]["value"] <= 0.87 < result["lowest_failure"]
    assert result["lowest_failure"] - result["best"]["value"] <= 0.02 and result["converged"]
    tried.clear()
    settings.max_starts = 3
    result = gpu_memory.search(settings, None)
    assert len(tried) == 3 and not result["converged"]
    tried.clear()
    settings.low = 0.9  # even the low end fails: nothing survives
    result = gpu_memory.search(settings, None)
    assert tried == [0.98, 0.9] and result["best"] is None


def test_candidate_config_sets_the_knob_where_vllm_reads_it(monkeypatch):
    from exporter.tuning.gpu_memory import KNOBS, candidate_config

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    base = {"engine": {"max_model_len": 512}, "api": {"port": 1}}
    config, env = candidate_config(base, KNOBS["gpu_memory_utilization"], 0.85, 2001, 2002)
    assert config["engine"] == {"max_model_len": 512, "gpu_memory_utilization": 0.85}
    assert (config["api"]["port"], config["metrics"]["port"]) == (2001, 2002)
    assert "VLLM_CPU_KVCACHE_SPACE" not in env  # it would override the fraction on CPU
    assert base["api"]["port"] == 1  # the base is not modified
    config, env = candidate_config(base, KNOBS["kv_cache_space_gib"], 4.0, 2001, 2002)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4" and "gpu_memory_utilization" not in config["engine"]


def test_profile_guard_needs_the_token_on_the_profiling_routes_only(monkeypatch):
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from exporter.api_middleware import ProfileGuard

    async def ok(request):
        return PlainTextResponse("ok")

    routes = [Route(p, ok, methods=["GET", "POST"]) for p in
              ("/start_profile", "/stop_profile", "/v1/models", "/health")]
    guarded = Starlette(routes=routes)
    guarded.add_middleware(ProfileGuard, token="s3cret")
    client = TestClient(guarded)
    assert client.post("/start_profile").status_code == 401
    assert client.post("/stop_profile", headers={"Authorization": "Bearer wrong"}).status_code \
        == 401
    assert client.post("/start_profile", headers={"Authorization": "Basic s3cret"}).status_code \
        == 401
    assert client.post("/start_profile", headers={"Authorization": "Bearer s3cret"}).text == "ok"
    assert client.get("/v1/models").status_code == 200 and client.get("/health").text == "ok"
    monkeypatch.delenv("VLLM_EXPORTER_PROFILE_TOKEN", raising=False)  # no token anywhere
    closed = Starlette(routes=routes)
    closed.add_middleware(ProfileGuard, token=None)
    client = TestClient(closed)
    assert client.post("/start_profile", headers={"Authorization": "Bearer x"}).status_code == 403
    assert client.get("/health").status_code == 200
