"""Golden exposition of the stat logger: a scripted stream of vLLM's own statistics objects
through `exporter.stats.StatsRecorder` into a front end's shard, rendered by the metrics
process's `ShardCollector`, is compared as text with tests/golden/stats_recorder.prom and
linted by `promtool check metrics`.

After an intended change, regenerate the file and review its diff:
    UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_stats_golden.py
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from vllm.v1.engine import FinishReason
from vllm.v1.metrics.stats import (
    FinishedRequestStats,
    IterationStats,
    PrefixCacheStats,
    SchedulerStats,
)

from exporter.aggregate import ShardCollector, ShardSet
from exporter.config import load_config
from exporter.shard import ShardMetrics, ShardWriter
from exporter.stats import StatsRecorder
from exporter.vllm_compat import finish_reason_name
from testsupport.markers import needs_promtool
from testsupport.prometheus import PROMTOOL

GOLDEN = Path(__file__).parent / "golden" / "stats_recorder.prom"
START = 1_767_225_600.0  # 2026-01-01T00:00:00Z: the scripted wall clock's first step


class SteppingClock:
    """The recorder's wall clock: 50 ms later at each engine step."""

    def __init__(self):
        self.steps = 0

    def __call__(self) -> float:
        self.steps += 1
        return START + (self.steps - 1) * 0.05


def finished(reason: FinishReason, generated: int, e2e: float, tpot: float) -> FinishedRequestStats:
    return FinishedRequestStats(finish_reason=reason, e2e_latency=e2e, num_prompt_tokens=24,
                                num_generation_tokens=generated, queued_time=e2e / 10,
                                prefill_time=e2e / 5, decode_time=e2e / 2,
                                inference_time=e2e * 0.7, mean_time_per_output_token=tpot)


def iteration(prompt_tokens: int = 0, **fields) -> IterationStats:
    stats = IterationStats()
    stats.prompt_token_stats.total = prompt_tokens
    for name, value in fields.items():
        setattr(stats, name, value)
    return stats


def script(recorder: StatsRecorder) -> None:
    """Two engines: prefill with prefix-cache hits and LoRA adapters, decode, a preemption,
    one finished request of each reason, a single-token request (no time per output token),
    a step with iteration statistics only (as a second API server gets them), and a third
    engine index beyond the cap of two (engine="other")."""
    recorder.set_capacity({"blocks": 2048, "block_size": 16, "bytes_per_token": 8192.0})
    recorder.record(
        SchedulerStats(num_running_reqs=2, num_waiting_reqs=3, num_skipped_waiting_reqs=1,
                       kv_cache_usage=0.125,
                       prefix_cache_stats=PrefixCacheStats(requests=2, queries=128, hits=64),
                       running_lora_adapters={"tenant-a": 1, "tenant-b": 1},
                       waiting_lora_adapters={"tenant-a": 1}),
        iteration(prompt_tokens=300, num_generation_tokens=2,
                  time_to_first_tokens_iter=[0.04, 0.31]), engine_idx=0)
    recorder.record(
        SchedulerStats(num_running_reqs=2, num_waiting_reqs=1, kv_cache_usage=0.25,
                       prefix_cache_stats=PrefixCacheStats(requests=1, queries=32, hits=32)),
        iteration(num_generation_tokens=2, num_preempted_reqs=1,
                  inter_token_latencies_iter=[0.012, 0.018]), engine_idx=0)
    recorder.record(
        SchedulerStats(num_running_reqs=1, kv_cache_usage=0.5),
        iteration(prompt_tokens=40, num_generation_tokens=1, time_to_first_tokens_iter=[2.5],
                  finished_requests=[finished(FinishReason.LENGTH, 1, 2.6, 0.0)]),
        engine_idx=1)
    recorder.record(
        SchedulerStats(num_running_reqs=1, num_waiting_reqs=1, kv_cache_usage=0.0625,
                       running_lora_adapters={"tenant-a": 1},
                       waiting_lora_adapters={"tenant-b": 1}),
        iteration(num_generation_tokens=2, inter_token_latencies_iter=[0.02, 0.15],
                  finished_requests=[finished(FinishReason.STOP, 12, 0.9, 0.03),
                                     finished(FinishReason.LENGTH, 64, 3.2, 0.045),
                                     finished(FinishReason.ABORT, 5, 7.5, 0.2),
                                     finished(FinishReason.ERROR, 2, 0.05, 0.01)]),
        engine_idx=0)
    recorder.record(None, iteration(num_generation_tokens=3,
                                    inter_token_latencies_iter=[0.01, 0.011, 0.009]),
                    engine_idx=1)
    recorder.record(SchedulerStats(num_running_reqs=1, kv_cache_usage=0.01),
                    iteration(prompt_tokens=8, num_generation_tokens=1,
                              time_to_first_tokens_iter=[0.08]), engine_idx=7)


def render_scripted(directory: Path) -> str:
    """The shard families' exposition (Prometheus text 0.0.4) after the script."""
    config = load_config(None)
    writer = ShardWriter(directory, "frontend")
    try:
        recorder = StatsRecorder(ShardMetrics(writer, config.buckets()), "m", [0, 1],
                                 finish_reason_name, config.slo.objectives,
                                 wall_clock=SteppingClock(), max_engines=2)
        script(recorder)
        return ShardCollector(ShardSet(directory)).render(False)
    finally:
        writer.close()


def test_the_scripted_stream_renders_the_golden_exposition(tmp_path):
    """Byte for byte: names, help, types, labels, order and value formatting of every shard
    family (regenerate as the module docstring says)."""
    text = render_scripted(tmp_path / "shards")
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), \
        "the stat logger's exposition changed; see this module's docstring to regenerate"


@needs_promtool
def test_promtool_check_metrics_finds_no_problem_in_the_golden_exposition():
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=GOLDEN.read_text(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), \
        result.stdout + result.stderr
