"""Shards and their merge, without an engine: several real writer processes, one reader.

Writers here are real processes (python -c ...) so that liveness (pid and start time), exited
processes and merge rules are exercised as the metrics process meets them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time

import pytest
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text

from exporter.aggregate import ShardCollector, ShardSet
from exporter.alerts.service import AlertingService, load_rules
from exporter.config import load_config
from exporter.runtime import Runtime
from testsupport import ROOT
from testsupport.exposition import Samples
from testsupport.waiting import wait_for

WRITER = textwrap.dedent("""
    import sys, time
    from exporter.config import load_config
    from exporter.frontend import Frontend
    from types import SimpleNamespace as NS  # vLLM's stats classes, by their fields
    directory, running, tokens, stamp, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \\
        float(sys.argv[4]), float(sys.argv[5])
    fe = Frontend(load_config(None), directory)
    recorder = fe.attach_stat_logger("m", [0])
    fe.set_engine_state("serving")
    it = NS(num_prompt_tokens=3, num_generation_tokens=tokens, num_preempted_reqs=0,
            time_to_first_tokens_iter=[0.05], inter_token_latencies_iter=[],
            finished_requests=[NS(
                finish_reason="stop", e2e_latency=0.5, num_prompt_tokens=3,
                num_generation_tokens=tokens, queued_time=0.01, prefill_time=0.02,
                decode_time=0.1, inference_time=0.12, mean_time_per_output_token=0.05)])
    recorder._wall_clock = lambda: stamp
    recorder.record(NS(num_running_reqs=running, num_waiting_reqs=0, kv_cache_usage=0.5,
                       prefix_cache_stats=None), it)
    fe.metrics.frontend_requests_unfinished.labels("m").set(running)
    print("written", flush=True)
    time.sleep(hold)  # a live writer process until the test kills it
""")


def writer(directory, running: int, tokens: int, stamp: float, hold: float) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(directory), str(running), str(tokens), str(stamp),
         str(hold)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "written"
    return process


@pytest.fixture
def shard_dir(tmp_path):
    directory = tmp_path / "shards"
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def merged(directory) -> Samples:
    collector = ShardCollector(ShardSet(directory))
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(collector)
    return Samples(generate_latest(registry).decode())


def test_two_processes_merge_by_family_rule_and_an_exited_one_keeps_its_counts(shard_dir):
    older = writer(shard_dir, running=3, tokens=5, stamp=1000.0, hold=60)
    newer = writer(shard_dir, running=7, tokens=11, stamp=2000.0, hold=60)
    try:
        s = merged(shard_dir)
        labels = {"model": "m", "engine": "0"}
        assert s.get("vllm_generation_tokens_total", **labels) == 16  # summed
        assert s.get("vllm_e2e_request_latency_seconds_count", **labels) == 2
        assert s.get("vllm_requests_finished_total", finish_reason="stop", **labels) == 2
        assert s.get("vllm_engine_steps_total", **labels) == 2
        # Gauges of the engine's state come from the newest scheduler statistics.
        assert s.get("vllm_requests_running", **labels) == 7
        assert s.get("vllm_engine_last_step_timestamp_seconds", **labels) == 2000.0
        assert s.get("vllm_frontend_requests_unfinished", model="m") == 10  # sum over live
        assert s.get("vllm_engine_up", model="m") == 1
    finally:
        newer.kill()
        newer.wait()
    try:
        reader = ShardSet(shard_dir)
        wait_for(lambda: [shard.live for shard in reader.refresh()].count(False) == 1, 5,
                 what="the killed writer to read as exited")
        s = merged(shard_dir)
        assert s.get("vllm_generation_tokens_total", model="m", engine="0") == 16  # kept
        assert s.get("vllm_frontend_requests_unfinished", model="m") == 3  # live only
        # The newest statistics still decide the engine's gauges (the idle watchdog resets
        # them once the engine is idle).
        assert s.get("vllm_requests_running", model="m", engine="0") == 7
    finally:
        older.kill()
        older.wait()


def test_a_death_reported_by_one_process_wins_over_serving_ones(shard_dir):
    live = writer(shard_dir, running=1, tokens=1, stamp=1.0, hold=60)
    rt = Runtime(load_config(None, {"gpu.enabled": False}), mode="plugin",
                 shard_dir=str(shard_dir), role="frontend")
    try:
        rt.model = "m"
        rt.set_engine_serving()
        assert rt.health() == (True, True, "serving")
        rt.mark_engine_dead()
        assert rt.health() == (False, False, "dead")
        s = Samples(generate_latest(rt.registry).decode())
        assert s.get("vllm_engine_state", model="m", state="dead") == 1
        assert s.get("vllm_engine_state", model="m", state="serving") == 0
    finally:
        rt.stop()
        live.kill()
        live.wait()


def test_fast_render_equals_the_encoders_and_passes_promtool(shard_dir, tmp_path):
    """The metrics port writes its exposition itself (aggregate.py, exposition.py); the result
    must be what prometheus-client's encoders print for the same registry, in both formats."""
    writers = [writer(shard_dir, running=2, tokens=4, stamp=10.0, hold=60) for _ in range(2)]
    config = load_config(None, {"gpu.enabled": False, "metrics.port": 0})
    rt = Runtime(config, mode="plugin", shard_dir=str(shard_dir), role="metrics")
    service = AlertingService(config, load_rules(config))
    try:
        rt.bind_metrics_port()
        service.start(rt.registry, rt.alert_hooks(), thread=False)
        service.tick(time.time())
        rt.frontend.metrics.requests_aborted.labels('quote " and \\ back\nslash').inc(2)
        rt.metrics.scrape_duration_seconds.observe(0.002)

        def samples(text: str, parse) -> list:
            return sorted((s.name, tuple(sorted(s.labels.items())), s.value)
                          for family in parse(text) for s in family.samples)

        for accept, encoder, parse in (
                ("text/plain", generate_latest, parse_text),
                ("application/openmetrics-text; version=1.0.0", openmetrics_latest, parse_om)):
            slow = encoder(rt.registry).decode()  # first: a render counts its own duration
            content_type, fast, _ = rt.server.render_metrics(accept, None)
            assert content_type.startswith(accept)
            fast = fast.decode()
            assert samples(fast, parse) == samples(slow, parse)
            assert sorted(line for line in fast.splitlines() if line.startswith("#")) == \
                sorted(line for line in slow.splitlines() if line.startswith("#"))
            assert len(fast.splitlines()) == len(slow.splitlines())
        promtool = shutil.which("promtool")
        assert promtool, "scripts/setup.sh installs promtool"
        _, text, _ = rt.server.render_metrics("text/plain", None)
        checked = subprocess.run([promtool, "check", "metrics"], input=text.decode(),
                                 capture_output=True, text=True)
        # promtool also lints (naming advice); a malformed exposition is an error.
        assert "error" not in checked.stderr.lower() and "error" not in \
            checked.stdout.lower(), checked.stdout + checked.stderr
    finally:
        rt.stop()
        for process in writers:
            process.kill()
            process.wait()


