"""Bounded cardinality: whatever vLLM hands the stat logger, no family grows without bound.

The inputs that reach labels are the engine index (capped by daemon.max_engines, folded into
engine="other"), the LoRA adapter names (capped by daemon.max_lora_adapters: idle ones give
their slot up, busy ones beyond the cap fold into adapter="other") and the finish reason (a
fixed set plus "other"); the model label is fixed per process. Fed with vLLM's own statistics
classes, no engine needed.
"""

from __future__ import annotations

import time
from collections import defaultdict

from prometheus_client import generate_latest
from vllm.v1.metrics.stats import FinishedRequestStats, IterationStats, SchedulerStats

from exporter.config import load_config
from exporter.runtime import Runtime
from exporter.stats import MAX_REASON_KEYS
from exporter.vllm_compat import finish_reason_name
from testsupport.exposition import Samples

MAX_ENGINES = 8
DISTINCT_ENGINES = 10_000


MAX_ADAPTERS = 8
DISTINCT_ADAPTERS = 10_000
LORA_FAMILIES = ("vllm_lora_requests_running", "vllm_lora_requests_waiting")


def runtime(max_engines: int = MAX_ENGINES) -> Runtime:
    rt = Runtime(load_config(None, {"gpu.enabled": False, "daemon.max_engines": max_engines,
                                    "daemon.max_lora_adapters": MAX_ADAPTERS}),
                 mode="daemon")
    rt.attach_stat_logger("m", [0], finish_reason_name)
    return rt


def step(reason="stop", prompt_tokens=3, running_adapters=None,
         waiting_adapters=None) -> tuple[SchedulerStats, IterationStats]:
    scheduler = SchedulerStats(num_running_reqs=1, num_waiting_reqs=0, kv_cache_usage=0.1,
                               running_lora_adapters=dict(running_adapters or {}),
                               waiting_lora_adapters=dict(waiting_adapters or {}))
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
        rt.check_idle(now=time.time() + 3600)  # the idle watchdog, an hour later
        s = Samples(generate_latest(rt.registry).decode())
        assert s.get("vllm_kv_cache_capacity_tokens", engine="other") == 160
        assert s.get("vllm_requests_running", engine="other") == 0
    finally:
        rt.stop()


def lora_series(rt: Runtime) -> dict[str, dict[str, float]]:
    """family -> {adapter: value} for engine 0."""
    s = Samples(generate_latest(rt.registry).decode())
    return {family: {labels["adapter"]: value for labels, value in s.series(family)}
            for family in LORA_FAMILIES}


def overflow(rt: Runtime, label: str) -> float:
    return Samples(generate_latest(rt.registry).decode()).get(
        "vllm_exporter_label_overflow_total", label=label)


def test_ten_thousand_adapters_one_after_another_reuse_the_idle_slots():
    """Adapters come and go (dynamic LoRA loading): each new one takes the slot of the adapter
    idle for longest, so the newest keep their own series and nothing overflows."""
    rt = runtime()
    try:
        for i in range(DISTINCT_ADAPTERS):
            rt.recorder.record(*step(running_adapters={f"tenant-{i}": 2},
                                     waiting_adapters={f"tenant-{i}": 1}), engine_idx=0)
            if i == MAX_ADAPTERS:
                at_cap = {name: len(v) for name, v in series_by_family(rt).items()}
        after = series_by_family(rt)
        assert {name: len(v) for name, v in after.items()} == at_cap
        series = lora_series(rt)
        newest = {f"tenant-{i}" for i in range(DISTINCT_ADAPTERS - MAX_ADAPTERS,
                                               DISTINCT_ADAPTERS)}
        for family in LORA_FAMILIES:
            assert set(series[family]) == newest
        # Only the adapter of the last step has requests; the others it replaced show 0.
        assert series["vllm_lora_requests_running"][f"tenant-{DISTINCT_ADAPTERS - 1}"] == 2
        assert series["vllm_lora_requests_waiting"][f"tenant-{DISTINCT_ADAPTERS - 1}"] == 1
        assert sum(series["vllm_lora_requests_running"].values()) == 2
        assert overflow(rt, "adapter") == 0
        assert len(rt.recorder.adapters) == MAX_ADAPTERS
    finally:
        rt.stop()


