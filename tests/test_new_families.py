"""The families of issue 15 (speculative decoding, waiting reasons, admission, sleep, prompt
token sources, KV residency, FLOPs, hybrid capacity, aborted requests' time), fed with vLLM's
own statistics classes and scripted calls: no engine. What needs an engine to move is in
tests/test_spec_decode_e2e.py; what cannot move on the CPU build (sleep mode, KV-connector
stages and external hits) is only tested here."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from vllm.v1.engine import FinishReason
from vllm.v1.metrics.perf import PerfStats
from vllm.v1.metrics.stats import (
    FinishedRequestStats,
    IterationStats,
    KVCacheEvictionEvent,
    PrefixCacheStats,
    SchedulerStats,
)
from vllm.v1.spec_decode.metrics import SpecDecodingStats

from exporter import frontend as frontend_module
from exporter.aggregate import ShardCollector, ShardSet
from exporter.cli import main
from exporter.config import load_config
from exporter.daemon import vllm_argv
from exporter.default_model import ensure_default_model
from exporter.catalog import conditional_samples
from exporter.metrics import CONDITIONAL_FAMILIES, FAMILIES
from exporter.runtime import Runtime
from exporter.shard import ShardMetrics, ShardWriter
from exporter.stats import MAX_SPEC_POSITIONS, StatsRecorder
from exporter.tuning.plan import make_plan
from exporter.vllm_compat import (
    count_client_aborts,
    engine_config_labels,
    engine_features,
    finish_reason_name,
    kv_cache_geometry,
    parse_server_args,
)
from testsupport.exposition import Samples

MODELS = Path(__file__).resolve().parent / "data" / "models"
GiB = 2**30
E0 = {"model": "m", "engine": "0"}


@pytest.fixture
def recorder(tmp_path):
    """A recorder writing a shard in tmp_path; `render()` gives the merged exposition."""
    writer = ShardWriter(tmp_path)
    rec = StatsRecorder(ShardMetrics(writer, load_config(None, {"gpu.enabled": False}).buckets()),
                        "m", [0, 1], finish_reason_name)
    collector = ShardCollector(ShardSet(tmp_path))
    rec.render = lambda: Samples(collector.render(False))
    yield rec
    writer.close()


def spec_stats(k: int, drafts: list[tuple[int, int]]) -> SpecDecodingStats:
    stats = SpecDecodingStats.new(k)
    for drafted, accepted in drafts:
        stats.observe_draft(drafted, accepted)
    return stats


# --- the recorder: each family from its vLLM field ---------------------------------------------

def test_speculative_decoding_counts_drafts_tokens_and_positions(recorder):
    recorder.record(SchedulerStats(spec_decoding_stats=spec_stats(3, [(3, 3), (3, 1), (2, 0)])),
                    None, 0)
    recorder.record(SchedulerStats(spec_decoding_stats=spec_stats(3, [(3, 2)])), None, 0)
    s = recorder.render()
    assert s.get("vllm_spec_decode_drafts_total", **E0) == 4
    assert s.get("vllm_spec_decode_draft_tokens_total", **E0) == 11
    assert s.get("vllm_spec_decode_accepted_tokens_total", **E0) == 6
    per_position = {labels["position"]: v for labels, v in
                    s.series("vllm_spec_decode_accepted_tokens_per_position_total")}
    assert per_position == {"0": 3, "1": 2, "2": 1}
    # Engine 1 never drafted: no spec-decode series of its own (absent, not 0).
    assert not [l for l, _ in s.series("vllm_spec_decode_drafts_total") if l["engine"] == "1"]


def test_draft_positions_beyond_the_cap_fold_into_other(recorder):
    k = MAX_SPEC_POSITIONS + 3
    recorder.record(SchedulerStats(spec_decoding_stats=spec_stats(k, [(k, k)])), None, 0)
    positions = {labels["position"]: v for labels, v in
                 recorder.render().series("vllm_spec_decode_accepted_tokens_per_position_total")}
    assert len(positions) == MAX_SPEC_POSITIONS + 1 and positions["other"] == 3
    assert positions[str(MAX_SPEC_POSITIONS - 1)] == 1


def test_waiting_requests_by_reason_add_up_to_the_total(recorder):
    recorder.record(SchedulerStats(num_running_reqs=4, num_waiting_reqs=5,
                                   num_skipped_waiting_reqs=2), None, 0)
    s = recorder.render()
    assert s.get("vllm_requests_waiting_by_reason", reason="capacity", **E0) == 5
    assert s.get("vllm_requests_waiting_by_reason", reason="deferred", **E0) == 2
    assert s.get("vllm_requests_waiting", **E0) == 7  # the public total is unchanged


def test_kv_fetch_stages_and_external_prefix_hits_appear_with_a_kv_connector(recorder):
    s = recorder.render()
    assert not s.series("vllm_requests_waiting_kv_fetch")
    assert not s.series("vllm_external_prefix_cache_hits_total")
    recorder.expect({"kv_consumer": True})  # the engine's kv_transfer_config says so
    recorder.record(SchedulerStats(
        num_kv_fetch_reqs_by_stage={"waiting_to_start": 1, "in_progress": 4, "future_stage": 2},
        connector_prefix_cache_stats=PrefixCacheStats(requests=1, queries=64, hits=48)), None, 0)
    recorder.record(SchedulerStats(num_kv_fetch_reqs_by_stage={}), None, 0)  # all loaded
    recorder.record(SchedulerStats(num_kv_fetch_reqs_by_stage={"in_progress": 3}), None, 1)
    s = recorder.render()
    stages = {(l["engine"], l["stage"]): v for l, v in s.series("vllm_requests_waiting_kv_fetch")}
    assert stages[("0", "in_progress")] == 0 and stages[("0", "other")] == 0
    assert stages[("1", "in_progress")] == 3 and stages[("1", "waiting_to_start")] == 0
    assert s.get("vllm_external_prefix_cache_queries_total", **E0) == 64
    assert s.get("vllm_external_prefix_cache_hits_total", **E0) == 48


def test_cached_prompt_tokens_by_tier_add_up_to_the_hit_counters(recorder):
    """The device tier counts the local prefix cache's hits, the others the connector's hits
    by the tier vLLM names; a tier this release does not know counts as other."""
    from vllm.v1.metrics.cache_hit_source import CacheHitSource

    recorder.expect({"kv_connector": True})
    s = recorder.render()
    assert {l["tier"] for l, _ in s.series("vllm_prefix_cache_hits_by_tier_total")} == {
        "device", "host", "p2p", "disk", "external_unspecified"}
    external = PrefixCacheStats(requests=2, queries=96, hits=80)
    external.hits_by_source = {CacheHitSource.HOST: 48, CacheHitSource.DISK: 32}
    recorder.record(SchedulerStats(
        prefix_cache_stats=PrefixCacheStats(requests=2, queries=96, hits=16),
        connector_prefix_cache_stats=external), None, 0)
    later = PrefixCacheStats(requests=1, queries=32, hits=32)
    later.hits_by_source = {CacheHitSource.HOST: 16, "a-new-tier": 16}
    recorder.record(SchedulerStats(prefix_cache_stats=PrefixCacheStats(),
                                   connector_prefix_cache_stats=later), None, 0)
    s = recorder.render()
    tiers = {l["tier"]: v for l, v in s.series("vllm_prefix_cache_hits_by_tier_total")
             if l["engine"] == "0"}
    assert tiers == {"device": 16, "host": 64, "disk": 32, "p2p": 0,
                     "external_unspecified": 0, "other": 16}
    assert tiers["device"] == s.get("vllm_prefix_cache_hits_total", **E0)
    assert sum(tiers.values()) - tiers["device"] == s.get(
        "vllm_external_prefix_cache_hits_total", **E0)


def test_kv_fetch_stages_at_zero_without_a_connector_leave_the_family_absent(recorder):
    """vLLM 0.32 sends the stages on every engine (all 0 without a KV connector, and even a
    count on an engine whose config is not a KV consumer is not read)."""
    recorder.record(SchedulerStats(num_kv_fetch_reqs_by_stage={"in_progress": 1}), None, 1)
    recorder.record(SchedulerStats(num_kv_fetch_reqs_by_stage=dict.fromkeys(
        ("waiting_to_start", "in_progress", "completed_waiting"), 0)), None, 0)
    assert not recorder.render().series("vllm_requests_waiting_kv_fetch")


def test_kv_fetch_stage_unknown_to_this_release_counts_as_other(recorder):
    recorder.expect({"kv_consumer": True})
    recorder.record(SchedulerStats(num_kv_fetch_reqs_by_stage={"future_stage": 2,
                                                               "in_progress": 1}), None, 0)
    s = recorder.render()
    assert s.get("vllm_requests_waiting_kv_fetch", stage="other", **E0) == 2
    assert s.get("vllm_requests_waiting_kv_fetch", stage="in_progress", **E0) == 1


def test_prompt_tokens_by_source_and_prefill_kv_computed(recorder):
    it = IterationStats()
    it.prompt_token_stats.computed = 70
    it.prompt_token_stats.local_cache_hit = 256
    it.prompt_token_stats.external_kv_transfer = 30
    it.prompt_token_stats.total = 356
    it.finished_requests = [
        FinishedRequestStats(FinishReason.STOP, num_prompt_tokens=300, num_cached_tokens=256,
                             num_generation_tokens=4),
        FinishedRequestStats(FinishReason.LENGTH, num_prompt_tokens=56, num_cached_tokens=-1,
                             num_generation_tokens=4)]
    recorder.record(SchedulerStats(), it, 0)
    s = recorder.render()
    by_source = {l["source"]: v for l, v in s.series("vllm_prompt_tokens_by_source_total")
                 if l["engine"] == "0"}
    assert by_source == {"local_compute": 70, "local_cache_hit": 256, "external_kv_transfer": 30}
    assert sum(by_source.values()) == s.get("vllm_prompt_tokens_total", **E0)
    # 300 - 256 and 56 - 0 (vLLM's -1 means unknown: nothing cached)
    assert s.get("vllm_request_prefill_kv_computed_tokens_sum", **E0) == 44 + 56
    assert s.get("vllm_request_prefill_kv_computed_tokens_count", **E0) == 2


def test_kv_block_residency_and_flops(recorder):
    events = [KVCacheEvictionEvent(lifetime_seconds=12.0, idle_seconds=3.0,
                                   reuse_gaps_seconds=(0.5, 1.5, 2.0)),
              KVCacheEvictionEvent(lifetime_seconds=0.02, idle_seconds=0.02,
                                   reuse_gaps_seconds=())]
    recorder.record(SchedulerStats(kv_cache_eviction_events=events,
                                   perf_stats=PerfStats(num_flops_per_gpu=2 * 10**12,
                                                        num_read_bytes_per_gpu=10**9,
                                                        num_write_bytes_per_gpu=10**8)), None, 0)
    recorder.record(SchedulerStats(perf_stats=PerfStats(10**12, 0, 0)), None, 0)
    s = recorder.render()
    assert s.get("vllm_kv_block_lifetime_seconds_count", **E0) == 2
    assert s.get("vllm_kv_block_lifetime_seconds_sum", **E0) == pytest.approx(12.02)
    assert s.get("vllm_kv_block_idle_before_evict_seconds_sum", **E0) == pytest.approx(3.02)
    assert s.get("vllm_kv_block_reuse_gap_seconds_count", **E0) == 3
    assert s.get("vllm_kv_block_reuse_gap_seconds_bucket", le="1.0", **E0) == 1
    assert s.get("vllm_estimated_flops_per_gpu_total", **E0) == 3 * 10**12
    assert s.get("vllm_estimated_read_bytes_per_gpu_total", **E0) == 10**9
    assert s.get("vllm_estimated_write_bytes_per_gpu_total", **E0) == 10**8


def test_admission_rejections_by_reason(recorder):
    recorder.expect({"admission_rejections": True})
    s = recorder.render()
    assert {l["reason"]: v for l, v in s.series("vllm_admission_rejections_total")} == \
        {"max_num_queued_reqs": 0, "max_num_queued_tokens": 0}
    for reason in ("max_num_queued_reqs", "max_num_queued_reqs", "max_num_queued_tokens",
                   "a_reason_of_a_later_release"):
        recorder.record_admission_rejection(reason)
    s = recorder.render()
    assert s.get("vllm_admission_rejections_total", reason="max_num_queued_reqs") == 2
    assert s.get("vllm_admission_rejections_total", reason="max_num_queued_tokens") == 1
    assert s.get("vllm_admission_rejections_total", reason="other") == 1


def test_sleep_state_follows_sleep_and_wake(recorder):
    def states() -> dict[str, float]:
        return {l["sleep_state"]: v for l, v in
                recorder.render().series("vllm_engine_sleep_state") if l["engine"] == "1"}

    assert states() == {"awake": 1, "kv_cache_released": 0, "weights_offloaded": 0,
                        "discard_all": 0}
    recorder.set_sleep_state(1, 1)
    assert states()["weights_offloaded"] == 1 and sum(states().values()) == 1
    recorder.set_sleep_state(1, 2)
    assert states()["discard_all"] == 1 and sum(states().values()) == 1
    recorder.set_sleep_state(1, 0)  # release_kv_cache_memory (vLLM 0.31+)
    assert states()["kv_cache_released"] == 1 and sum(states().values()) == 1
    recorder.set_sleep_state(0, 0)
    assert states()["awake"] == 1 and sum(states().values()) == 1


def test_aborted_requests_time_in_engine(recorder):
    recorder.record_client_aborts([0.3, 4.0, 40.0])
    s = recorder.render()
    assert s.get("vllm_aborted_request_duration_seconds_count", model="m") == 3
    assert s.get("vllm_aborted_request_duration_seconds_sum", model="m") == pytest.approx(44.3)


def test_expected_features_exist_at_zero_before_their_first_event(recorder):
    recorder.expect({"num_speculative_tokens": 2, "kv_cache_metrics": True, "mfu_metrics": True,
                     "kv_consumer": True, "kv_connector": True})
    s = recorder.render()
    for name in ("vllm_spec_decode_drafts_total", "vllm_estimated_flops_per_gpu_total",
                 "vllm_kv_block_lifetime_seconds_count", "vllm_external_prefix_cache_hits_total"):
        assert [v for l, v in s.series(name) if l["engine"] in ("0", "1")] == [0, 0], name
    assert {l["position"] for l, _ in
            s.series("vllm_spec_decode_accepted_tokens_per_position_total")} == {"0", "1"}
    assert len(s.series("vllm_requests_waiting_kv_fetch")) == 2 * 4  # 3 stages + other


def test_a_release_without_the_new_fields_leaves_their_families_absent(recorder):
    """vLLM 0.26-0.31 objects lack fields (num_kv_fetch_reqs_by_stage; older ones more): the
    recorder reads what is there and leaves the rest out, never fails."""
    scheduler = types.SimpleNamespace(num_running_reqs=2, num_waiting_reqs=1,
                                      kv_cache_usage=0.5, prefix_cache_stats=None)
    iteration = types.SimpleNamespace(num_prompt_tokens=10, num_generation_tokens=3,
                                      num_preempted_reqs=0, time_to_first_tokens_iter=[0.1],
                                      inter_token_latencies_iter=[], finished_requests=[
                                          types.SimpleNamespace(
                                              finish_reason="stop", e2e_latency=1.0,
                                              queued_time=0.1, prefill_time=0.1,
                                              decode_time=0.5, num_prompt_tokens=10,
                                              num_generation_tokens=3,
                                              mean_time_per_output_token=0.2)])
    recorder.record(scheduler, iteration, 0)
    s = recorder.render()
    assert s.get("vllm_requests_waiting_by_reason", reason="capacity", **E0) == 1
    assert s.get("vllm_requests_waiting_by_reason", reason="deferred", **E0) == 0
    assert s.get("vllm_request_prefill_kv_computed_tokens_sum", **E0) == 10
    for name in CONDITIONAL_FAMILIES:
        assert not s.series(name) and not s.series(name + "_count"), name


# --- capacity: vLLM's own figure first (hybrid models), the formula as fallback -----------------

def hybrid_vllm_config(kv_cache_size_tokens: int | None, concurrency: float | None):
    """A VllmConfig-shaped object of a Gemma-2-like hybrid (alternating sliding-window and full
    attention layers) as vLLM's front end holds it after the engine started."""
    hf_config = types.SimpleNamespace(num_hidden_layers=26, sliding_window=4096,
                                      layer_types=["sliding_attention", "full_attention"] * 13)
    model_config = types.SimpleNamespace(
        hf_config=hf_config, hf_text_config=hf_config, use_mla=False, dtype="torch.bfloat16",
        max_model_len=8192, get_total_num_kv_heads=lambda: 8, get_head_size=lambda: 256)
    cache_config = types.SimpleNamespace(num_gpu_blocks=10_000, block_size=16,
                                         cache_dtype="auto",
                                         kv_cache_size_tokens=kv_cache_size_tokens,
                                         kv_cache_max_concurrency=concurrency)
    return types.SimpleNamespace(model_config=model_config, cache_config=cache_config)


