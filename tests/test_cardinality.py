"""Bounded cardinality: whatever vLLM hands the stat logger, no family grows without bound.

The inputs that reach labels are the engine index (capped by daemon.max_engines, folded into
engine="other") and the finish reason (a fixed set plus "other"); the model label is fixed per
process. Fed with vLLM's own statistics classes, no engine needed.
"""

from __future__ import annotations

from collections import defaultdict

from prometheus_client import generate_latest
from vllm.v1.metrics.stats import FinishedRequestStats, IterationStats, SchedulerStats

from exporter.config import load_config
from exporter.runtime import Runtime
from exporter.stats import MAX_REASON_KEYS
from exporter.vllm_compat import finish_reason_name
from helpers import Samples

MAX_ENGINES = 8
DISTINCT_ENGINES = 10_000


def runtime(max_engines: int = MAX_ENGINES) -> Runtime:
    rt = Runtime(load_config(None, {"gpu.enabled": False, "daemon.max_engines": max_engines}),
                 mode="daemon")
    rt.attach_stat_logger("m", [0], finish_reason_name)
    return rt


def step(reason="stop", prompt_tokens=3) -> tuple[SchedulerStats, IterationStats]:
    scheduler = SchedulerStats(num_running_reqs=1, num_waiting_reqs=0, kv_cache_usage=0.1)
    it = IterationStats()
    it.num_generation_tokens = 2
    it.prompt_token_stats.total = prompt_tokens
    it.time_to_first_tokens_iter = [0.05]
    it.inter_token_latencies_iter = [0.01]
    it.finished_requests = [FinishedRequestStats(
        finish_reason=reason, e2e_latency=0.5, num_prompt_tokens=prompt_tokens,
        num_generation_tokens=2, queued_time=0.01, prefill_time=0.02, decode_time=0.1,
        inference_time=0.12, mean_time_per_output_token=0.05)]
    return scheduler, it


def series_by_family(rt: Runtime) -> dict[str, set]:
    """family name -> set of label sets (histogram `le` and sample suffixes collapsed)."""
    out: dict[str, set] = defaultdict(set)
    for family in rt.registry.collect():
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            out[family.name].add(labels)
    return out


def test_ten_thousand_engine_indexes_stay_under_the_cap_and_are_counted():
    rt = runtime()
    try:
        # Reference: exactly one engine beyond the cap.
        for index in range(MAX_ENGINES + 1):
            rt.recorder.record(*step(), engine_idx=index)
        at_cap = {name: len(s) for name, s in series_by_family(rt).items()}

        for index in range(MAX_ENGINES + 1, DISTINCT_ENGINES):
            rt.recorder.record(*step(), engine_idx=index)
        after = series_by_family(rt)

        grown = {name: (at_cap.get(name, 0), len(s)) for name, s in after.items()
                 if len(s) != at_cap.get(name, 0)}
        assert not grown, f"series counts grew past the cap: {grown}"
        engines = {dict(labels)["engine"] for s in after.values() for labels in s
                   if "engine" in dict(labels)}
        assert engines == {str(i) for i in range(MAX_ENGINES)} | {"other"}
        assert len(rt.recorder._engines) == MAX_ENGINES  # overflow indexes are not remembered

        s = Samples(generate_latest(rt.registry).decode())
        overflow = s.get("vllm_exporter_label_overflow_total", label="engine")
        assert overflow == DISTINCT_ENGINES - MAX_ENGINES
        # Nothing is lost: the folded updates land in engine="other".
        assert s.get("vllm_prompt_tokens_total") == 3 * DISTINCT_ENGINES
        assert s.get("vllm_prompt_tokens_total", engine="other") == \
            3 * (DISTINCT_ENGINES - MAX_ENGINES)
        assert s.get("vllm_engine_steps_total", engine="other") == DISTINCT_ENGINES - MAX_ENGINES
        assert s.get("vllm_requests_finished_total", engine="other", finish_reason="stop") == \
            DISTINCT_ENGINES - MAX_ENGINES
    finally:
        rt.stop()


def test_engines_under_the_cap_keep_their_own_label_and_no_overflow():
    rt = runtime(max_engines=4)
    try:
        for index in (0, 1, 2, 3, 0, 3):
            rt.recorder.record(*step(), engine_idx=index)
        s = Samples(generate_latest(rt.registry).decode())
        assert s.get("vllm_exporter_label_overflow_total", label="engine") == 0
        assert s.get("vllm_engine_steps_total", engine="3") == 2
        assert not [labels for labels, _ in s.series("vllm_engine_steps_total")
                    if labels["engine"] == "other"]
        # The idle reset and the capacity gauges reach the "other" children too.
        rt.recorder.record(*step(), engine_idx=99)
        rt.recorder.set_capacity({"blocks": 10, "block_size": 16, "bytes_per_token": 2.0})
        rt.recorder.reset_engine_state()
        s = Samples(generate_latest(rt.registry).decode())
        assert s.get("vllm_kv_cache_capacity_tokens", engine="other") == 160
        assert s.get("vllm_requests_running", engine="other") == 0
    finally:
        rt.stop()


def test_unknown_finish_reasons_fold_into_other_and_stay_bounded():
    rt = runtime()
    try:
        for i in range(2_000):
            rt.recorder.record(*step(reason=f"made-up-{i}"), engine_idx=0)
        rt.recorder.record(*step(reason="length"), engine_idx=0)
        s = Samples(generate_latest(rt.registry).decode())
        reasons = {labels["finish_reason"]
                   for labels, _ in s.series("vllm_requests_finished_total")}
        assert reasons <= {"stop", "length", "abort", "error", "repetition", "other"}
        assert s.get("vllm_requests_finished_total", finish_reason="other") == 2_000
        assert s.get("vllm_requests_finished_total", finish_reason="length") == 1
        assert len(rt.recorder._engines[0].finished) <= MAX_REASON_KEYS
    finally:
        rt.stop()


def test_every_engine_family_is_labelled_only_by_bounded_inputs():
    """The labels of every family come from a closed list: a new free-form label would need a
    cap of its own, and this test makes adding one a conscious decision."""
    bounded = {"model", "engine", "finish_reason", "objective", "result", "path", "code",
               "component", "reason", "label", "version", "vllm_version", "python_version",
               "mode"}
    from exporter.metrics import ENGINE_CONFIG_LABELS, FAMILIES

    for family in FAMILIES:
        extra = set(family.labels) - bounded - set(ENGINE_CONFIG_LABELS)
        assert not extra, f"{family.name}: labels {extra} have no cardinality cap"