def test_ten_thousand_busy_adapters_fold_into_other_are_counted_and_lose_no_request():
    rt = runtime()
    try:
        running = {f"tenant-{i}": 1 + i % 3 for i in range(DISTINCT_ADAPTERS)}
        waiting = {f"tenant-{i}": 1 for i in range(0, DISTINCT_ADAPTERS, 2)}
        for _ in range(3):
            rt.recorder.record(*step(running_adapters=running, waiting_adapters=waiting),
                               engine_idx=0)
        series = lora_series(rt)
        for family in LORA_FAMILIES:
            assert len(series[family]) == MAX_ADAPTERS + 1, family
            assert "other" in series[family]
        # Every request is in some series: the folded ones add up in adapter="other".
        assert sum(series["vllm_lora_requests_running"].values()) == sum(running.values())
        assert sum(series["vllm_lora_requests_waiting"].values()) == sum(waiting.values())
        # Each folded adapter counts once per step it appears in (running or waiting).
        folded = len(running) - MAX_ADAPTERS + len([n for n in waiting
                                                    if n not in list(running)[:MAX_ADAPTERS]])
        assert overflow(rt, "adapter") == 3 * folded
        assert len(rt.recorder.adapters) == MAX_ADAPTERS

        # The adapters stop having requests: every series shows 0, the cap is unchanged.
        rt.recorder.record(*step(), engine_idx=0)
        series = lora_series(rt)
        assert set(series["vllm_lora_requests_running"].values()) == {0}
        assert set(series["vllm_lora_requests_waiting"].values()) == {0}
        assert len(series["vllm_lora_requests_running"]) == MAX_ADAPTERS + 1
    finally:
        rt.stop()


def test_adapter_series_follow_vllms_lists_and_the_idle_reset():
    rt = runtime()
    try:
        rt.recorder.record(*step(running_adapters={"a": 3, "b": 1}, waiting_adapters={"b": 2}),
                           engine_idx=0)
        series = lora_series(rt)
        assert series["vllm_lora_requests_running"] == {"a": 3, "b": 1}
        assert series["vllm_lora_requests_waiting"] == {"a": 0, "b": 2}
        rt.recorder.record(*step(running_adapters={"b": 2}), engine_idx=0)
        assert lora_series(rt)["vllm_lora_requests_running"] == {"a": 0, "b": 2}
        rt.check_idle(now=time.time() + 3600)  # the idle watchdog, an hour later
        assert lora_series(rt)["vllm_lora_requests_running"] == {"a": 0, "b": 0}
        rt.recorder.record(*step(running_adapters={"c": 1}), engine_idx=0)
        assert lora_series(rt)["vllm_lora_requests_running"] == {"a": 0, "b": 0, "c": 1}
        assert overflow(rt, "adapter") == 0
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
    bounded = {"model", "engine", "adapter", "finish_reason", "objective", "result", "path",
               "code", "component", "reason", "label", "version", "vllm_version",
               "python_version", "mode", "state", "role",
               # fixed sets in stats.py (vLLM's own names, else "other"); position: at most
               # stats.MAX_SPEC_POSITIONS draft positions, then "other"; tier: stats.CACHE_TIERS
               "stage", "sleep_state", "source", "position", "tier"}
    from exporter.metrics import ENGINE_CONFIG_LABELS, FAMILIES

    for family in FAMILIES:
        extra = set(family.labels) - bounded - set(ENGINE_CONFIG_LABELS)
        assert not extra, f"{family.name}: labels {extra} have no cardinality cap"