def test_hybrid_model_capacity_comes_from_vllm_and_the_formula_is_the_fallback(recorder):
    # vLLM's group-aware figure for this hybrid: 2 KV-cache groups share the pool, so a request
    # holds blocks in both: 160,000 pool tokens serve ~9.4 requests of 8,192 tokens.
    geometry = kv_cache_geometry(hybrid_vllm_config(77_000, 9.4))
    assert geometry["capacity_tokens"] == 77_000 and geometry["max_concurrency"] == 9.4
    assert geometry["bytes_per_token"] == 2 * 26 * 8 * 256 * 2
    recorder.set_capacity(geometry)
    s = recorder.render()
    assert s.get("vllm_kv_cache_capacity_tokens", **E0) == 77_000
    assert s.get("vllm_kv_cache_max_concurrency", **E0) == 9.4
    assert s.get("vllm_kv_cache_blocks", **E0) == 10_000
    # The pool's bytes are still blocks x block size x bytes per token.
    assert s.get("vllm_kv_cache_capacity_bytes", **E0) == 160_000 * 2 * 26 * 8 * 256 * 2

    fallback = kv_cache_geometry(hybrid_vllm_config(None, None))
    assert fallback["capacity_tokens"] is None and fallback["max_concurrency"] is None
    recorder.set_capacity(fallback)
    s = recorder.render()
    assert s.get("vllm_kv_cache_capacity_tokens", **E0) == 160_000
    assert s.get("vllm_kv_cache_max_concurrency", **E0) == 9.4  # the last figure vLLM gave


