"""vLLM as many processes, with real engines: several API servers and data-parallel ranks.

1. Plugin mode under `vllm serve --api-server-count 2`: vLLM starts although another program
   holds the metrics port (one clear line, then the port is taken when it frees up), one
   endpoint counts the requests of both API-server processes exactly, and the metrics process
   ends by itself after vLLM.
2. Daemon mode with `data_parallel_size: 2` (two engine ranks, vLLM's default of two API
   servers): both ranks' series, exact counters per rank, and a stall on one rank beside an idle
   one pages for the stalled rank only.
3. External load balancing (a tiny mixture-of-experts model, one server per data-parallel rank):
   rank 0 under `vllm serve` with the plugin, rank 1 under the daemon; each endpoint counts its
   own API's requests exactly, on its own rank's `engine` label.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
import yaml

from exporter.aggregate import ShardSet
from exporter.alerts.defaults import default_rule_file
from exporter.default_model import ensure_default_model
from testsupport import ROOT
from testsupport.daemon import STARTUP_TIMEOUT, daemon_config, daemon_env, start_daemon
from testsupport.exposition import Samples, scrape
from testsupport.moe_model import ensure_moe_model, moe_data_parallel_env
from testsupport.net import free_port, http_get
from testsupport.processes import engine_core_pids, start_group, stop_group, wait_url
from testsupport.waiting import wait_for

VLLM_CLI = ROOT / "tests" / "vllm_cli.py"


def complete(api_url: str, model: str, prompt: str, max_tokens: int = 6,
             rank: int | None = None) -> dict:
    """One completion on a connection of its own (so the kernel spreads requests over the
    API-server processes that share the port); returns the API's `usage`."""
    headers = {"Content-Type": "application/json", "Connection": "close"}
    if rank is not None:
        headers["X-data-parallel-rank"] = str(rank)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "ignore_eos": True}).encode()
    request = urllib.request.Request(f"{api_url}/v1/completions", data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["usage"]


def add_usage(total: dict, usage: dict) -> None:
    for key in ("prompt_tokens", "completion_tokens"):
        total[key] = total.get(key, 0) + usage[key]


def counters_reach(metrics_url: str, usage: dict, requests: int, **labels) -> bool:
    s = scrape(metrics_url)
    return (s.get("vllm_generation_tokens_total", **labels) == usage["completion_tokens"]
            and s.get("vllm_prompt_tokens_total", **labels) == usage["prompt_tokens"]
            and s.get("vllm_e2e_request_latency_seconds_count", **labels) == requests)


def frontend_finished(shard_dir: Path) -> list[float]:
    """Finished requests each live API-server process wrote into its own shard."""
    shards = [shard for shard in ShardSet(shard_dir).refresh() if shard.role == "frontend"]
    finished = "vllm_requests_finished_total"
    return [sum(shard.values[series.slot] for series in shard.series(finished)) for shard in shards]


@pytest.mark.engine
def test_vllm_serve_with_two_api_servers_has_one_exact_metrics_endpoint(tmp_path):
    api_port, metrics_port = free_port(), free_port()
    shard_dir = tmp_path / "shards"
    config = tmp_path / "plugin.yaml"
    config.write_text("daemon: {idle_timeout_seconds: 1.0, exit_delay_seconds: 2.0}\n"
                      "gpu: {enabled: false}\n")
    env = daemon_env()
    env.update(VLLM_EXPORTER_CONFIG=str(config), VLLM_EXPORTER_METRICS_PORT=str(metrics_port),
               VLLM_EXPORTER_SHARD_DIR=str(shard_dir))
    squatter = socket.socket()  # another program holds the metrics port at start-up
    squatter.bind(("127.0.0.1", metrics_port))
    squatter.listen()
    log = tmp_path / "vllm-serve.log"
    process = start_group(
        [sys.executable, str(VLLM_CLI), "serve", str(ensure_default_model()),
         "--served-model-name", "multi", "--max-model-len", "512", "--host", "127.0.0.1",
         "--port", str(api_port), "--api-server-count", "2"], log, env)
    api_url = f"http://127.0.0.1:{api_port}"
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        wait_url(f"{api_url}/health", process, STARTUP_TIMEOUT, log,
                 what="vllm serve with two API servers", interval=1)
        busy = [line for line in log.read_text(errors="replace").splitlines()
                if f"cannot listen on 127.0.0.1:{metrics_port}" in line]
        assert len(busy) == 1, busy  # one line for the server, not one per process
        assert "VLLM_EXPORTER_METRICS_PORT" in busy[0]
        squatter.close()  # the port frees up: the metrics process takes it at its next try

        def metrics_ready() -> bool:
            try:
                return http_get(metrics_url.replace("/metrics", "/-/ready"))[0] == 200
            except OSError:
                return False

        wait_for(metrics_ready, 30, what="the metrics port after the squatter left")

        # Which API-server process accepts a connection is up to the kernel and to which
        # process is first back in accept(): send batches of concurrent requests until both have
        # served some (a handful of batches at most), then compare the totals exactly.
        usage: dict = {}
        sent = 0
        labels = {"model": "multi", "engine": "0"}
        for batch in range(8):
            results: list[dict] = []
            threads = [threading.Thread(target=lambda i=i: results.append(
                complete(api_url, "multi", f"spread {batch} {i}"))) for i in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert len(results) == 8
            for result in results:
                add_usage(usage, result)
            sent += 8
            wait_for(lambda: counters_reach(metrics_url, usage, sent, **labels), 20,
                     what=f"our counters to reach the API's usage {usage}")
            finished_per_shard = frontend_finished(shard_dir)
            if len(finished_per_shard) == 2 and all(finished_per_shard):
                break
        s = scrape(metrics_url)
        assert s.get("vllm_requests_finished_total", finish_reason="length", **labels) == sent
        assert s.get("vllm_time_to_first_token_seconds_count", **labels) == sent
        assert s.get("vllm_exporter_processes", role="frontend", state="live") == 2
        assert s.get("vllm_engine_up", model="multi") == 1
        # Both API-server processes served requests and wrote their own shard.
        finished_per_shard = frontend_finished(shard_dir)
        assert len(finished_per_shard) == 2 and all(finished_per_shard), finished_per_shard
        assert sum(finished_per_shard) == sent
        # vLLM's own /metrics (its multiprocess registry) agrees, and holds none of ours.
        status, own, _ = http_get(f"{api_url}/metrics")
        own_samples = Samples(own.decode())
        assert status == 200 and b"vllm_exporter" not in own
        assert sum(v for _, v in own_samples.series("vllm:generation_tokens_total")) == \
            usage["completion_tokens"]

        # vLLM stops: the metrics process ends by itself, and removes the shards.
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        wait_for(lambda: not shard_dir.exists(), 30, what="the metrics process to end")
    finally:
        squatter.close()
        stop_group(process)


def stall_rule_file(tmp_path: Path) -> Path:
    """The default rule pack with VllmEngineStalled quick enough for a test (3 s, for: 2s)."""
    raw = default_rule_file({"engine_stall_seconds": 3})
    for rule in raw["rules"]:
        if rule["alert"] == "VllmEngineStalled":
            rule["for"] = "2s"
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def stalled_engines(daemon) -> set[str]:
    status, body, _ = daemon.get("/alerts")
    assert status == 200
    for rule in json.loads(body)["rules"]:
        if rule["alert"] == "VllmEngineStalled":
            return {a["labels"]["engine"] for a in rule["alerts"] if a["state"] == "firing"}
    raise AssertionError("VllmEngineStalled is not loaded")


@pytest.mark.engine
def test_daemon_with_two_data_parallel_ranks(tmp_path):
    api_port, metrics_port = free_port(), free_port()
    config = daemon_config(api_port, metrics_port,
                           engine={"data_parallel_size": 2, "served_model_name": "dp"},
                           gpu={"enabled": False},
                           alerts={"rules_file": str(stall_rule_file(tmp_path)),
                                   "evaluation_interval_seconds": 0.5})
    daemon = start_daemon(tmp_path, config, name="dp")
    try:
        s = daemon.scrape()
        for rank in ("0", "1"):
            assert s.get("vllm_kv_cache_capacity_tokens", model="dp", engine=rank) > 0
        assert s.get("vllm_exporter_processes", role="frontend", state="live") == 2
        assert s.get("vllm_exporter_processes", role="daemon", state="live") == 1
        info = s.series("vllm_engine_config_info")[0][0]
        assert info["data_parallel_size"] == "2"

        usage = {rank: {} for rank in (0, 1)}
        for i in range(6):
            for rank in (0, 1):
                add_usage(usage[rank], complete(daemon.api_url, "dp", f"rank {rank} {i}",
                                                rank=rank))
        for rank in (0, 1):
            wait_for(lambda: counters_reach(daemon.metrics_url, usage[rank], 6, model="dp",
                                            engine=str(rank)), 20,
                     what=f"rank {rank}'s counters to reach the API's usage {usage[rank]}")
        assert daemon.scrape().get("vllm_requests_finished_total", model="dp", engine="1",
                                   finish_reason="length") == 6

        # Rank 0 stops stepping (SIGSTOP) and then gets work; rank 1 stays idle beside it.
        ranks = engine_core_pids(daemon.process.pid)
        assert len(ranks) == 2, ranks
        dp0 = next(pid for pid in ranks
                   if b"DP0" in Path(f"/proc/{pid}/cmdline").read_bytes())
        results: list = []

        def long_request() -> None:
            try:
                results.append(complete(daemon.api_url, "dp", "stall me", 300, rank=0))
            except Exception as exc:  # noqa: BLE001  (reported by the assertion below)
                results.append(exc)

        workers = [threading.Thread(target=long_request, daemon=True) for _ in range(2)]
        os.kill(dp0, signal.SIGSTOP)
        try:
            for worker in workers:
                worker.start()
            wait_for(lambda: daemon.scrape().get("vllm_engine_requests_unfinished", model="dp",
                                                 engine="0") == 2, 30,
                     what="2 requests in flight to rank 0")
            wait_for(lambda: stalled_engines(daemon) == {"0"}, 40,
                     what="VllmEngineStalled for rank 0")
            s = daemon.scrape()
            assert s.get("vllm_engine_requests_unfinished", model="dp", engine="1") == 0
            assert stalled_engines(daemon) == {"0"}  # the idle rank beside it pages nothing
        finally:
            os.kill(dp0, signal.SIGCONT)
        for worker in workers:
            worker.join(120)
        assert all(isinstance(r, dict) and r["completion_tokens"] == 300 for r in results), results
        wait_for(lambda: not stalled_engines(daemon), 30, what="the stall to resolve")
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log_tail()


def engine_labels(s: Samples, name: str) -> set[str]:
    return {labels["engine"] for labels, _ in s.series(name) if "engine" in labels}


@pytest.mark.engine
def test_external_load_balancing_ranks_each_have_their_own_exact_endpoint(tmp_path):
    """vLLM's external load balancing (a mixture-of-experts model, `--data-parallel-size 2`,
    one server per `--data-parallel-rank`): rank 0 runs as `vllm serve` with the plugin, rank 1
    under the daemon. Each server has its own endpoint, which counts exactly the requests its own
    API served, on its own rank's `engine` label only."""
    model = ensure_moe_model()
    rpc_port = free_port()
    rank_args = {"data_parallel_address": "127.0.0.1", "data_parallel_rpc_port": rpc_port,
                 "enforce_eager": True}
    env = moe_data_parallel_env(daemon_env())
    env["VLLM_CPU_OMP_THREADS_BIND"] = "0"  # one core per rank (docs/topologies.md, Limits)

    # Rank 0: `vllm serve` with the plugin, its own metrics port and shard directory.
    api_port, metrics_port = free_port(), free_port()
    shard_dir = tmp_path / "shards-rank0"
    plugin_config = tmp_path / "plugin.yaml"
    plugin_config.write_text("daemon: {idle_timeout_seconds: 1.0, exit_delay_seconds: 2.0}\n"
                             "gpu: {enabled: false}\n")
    env.update(VLLM_EXPORTER_CONFIG=str(plugin_config),
               VLLM_EXPORTER_METRICS_PORT=str(metrics_port),
               VLLM_EXPORTER_SHARD_DIR=str(shard_dir))
    log = tmp_path / "rank0.log"
    argv = [sys.executable, str(VLLM_CLI), "serve", str(model), "--served-model-name", "moe",
            "--max-model-len", "512", "--host", "127.0.0.1", "--port", str(api_port),
            "--data-parallel-size", "2", "--data-parallel-rank", "0"]
    for name, value in rank_args.items():
        argv += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    rank0 = start_group(argv, log, env)
    rank1 = None
    try:
        # Rank 1: the daemon (its engine joins rank 0's data-parallel group).
        daemon_env_1 = moe_data_parallel_env(daemon_env())
        daemon_env_1["VLLM_CPU_OMP_THREADS_BIND"] = "1"
        config = daemon_config(
            free_port(), free_port(), gpu={"enabled": False},
            engine={"model": str(model), "served_model_name": "moe", "data_parallel_size": 2,
                    "extra_args": {"data_parallel_rank": 1, **rank_args}})
        rank1 = start_daemon(tmp_path, config, name="rank1", env=daemon_env_1)
        api_url = f"http://127.0.0.1:{api_port}"
        wait_url(f"{api_url}/health", rank0, STARTUP_TIMEOUT, log, what="rank 0 (vllm serve)")
        endpoints = {"0": (api_url, f"http://127.0.0.1:{metrics_port}/metrics"),
                     "1": (rank1.api_url, rank1.metrics_url)}

        sent = {"0": 2, "1": 3}
        usage: dict = {"0": {}, "1": {}}
        for rank, (api, _) in endpoints.items():
            for i in range(sent[rank]):
                add_usage(usage[rank], complete(api, "moe", f"rank {rank} request {i}"))
        for rank, (_, metrics_url) in endpoints.items():
            wait_for(lambda: counters_reach(metrics_url, usage[rank], sent[rank], model="moe",
                                            engine=rank), 20,
                     what=f"rank {rank}'s counters to reach its API's usage {usage[rank]}")
            s = scrape(metrics_url)
            assert s.get("vllm_requests_finished_total", model="moe", engine=rank,
                         finish_reason="length") == sent[rank]
            # Only this server's own rank: nothing of the other rank is counted here.
            for name in ("vllm_generation_tokens_total", "vllm_kv_cache_capacity_tokens",
                         "vllm_engine_steps_total"):
                assert engine_labels(s, name) == {rank}, (name, engine_labels(s, name))
            assert s.get("vllm_engine_up", model="moe") == 1
            assert s.series("vllm_engine_config_info")[0][0]["data_parallel_size"] == "2"
        assert scrape(endpoints["0"][1]).get("vllm_exporter_processes", role="frontend",
                                             state="live") == 1
        assert rank1.scrape().get("vllm_exporter_processes", role="daemon", state="live") == 1
    finally:
        code = rank1.stop() if rank1 is not None else 0
        stop_group(rank0)
    # Rank 0's metrics process (detached from vLLM's processes) ends by itself.
    wait_for(lambda: not shard_dir.exists(), 30, what="rank 0's metrics process to end")
    assert code == 0, rank1.log_tail()