def test_index_lines_are_read_only_when_complete(shard_dir):
    from exporter.shard import ShardWriter

    w = ShardWriter(shard_dir, "frontend")
    values, slot = w.allocate("vllm_requests_running", ("m", "0"))
    values[slot] = 4
    index = w.index_path
    with open(index, "a") as f:  # a writer interrupted mid-line
        f.write('[99, "vllm_requests_waiting", ["m", ')
    reader = ShardSet(shard_dir)
    shard = reader.refresh()[0]
    assert [s.labels for s in shard.series("vllm_requests_running")] == [("m", "0")]
    assert not list(shard.series("vllm_requests_waiting"))
    with open(index, "a") as f:
        f.write('"0"], null]\n')
    reader.refresh()
    assert [s.slot for s in shard.series("vllm_requests_waiting")] == [99]
    w.close()


def test_the_metrics_process_does_not_import_vllm():
    """Importing vLLM costs seconds and a torch runtime: the metrics process must start while
    vLLM is still loading, so nothing it imports may pull vLLM in."""
    code = ("import sys, exporter.metrics_process, exporter.runtime, exporter.alerts.service, "
            "exporter.daemon; print('vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_a_full_shard_keeps_its_series_apart(shard_dir, monkeypatch):
    """Beyond the shard's capacity a series gets private memory: it never overwrites another."""
    from exporter import shard as shard_module

    writer_ = shard_module.ShardWriter(shard_dir, "frontend")
    monkeypatch.setattr(shard_module, "CAPACITY_SLOTS", writer_._next + 3)
    metrics = shard_module.ShardMetrics(writer_, load_config(None).buckets())
    running = metrics.requests_running.labels("m", "0")
    running.set(7)
    histogram = metrics.time_to_first_token_seconds.labels("m", "0")  # does not fit
    for _ in range(5):
        histogram.observe(0.5)
    assert writer_.overflowed == 1
    shard = ShardSet(shard_dir).refresh()[0]
    [series] = shard.series("vllm_requests_running")
    assert shard.values[series.slot] == 7
    assert not list(shard.series("vllm_time_to_first_token_seconds"))
    writer_.close()