def test_without_vllm_figures_there_is_no_max_concurrency_series(recorder):
    recorder.set_capacity({"blocks": 10, "block_size": 16, "bytes_per_token": 2.0})
    s = recorder.render()
    assert s.get("vllm_kv_cache_capacity_tokens", **E0) == 160
    assert not s.series("vllm_kv_cache_max_concurrency")


# --- the stat logger vLLM calls, and what vllm_compat reads ------------------------------------

@pytest.fixture(scope="module")
def spec_vllm_config():
    """A real VllmConfig with n-gram speculation and vLLM's opt-in statistics (no engine)."""
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(ensure_default_model()), max_model_len=512,
                      served_model_name=["spec"],
                      speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                          "prompt_lookup_max": 4, "prompt_lookup_min": 2},
                      kv_cache_metrics=True, kv_cache_metrics_sample=0.5,
                      enable_mfu_metrics=True)
    return args.create_engine_config()


def test_engine_features_and_config_labels_read_the_vllm_config(spec_vllm_config):
    features = engine_features(spec_vllm_config)
    assert features["num_speculative_tokens"] == 3
    assert features["kv_cache_metrics"] and features["mfu_metrics"]
    assert not features["kv_consumer"] and not features["kv_connector"]
    assert features["admission_rejections"]  # the installed vLLM is 0.32
    labels = engine_config_labels(spec_vllm_config, "spec")
    assert (labels["speculative_method"], labels["num_speculative_tokens"]) == ("ngram", "3")
    assert (labels["kv_cache_metrics"], labels["enable_mfu_metrics"]) == ("true", "true")
    plain = engine_config_labels(types.SimpleNamespace(), "plain")
    assert (plain["speculative_method"], plain["num_speculative_tokens"]) == ("none", "0")


