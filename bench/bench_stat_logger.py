"""Cost of the stat logger per engine step: ours against vLLM's own PrometheusStatLogger.

1. Capture: a real AsyncLLM on the embedded default model serves a mixed workload; a capturing
   logger keeps a deep copy of every (SchedulerStats, IterationStats) pair vLLM hands over.
2. Replay: the same stream goes through our ExporterStatLogger and through vLLM's
   PrometheusStatLogger, in one process, in interleaved rounds; the script prints microseconds
   per record() for each and their ratio (target: ours <= 0.5 x vLLM's).

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python -m bench.bench_stat_logger [--requests 64] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import statistics
import time


def capture(requests: int):
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.loggers import AggregateStatLoggerBase

    from exporter import frontend as frontend_module
    from exporter.config import load_config
    from exporter.default_model import ensure_default_model
    from exporter.runtime import Runtime

    # Our plugin entry point loads into every AsyncLLM: give it a runtime on a free port.
    rt = Runtime(load_config(None, {"metrics.port": 0, "gpu.enabled": False}), mode="daemon")
    frontend_module.install(rt.frontend)
    captured: list = []

    class Capture(AggregateStatLoggerBase):
        def __init__(self, vllm_config, engine_indexes=None):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
            captured.append((copy.deepcopy(scheduler_stats), copy.deepcopy(iteration_stats)))

        def log_engine_initialized(self):
            pass

    args = AsyncEngineArgs(model=str(ensure_default_model()), max_model_len=512,
                           disable_log_stats=False)
    engine = AsyncLLM.from_engine_args(args, stat_loggers=[Capture])

    async def one(i: int):
        params = SamplingParams(max_tokens=(8, 32, 96)[i % 3], ignore_eos=True)
        async for _ in engine.generate(f"bench request {i} " * (1 + i % 5), params, str(i)):
            pass

    async def workload():
        await asyncio.gather(*[one(i) for i in range(requests)])

    asyncio.run(workload())
    vllm_config = engine.vllm_config
    engine.shutdown()
    frontend_module.install(None)
    rt.stop()
    return vllm_config, captured


def replay(logger, stream) -> float:
    """Seconds per record() over the whole stream."""
    gc.collect()
    started = time.perf_counter()
    for scheduler_stats, iteration_stats in stream:
        logger.record(scheduler_stats, iteration_stats, None, 0)
    return (time.perf_counter() - started) / len(stream)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    vllm_config, stream = capture(args.requests)
    with_iteration = sum(1 for _, it in stream if it is not None)
    print(f"captured {len(stream)} records ({with_iteration} with iteration stats, "
          f"{sum(len(it.finished_requests) for _, it in stream if it)} finished requests)")

    from vllm.v1.metrics.loggers import PrometheusStatLogger

    from exporter import frontend as frontend_module
    from exporter.config import load_config
    from exporter.plugin import ExporterStatLogger
    from exporter.runtime import Runtime

    rt = Runtime(load_config(None, {"gpu.enabled": False}), mode="daemon")
    frontend_module.install(rt.frontend)
    ours = ExporterStatLogger(vllm_config, engine_indexes=[0])
    theirs = PrometheusStatLogger(vllm_config, engine_indexes=[0])
    ours_us, theirs_us = [], []
    for _ in range(args.rounds):  # interleaved: both see the same machine noise
        ours_us.append(replay(ours, stream) * 1e6)
        theirs_us.append(replay(theirs, stream) * 1e6)
    o, t = statistics.median(ours_us), statistics.median(theirs_us)
    print(f"{'logger':<28}{'median us/record':>18}{'min':>10}{'max':>10}")
    print(f"{'vllm-exporter':<28}{o:>18.2f}{min(ours_us):>10.2f}{max(ours_us):>10.2f}")
    print(f"{'vLLM PrometheusStatLogger':<28}{t:>18.2f}{min(theirs_us):>10.2f}{max(theirs_us):>10.2f}")
    print(f"ratio ours/vLLM: {o / t:.3f} (target <= 0.5)")


if __name__ == "__main__":
    main()
