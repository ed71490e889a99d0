"""The hot path and its helpers, fed with vLLM's own statistics classes (no engine needed)."""

from __future__ import annotations

import enum
import time

import pytest
from prometheus_client import generate_latest
from vllm.v1.engine import FinishReason
from vllm.v1.metrics.stats import (
    FinishedRequestStats,
    IterationStats,
    PrefixCacheStats,
    SchedulerStats,
)

from exporter import frontend as frontend_module
from exporter.config import load_config
from exporter.default_model import ensure_default_model
from exporter.runtime import Runtime
from exporter.vllm_compat import finish_reason_name
from testsupport.exposition import Samples

MODEL = "m"


@pytest.fixture
def rt():
    config = load_config(None, {"gpu.enabled": False})
    runtime = Runtime(config, mode="daemon")
    runtime.attach_stat_logger(MODEL, [0, 1], finish_reason_name)
    yield runtime
    runtime.stop()


def samples(rt: Runtime) -> Samples:
    return Samples(generate_latest(rt.registry).decode())


def finished(reason, prompt=10, generated=5, e2e=1.0, tpot=0.02) -> FinishedRequestStats:
    return FinishedRequestStats(finish_reason=reason, e2e_latency=e2e, num_prompt_tokens=prompt,
                                num_generation_tokens=generated, queued_time=0.01,
                                prefill_time=0.05, decode_time=0.4, inference_time=0.45,
                                mean_time_per_output_token=tpot)


def iteration(**fields) -> IterationStats:
    stats = IterationStats()
    for name, value in fields.items():
        setattr(stats, name, value)
    return stats


def test_scheduler_and_iteration_stats_become_metrics(rt):
    scheduler = SchedulerStats(num_running_reqs=3, num_waiting_reqs=2, num_skipped_waiting_reqs=1,
                               kv_cache_usage=0.25,
                               prefix_cache_stats=PrefixCacheStats(queries=100, hits=40))
    it = iteration(num_generation_tokens=7, num_preempted_reqs=1,
                   time_to_first_tokens_iter=[0.1, 3.0], inter_token_latencies_iter=[0.004] * 5,
                   finished_requests=[finished(FinishReason.STOP),
                                      finished(FinishReason.LENGTH, generated=1),
                                      finished(FinishReason.ABORT, e2e=9.0)])
    it.prompt_token_stats.total = 30
    rt.recorder.record(scheduler, it, engine_idx=1)
    s = samples(rt)
    e1 = {"model": MODEL, "engine": "1"}
    assert s.get("vllm_requests_running", **e1) == 3
    assert s.get("vllm_requests_waiting", **e1) == 3  # deferred ones included
    assert s.get("vllm_kv_cache_usage_ratio", **e1) == 0.25
    assert s.get("vllm_prefix_cache_queries_total", **e1) == 100
    assert s.get("vllm_prefix_cache_hits_total", **e1) == 40
    assert s.get("vllm_prompt_tokens_total", **e1) == 30
    assert s.get("vllm_generation_tokens_total", **e1) == 7
    assert s.get("vllm_preemptions_total", **e1) == 1
    for reason, count in (("stop", 1), ("length", 1), ("abort", 1), ("error", 0)):
        assert s.get("vllm_requests_finished_total", finish_reason=reason, **e1) == count
    assert s.get("vllm_time_to_first_token_seconds_count", **e1) == 2
    assert s.get("vllm_time_to_first_token_seconds_bucket", le="0.1", **e1) == 1
    assert s.get("vllm_inter_token_latency_seconds_count", **e1) == 5
    assert s.get("vllm_inter_token_latency_seconds_bucket", le="0.005", **e1) == 5
    assert s.get("vllm_inter_token_latency_seconds_bucket", le="0.003", **e1) == 0
    assert s.get("vllm_e2e_request_latency_seconds_count", **e1) == 3
    assert s.get("vllm_e2e_request_latency_seconds_sum", **e1) == 11.0
    assert s.get("vllm_request_prompt_tokens_sum", **e1) == 30
    # The single-token request has no time per output token.
    assert s.get("vllm_time_per_output_token_seconds_count", **e1) == 2
    assert s.get("vllm_engine_steps_total", **e1) == 1
    assert s.get("vllm_engine_last_step_timestamp_seconds", **e1) > 1.7e9
    # Engine 0 untouched: labels are per engine.
    assert s.get("vllm_engine_steps_total", model=MODEL, engine="0") == 0


def test_unknown_finish_reasons_fold_into_other(rt):
    class FutureReason(enum.IntEnum):
        TIMEOUT = 7

        def __str__(self):
            return "timeout"

    rt.recorder.record(None, iteration(finished_requests=[finished(FutureReason.TIMEOUT)] * 2))
    s = samples(rt)
    assert s.get("vllm_requests_finished_total", finish_reason="other", model=MODEL) == 2
    assert not [labels for labels, _ in s.series("vllm_requests_finished_total")
                if labels["finish_reason"] == "timeout"]


def test_latency_objectives_are_judged_per_request_at_the_exact_threshold(rt):
    # Default objectives: ttft <= 2.0 s, tpot <= 0.1 s.
    rt.recorder.record(None, iteration(
        time_to_first_tokens_iter=[0.5, 2.0, 2.0001, 7.0],
        finished_requests=[finished(FinishReason.STOP, tpot=0.1),
                           finished(FinishReason.STOP, tpot=0.2)]))
    s = samples(rt)
    assert s.get("vllm_slo_requests_total", objective="ttft", result="good") == 2
    assert s.get("vllm_slo_requests_total", objective="ttft", result="bad") == 2
    assert s.get("vllm_slo_requests_total", objective="tpot", result="good") == 1
    assert s.get("vllm_slo_requests_total", objective="tpot", result="bad") == 1