def test_plugin_calls_reach_the_families(spec_vllm_config):
    from exporter.plugin import ExporterStatLogger

    rt = Runtime(load_config(None, {"gpu.enabled": False}), mode="plugin")
    frontend_module.install(rt.frontend)
    try:
        logger = ExporterStatLogger(spec_vllm_config, engine_indexes=[0])
        s = Samples(rt.collector.render(False))
        labels = {"model": "spec", "engine": "0"}
        # Switched on by the engine's config: present at 0 before the first step.
        assert s.series("vllm_spec_decode_drafts_total") and \
            s.get("vllm_spec_decode_drafts_total", **labels) == 0
        assert len(s.series("vllm_spec_decode_accepted_tokens_per_position_total")) == 3
        assert s.series("vllm_kv_block_lifetime_seconds_count")
        assert s.series("vllm_estimated_flops_per_gpu_total")
        assert not s.series("vllm_requests_waiting_kv_fetch")  # no KV-transfer consumer
        logger.record_admission_rejection("max_num_queued_tokens")
        logger.record_sleep_state(1, 2)  # as vLLM's StatLoggerManager calls it
        logger.record(SchedulerStats(spec_decoding_stats=spec_stats(3, [(3, 2)])), None)
        s = Samples(rt.collector.render(False))
        assert s.get("vllm_admission_rejections_total", model="spec",
                     reason="max_num_queued_tokens") == 1
        assert s.get("vllm_engine_sleep_state", sleep_state="discard_all", **labels) == 1
        assert s.get("vllm_engine_sleep_state", sleep_state="awake", **labels) == 0
        assert s.get("vllm_spec_decode_accepted_tokens_total", **labels) == 2
        logger.record_sleep_state(0, 0)
        s = Samples(rt.collector.render(False))
        assert s.get("vllm_engine_sleep_state", sleep_state="awake", **labels) == 1
        assert s.get("vllm_exporter_errors_total", component="stat_logger") == 0
    finally:
        frontend_module.install(None)
        rt.stop()


class _Processor:
    """vLLM's OutputProcessor as the abort wrapper sees it: request states with their
    arrival time, the external -> internal id map, and abort_requests returning what it
    aborted (0.26-0.33)."""

    def __init__(self, arrivals: dict[str, float], external: dict[str, list[str]]):
        self.request_states = {rid: types.SimpleNamespace(
            stats=types.SimpleNamespace(arrival_time=t)) for rid, t in arrivals.items()}
        self.external_req_ids = external

    def abort_requests(self, request_ids, internal: bool) -> list[str]:
        ids = list(request_ids) if internal else [
            i for r in request_ids for i in self.external_req_ids.pop(r, [])]
        return [i for i in ids if self.request_states.pop(i, None) is not None]


def test_client_aborts_report_each_requests_time_since_arrival(monkeypatch):
    import exporter.vllm_compat as compat

    monkeypatch.setattr(compat.time, "time", lambda: 1000.0)
    processor = _Processor({"a-1": 990.0, "b-1": 999.5, "b-2": 998.0},
                           {"a": ["a-1"], "b": ["b-1", "b-2"]})
    engine = types.SimpleNamespace(output_processor=processor)
    seen: list[tuple[int, list[float]]] = []
    count_client_aborts(engine, lambda n, seconds: seen.append((n, seconds)))
    assert processor.abort_requests(iter(["a-1"]), True) == ["a-1"]  # internal, an iterator
    assert processor.abort_requests(["b", "gone"], internal=False) == ["b-1", "b-2"]
    assert processor.abort_requests(["a-1"], True) == []  # already gone: nothing reported
    assert seen == [(1, [10.0]), (2, [0.5, 2.0])]