def idle_check(rt: Runtime, after: float) -> None:
    """One side-loop round `after` seconds past now: the front end publishes its unfinished
    requests, then the runtime judges idleness."""
    rt.frontend.check()
    rt.check_idle(now=time.time() + after)


def test_idle_watchdog_resets_stale_gauges_only_when_nothing_is_unfinished(rt):
    busy = SchedulerStats(num_running_reqs=4, num_waiting_reqs=2, kv_cache_usage=0.5)
    rt.recorder.record(busy, None)
    unfinished = {"n": 6}
    rt.watch_engine(lambda: (unfinished["n"], {0: unfinished["n"]}), lambda: False)

    idle_check(rt, after=0)  # just stepped: not idle
    assert samples(rt).get("vllm_requests_running", engine="0") == 4

    idle_check(rt, after=60)  # a minute without steps, but requests in flight: a stall
    s = samples(rt)
    assert s.get("vllm_requests_running", engine="0") == 4
    assert s.get("vllm_requests_waiting", engine="0") == 2
    assert s.get("vllm_frontend_requests_unfinished") == 6
    assert s.get("vllm_engine_requests_unfinished", engine="0") == 6
    assert s.get("vllm_exporter_idle_resets_total") == 0

    unfinished["n"] = 0  # every request aborted: vLLM sends no more stats
    idle_check(rt, after=60)
    s = samples(rt)
    assert s.get("vllm_requests_running", engine="0") == 0
    assert s.get("vllm_requests_waiting", engine="0") == 0
    assert s.get("vllm_kv_cache_usage_ratio", engine="0") == 0
    assert s.get("vllm_exporter_idle_resets_total") == 1
    idle_check(rt, after=61)  # nothing stale any more: no second reset
    assert samples(rt).get("vllm_exporter_idle_resets_total") == 1

    rt.recorder.record(busy, None)  # the next step brings the engine's own values back
    assert samples(rt).get("vllm_requests_running", engine="0") == 4


def test_idle_is_judged_per_engine_rank(rt):
    """Data parallelism: rank 1 went idle with stale gauges while rank 0 still has work."""
    rt.recorder.record(SchedulerStats(num_running_reqs=3, kv_cache_usage=0.3), None, 0)
    rt.recorder.record(SchedulerStats(num_running_reqs=2, kv_cache_usage=0.2), None, 1)
    rt.watch_engine(lambda: (5, {0: 5, 1: 0}), lambda: False)
    idle_check(rt, after=60)
    s = samples(rt)
    assert s.get("vllm_requests_running", engine="0") == 3  # stalled with work: kept
    assert s.get("vllm_requests_running", engine="1") == 0  # idle: reset
    assert s.get("vllm_kv_cache_usage_ratio", engine="1") == 0
    assert s.get("vllm_engine_requests_unfinished", engine="0") == 5
    assert s.get("vllm_engine_requests_unfinished", engine="1") == 0
    assert s.get("vllm_exporter_idle_resets_total") == 1


def test_engine_death_is_seen_by_the_health_check(rt):
    dead = {"flag": False}
    rt.watch_engine(lambda: (0, {}), lambda: dead["flag"])
    rt.set_engine_serving()
    rt.check_engine_health()
    assert rt.health() == (True, True, "serving")
    dead["flag"] = True
    rt.check_engine_health()
    assert rt.health() == (False, False, "dead")
    assert samples(rt).get("vllm_engine_up", model=MODEL) == 0
    rt.mark_stopping()  # a later shutdown does not hide the death
    assert rt.engine_state == "dead"


@pytest.fixture(scope="module")
def vllm_config():
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(ensure_default_model()), max_model_len=512,
                      served_model_name=["tiny"], kv_cache_dtype="auto")
    return args.create_engine_config()


def test_stat_logger_with_a_real_vllm_config(vllm_config):
    from exporter.plugin import ExporterStatLogger

    config = load_config(None, {"gpu.enabled": False})
    rt = Runtime(config, mode="daemon")
    frontend_module.install(rt.frontend)
    try:
        first = ExporterStatLogger(vllm_config, engine_indexes=[0])
        second = ExporterStatLogger(vllm_config, engine_indexes=[0])  # e.g. via the entry point
        vllm_config.cache_config.num_gpu_blocks = 100
        first.log_engine_initialized()
        second.log_engine_initialized()
        first.record(SchedulerStats(num_running_reqs=1), None, None, 0)
        second.record(SchedulerStats(num_running_reqs=1), None, None, 0)
        first.record(SchedulerStats(num_running_reqs=1), "not iteration stats", None, 0)
        s = samples(rt)
        labels = {"model": "tiny", "engine": "0"}
        assert s.get("vllm_engine_steps_total", **labels) == 2  # the second logger is inert
        assert s.get("vllm_exporter_stat_logger_records_total") == 2
        assert s.get("vllm_exporter_errors_total", component="stat_logger") == 1
        block_size = vllm_config.cache_config.block_size
        assert s.get("vllm_kv_cache_capacity_tokens", **labels) == 100 * block_size
        # 2 layers x 2 KV heads x head dim 64 x (K, V) x bfloat16
        assert s.get("vllm_kv_cache_bytes_per_token", **labels) == 1024
        info = s.series("vllm_engine_config_info")[0][0]
        assert info["max_model_len"] == "512" and info["model"] == "tiny"
        assert info["dtype"] == "bfloat16" and info["quantization"] == "none"
    finally:
        frontend_module.install(None)
        rt.stop()