# --- opt-in switches: our config -> vLLM's flags ---------------------------------------------

def test_opt_in_statistics_are_off_unless_set_and_pass_to_vllm_when_set():
    config = load_config(None, {})
    argv = vllm_argv(config, "/m", "m")
    assert not [a for a in argv if "kv-cache-metrics" in a or "mfu" in a]
    config = load_config(None, {"engine.kv_cache_metrics": True,
                                "engine.kv_cache_metrics_sample": 0.25,
                                "engine.enable_mfu_metrics": True})
    argv = vllm_argv(config, str(ensure_default_model()), "m")
    assert "--kv-cache-metrics" in argv and "--enable-mfu-metrics" in argv
    assert argv[argv.index("--kv-cache-metrics-sample") + 1] == "0.25"
    args = parse_server_args(argv)  # vLLM's own parser takes them
    assert args.kv_cache_metrics and args.enable_mfu_metrics
    assert args.kv_cache_metrics_sample == 0.25


def test_a_bad_sample_rate_is_refused_before_anything_starts():
    from exporter.config_files import ConfigError

    with pytest.raises(ConfigError, match="kv_cache_metrics_sample"):
        load_config(None, {"engine.kv_cache_metrics_sample": 1.5})


# --- dashboards: panels of features that may be off say so -------------------------------------

def test_panels_of_conditional_families_say_what_is_not_enabled():
    from exporter.dashboards import generate
    from exporter.dashboards.inspect import iter_panels, metric_names

    conditional = conditional_samples()
    dashboard = generate()["engine.json"]
    checked = 0
    for panel in iter_panels(dashboard):
        names = set().union(*(metric_names(t["expr"]) for t in panel["targets"]))
        if names & conditional:
            checked += 1
            assert panel["fieldConfig"]["defaults"].get("noValue"), panel["title"]
    assert checked >= 6


def test_every_new_family_documents_its_vllm_source_and_versions():
    new = [f for f in FAMILIES if f.name in CONDITIONAL_FAMILIES or f.name in (
        "vllm_requests_waiting_by_reason", "vllm_engine_sleep_state",
        "vllm_prompt_tokens_by_source_total", "vllm_request_prefill_kv_computed_tokens",
        "vllm_aborted_request_duration_seconds", "vllm_kv_cache_max_concurrency")]
    assert len(new) == 21
    for family in new:
        assert "0.26" in family.source or "0.32" in family.source, family.name


# --- plan: speculative decoding and prefix caching ---------------------------------------------

def test_plan_counts_an_eagle_heads_kv_and_the_lookahead_slots():
    plain = make_plan(str(MODELS / "llama-3-8b"), kv_cache_bytes=64 * GiB, max_model_len=8192,
                      avg_context_len=2048)
    assert not plain["speculative"]["relevant"]
    plan = make_plan(str(MODELS / "llama-3-8b"), kv_cache_bytes=64 * GiB, max_model_len=8192,
                     avg_context_len=2048, speculative_method="eagle", num_speculative_tokens=3)
    spec = plan["speculative"]
    per_layer = 2 * 8 * 128 * 2  # one layer of the target's attention shape
    assert spec["draft_kv_bytes_per_token"] == per_layer
    assert spec["kv_bytes_per_token_with_draft"] == 131_072 + per_layer
    # 2,048 + 3 lookahead tokens -> 129 blocks of 16 at (131,072 + 4,096) bytes per token.
    assert spec["max_seqs_at_avg_context"] == 64 * GiB // (129 * 16 * (131_072 + per_layer))
    assert spec["max_seqs_at_avg_context"] < plain["capacity"]["max_seqs_at_avg_context"]
    assert "EAGLE" in spec["draft_kv_source"] and spec["draft_weights_bytes"] is None


def test_plan_ngram_costs_only_lookahead_and_a_draft_model_its_weights_and_kv(tmp_path):
    ngram = make_plan(str(MODELS / "llama-3-8b"), kv_cache_bytes=64 * GiB,
                      speculative_method="ngram", num_speculative_tokens=4)["speculative"]
    assert (ngram["draft_kv_bytes_per_token"], ngram["draft_weights_bytes"]) == (0, 0)
    draft = make_plan(str(MODELS / "llama-3-8b"), gpu_memory_bytes=80 * GiB,
                      speculative_method="draft_model", num_speculative_tokens=4,
                      draft_model_dir=str(MODELS / "llama-2-7b-awq"))["speculative"]
    assert draft["draft_kv_bytes_per_token"] == 524_288  # the draft's own 32 x 32 heads x 128
    assert draft["draft_weights_bytes"] == 3_889_307_648  # its safetensors headers


def test_plan_points_at_a_checkpoints_mtp_layers(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "deepseek_v3", "hidden_size": 7168, "num_hidden_layers": 61,
        "num_attention_heads": 128, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
        "num_nextn_predict_layers": 1, "torch_dtype": "bfloat16", "n_routed_experts": 256,
        "max_position_embeddings": 163840}))
    code = main(["plan", str(tmp_path), "--kv-cache-gib", "100", "--weights-gib", "640",
                 "--max-model-len", "32768"])
    out = capsys.readouterr().out
    assert code == 0
    assert "1 multi-token-prediction layer(s)" in out and "1,152 more KV bytes" in out
    code = main(["plan", str(tmp_path), "--kv-cache-gib", "100", "--weights-gib", "640",
                 "--max-model-len", "32768", "--speculative-method", "mtp",
                 "--num-speculative-tokens", "1", "--json"])
    spec = json.loads(capsys.readouterr().out)["speculative"]
    assert spec["draft_kv_bytes_per_token"] == (512 + 64) * 2  # one MLA latent per token
    assert spec["draft_weights_bytes"] == 0  # in the checkpoint already


def test_plan_prefix_caching_considerations(tmp_path, capsys):
    code = main(["plan", str(MODELS / "llama-3-8b"), "--kv-cache-gib", "64", "--block-size",
                 "16", "--avg-context-len", "2048", "--shared-prefix-len", "1000", "--json"])
    prefix = json.loads(capsys.readouterr().out)["prefix_cache"]
    assert code == 0 and prefix["relevant"] and prefix["cached_tokens_per_request"] == 992
    # The prefix's blocks held once; each sequence holds its own 1,056 tokens.
    assert prefix["max_seqs_at_avg_context"] == (64 * GiB - 992 * 131_072) // (1056 * 131_072)
    main(["plan", str(MODELS / "llama-3-8b"), "--kv-cache-gib", "64", "--no-prefix-caching",
          "--shared-prefix-len", "1000"])
    out = capsys.readouterr().out
    assert "prefix caching is off" in out and "prefix caching  " in out
    main(["plan", str(MODELS / "llama-3-8b"), "--kv-cache-gib", "64"])
    assert "prefix caching" not in capsys.readouterr().out  # nothing to weigh


def test_plan_notes_the_state_of_a_mamba_hybrid(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "nemotron_h", "hidden_size": 4096, "num_hidden_layers": 52,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "hybrid_override_pattern": "M-M-M-M*-" * 5 + "M-M-M-M-M-M-M",
        "torch_dtype": "bfloat16"}))
    plan = make_plan(str(tmp_path), kv_cache_bytes=GiB, weights_bytes=GiB, max_model_len=4096)
    assert plan["prefix_cache"]["recurrent_layers"] == 27 and plan["prefix_cache"]["relevant"]
    assert any("recurrent" in note for note in plan["notes"])


def test_plan_takes_speculation_and_prefix_caching_from_the_daemons_engine():
    from argparse import Namespace

    from exporter.tuning.cli import _speculation_and_prefix

    flags = Namespace(speculative_method=None, num_speculative_tokens=None, draft_model=None,
                      no_prefix_caching=False, shared_prefix_len=None)
    running = {"speculative_method": "ngram", "num_speculative_tokens": "3",
               "enable_prefix_caching": "false"}
    assert _speculation_and_prefix(flags, running) == {
        "speculative_method": "ngram", "num_speculative_tokens": 3, "draft_model_dir": None,
        "enable_prefix_caching": False, "shared_prefix_len": None}
    plain = _speculation_and_prefix(flags, {"speculative_method": "none",
                                            "num_speculative_tokens": "0",
                                            "enable_prefix_caching": "true"})
    assert (plain["speculative_method"], plain["num_speculative_tokens"]) == (None, 0)
    assert plain["enable_prefix_caching"] is True
    flags.num_speculative_tokens, flags.speculative_method = 5, "eagle"
    assert _speculation_and_prefix(flags, running)["num_speculative_tokens"] == 5
