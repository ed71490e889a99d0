"""`vllm-exporter plan | bench | tune batch-size | tune gpu-memory | profile`.

exporter/cli.py calls `add_tuning_parsers(sub)` to add the subcommands and `run_tuning(args)`
for them. Exit codes: 0 done, 1 ran but found nothing acceptable (no sweep point meets the
objective, no memory setting survives, the model does not fit, requests failed), 2 bad input
(missing model directory, unreachable daemon, impossible objective...).
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from .errors import UsageError
from .report import emit_json
from .workload import LengthDistribution, Workload, WorkloadSpec

TUNING_COMMANDS = frozenset({"plan", "bench", "tune", "profile"})
DEFAULT_API = "http://127.0.0.1:8000"
DEFAULT_METRICS = "http://127.0.0.1:9410/metrics"
GiB = 2**30

PLAN_EPILOG = """examples:
  vllm-exporter plan /models/llama-3-8b --gpu-memory-gib 80 --max-model-len 8192
  vllm-exporter plan /models/llama-2-7b-awq --gpu-memory-utilization 0.85 --json   # NVML
  vllm-exporter plan ~/.cache/vllm-exporter/default-model-v1 --kv-cache-gib 1 \\
      --daemon http://127.0.0.1:9410/metrics      # compare with a running daemon's engine
"""
BENCH_EPILOG = """examples:
  vllm-exporter bench --concurrency 8 --requests 200 --prompt-len uniform:100:400
  vllm-exporter bench --rate 4 --poisson --duration 60 --shared-prefix 256 --json
"""
TUNE_BATCH_EPILOG = """example:
  vllm-exporter tune batch-size --concurrency 1,4,16,64 \\
      --objective ttft_p95=500ms,itl_p95=50ms --plot batch-size.png
"""
TUNE_MEMORY_EPILOG = """examples:
  vllm-exporter tune gpu-memory --config config.yaml --low 0.80 --high 0.98
  vllm-exporter tune gpu-memory --config config.yaml --knob kv_cache_space_gib \\
      --low 1 --high 16 --json            # the CPU build's VLLM_CPU_KVCACHE_SPACE
"""
PROFILE_EPILOG = """example (the daemon runs with engine.extra_args.profiler_config:
{profiler: torch, torch_profiler_dir: /var/tmp/vllm-profiles, torch_profiler_with_stack: false}):
  vllm-exporter profile --trace-dir /var/tmp/vllm-profiles --seconds 10 \\
      --load-concurrency 8 --out ./traces
"""


def add_tuning_parsers(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    plan = sub.add_parser("plan", help="KV-cache and concurrency plan for a model directory",
                          description="Plan KV-cache capacity, concurrency, max_model_len and "
                          "max_num_seqs from a model directory (no weights loaded).",
                          epilog=PLAN_EPILOG, formatter_class=fmt)
    plan.add_argument("model_dir", help="a local model directory (config.json, *.safetensors)")
    memory = plan.add_mutually_exclusive_group()
    memory.add_argument("--gpu-memory-gib", type=float,
                        help="GPU memory size (default: read from NVML)")
    memory.add_argument("--kv-cache-gib", type=float,
                        help="plan from a KV-cache size instead (the CPU build's "
                             "VLLM_CPU_KVCACHE_SPACE)")
    plan.add_argument("--gpu-index", type=int, default=0, help="GPU to read from NVML (0)")
    plan.add_argument("--gpu-memory-utilization", type=float,
                      help="vLLM's gpu_memory_utilization (0.9; with --daemon: the engine's)")
    plan.add_argument("--overhead-gib", type=float, default=1.0,
                      help="activations, CUDA graphs and context, which vLLM measures at start "
                           "(1.0)")
    plan.add_argument("--weights-gib", type=float,
                      help="override the weights' size (default: the safetensors headers)")
    plan.add_argument("--dtype", help="model dtype (default: config.json's torch_dtype; with "
                      "--daemon: the engine's)")
    plan.add_argument("--kv-cache-dtype", default="auto",
                      help="auto, fp8, ... (auto; with --daemon: the engine's)")
    plan.add_argument("--block-size", type=int,
                      help="KV-cache block size (16; with --daemon: the engine's)")
    plan.add_argument("--max-model-len", type=int,
                      help="context limit (default: max_position_embeddings; with --daemon: "
                           "the engine's)")
    plan.add_argument("--avg-context-len", type=int,
                      help="average prompt+output tokens per sequence (max_model_len / 2)")
    plan.add_argument("--daemon", metavar="METRICS_URL",
                      help="compare with the engine of the daemon exporting here")
    plan.add_argument("--speculative-method",
                      help="plan speculative decoding: ngram, eagle, eagle3, mtp, draft_model "
                           "(with --daemon: the engine's)")
    plan.add_argument("--num-speculative-tokens", type=int,
                      help="draft tokens per step (with --daemon: the engine's)")
    plan.add_argument("--draft-model", metavar="DIR",
                      help="the draft model or EAGLE head directory, to size its KV and weights")
    plan.add_argument("--no-prefix-caching", action="store_true",
                      help="plan without prefix caching (vLLM's default is on; with --daemon: "
                           "the engine's)")
    plan.add_argument("--shared-prefix-len", type=int,
                      help="prompt tokens that requests share (a system prompt): what prefix "
                           "caching saves")
    _add_output_flags(plan, progress=False)
    plan.set_defaults(tuning_handler=_run_plan)

    bench = sub.add_parser("bench", help="generate load and report client and daemon latency",
                           description="A load generator: streams completions at a fixed "
                           "concurrency or arrival rate, reports client-side TTFT, inter-token "
                           "and end-to-end latency and throughput, and the daemon's view of "
                           "the same period.", epilog=BENCH_EPILOG, formatter_class=fmt)
    _add_daemon_flags(bench)
    arrival = bench.add_mutually_exclusive_group(required=True)
    arrival.add_argument("--concurrency", type=int, help="requests kept in flight")
    arrival.add_argument("--rate", type=float, help="requests per second (open loop)")
    bench.add_argument("--poisson", action="store_true",
                       help="with --rate: exponential gaps instead of even spacing")
    end = bench.add_mutually_exclusive_group(required=True)
    end.add_argument("--requests", type=int, help="send this many requests")
    end.add_argument("--duration", type=float, help="send for this many seconds")
    _add_workload_flags(bench)
    _add_output_flags(bench)
    bench.set_defaults(tuning_handler=_run_bench)

    tune = sub.add_parser("tune", help="tune batch size or memory against a real engine",
                          epilog="examples:\n" + TUNE_BATCH_EPILOG.split("\n", 1)[1]
                          + TUNE_MEMORY_EPILOG.split("\n", 1)[1], formatter_class=fmt)
    tune_sub = tune.add_subparsers(dest="tune_command", required=True)
    batch = tune_sub.add_parser("batch-size", help="sweep concurrency against a latency "
                                "objective", description="Sweep client concurrency against a "
                                "running daemon; choose the highest-throughput point that meets "
                                "the latency objective.", epilog=TUNE_BATCH_EPILOG,
                                formatter_class=fmt)
    _add_daemon_flags(batch)
    batch.add_argument("--concurrency", default="1,2,4,8,16",
                       help="comma-separated concurrency levels (1,2,4,8,16)")
    batch.add_argument("--objective", required=True,
                       help="latency bounds, e.g. ttft_p95=0.5,itl_p95=50ms "
                            "(ttft|itl|e2e _ p50|p95|p99)")
    batch.add_argument("--objective-source", choices=["client", "daemon"], default="client",
                       help="judge client-side latencies or the daemon's histograms (client)")
    batch.add_argument("--rounds", type=int, default=4,
                       help="requests per point = rounds x concurrency (4)")
    batch.add_argument("--min-requests", type=int, default=8, help="at least this many (8)")
    batch.add_argument("--warmup", type=int, default=2, help="unmeasured requests first (2)")
    batch.add_argument("--plot", default="tune-batch-size.png",
                       help="PNG to write (tune-batch-size.png; '' for none; needs matplotlib)")
    _add_workload_flags(batch)
    _add_output_flags(batch)
    batch.set_defaults(tuning_handler=_run_tune_batch)

    mem = tune_sub.add_parser("gpu-memory", help="find the highest memory setting that "
                              "survives", description="Bisect a memory knob: each candidate "
                              "starts an engine in a child process and is verified under load.",
                              epilog=TUNE_MEMORY_EPILOG, formatter_class=fmt)
    mem.add_argument("--config", metavar="FILE",
                     help="the daemon config to start candidates from (ports are replaced)")
    mem.add_argument("--knob", choices=["gpu_memory_utilization", "kv_cache_space_gib"],
                     default="gpu_memory_utilization", help="what to search")
    mem.add_argument("--low", type=float, help="lowest value (0.5, or 1 GiB)")
    mem.add_argument("--high", type=float, help="highest value (0.98, or 16 GiB)")
    mem.add_argument("--tolerance", type=float,
                     help="stop when the interval is this narrow (0.02, or 1 GiB)")
    mem.add_argument("--max-starts", type=int, default=8, help="engine starts at most (8)")
    mem.add_argument("--start-timeout", type=float, default=600.0,
                     help="seconds a candidate may take to become ready (600)")
    mem.add_argument("--verify-requests", type=int, default=16, help="requests per check (16)")
    mem.add_argument("--verify-concurrency", type=int, default=8,
                     help="concurrency of the check (8)")
    mem.add_argument("--log-dir", help="keep each candidate's log here")
    _add_workload_flags(mem)
    _add_output_flags(mem)
    mem.set_defaults(tuning_handler=_run_tune_memory)

    profile = sub.add_parser("profile", help="capture a PyTorch profiler trace of the engine",
                             description="Capture a PyTorch profiler trace of the running "
                             "engine for N seconds through vLLM's profiling hooks (no restart) "
                             "and save it as Chrome trace JSON.", epilog=PROFILE_EPILOG,
                             formatter_class=fmt)
    profile.add_argument("--daemon-api", default=DEFAULT_API,
                         help=f"the daemon's API URL ({DEFAULT_API})")
    profile.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"),
                         help="the API's key, if any (env VLLM_API_KEY)")
    profile.add_argument("--token", default=os.environ.get("VLLM_EXPORTER_PROFILE_TOKEN"),
                         help="bearer token for the profiling routes "
                              "(env VLLM_EXPORTER_PROFILE_TOKEN)")
    profile.add_argument("--trace-dir", required=True,
                         help="the daemon's torch_profiler_dir (must be on this host)")
    profile.add_argument("--seconds", type=float, default=10.0, help="how long (10)")
    profile.add_argument("--max-steps", type=int, default=200,
                         help="engine steps recorded at most, 0 for no limit (200)")
    profile.add_argument("--load-concurrency", type=int, default=0,
                         help="drive this much synthetic load while profiling (0: none)")
    profile.add_argument("--out", default=".", help="directory for the trace files (.)")
    _add_workload_flags(profile)
    _add_output_flags(profile)
    profile.set_defaults(tuning_handler=_run_profile)


def _add_daemon_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--daemon-api", default=DEFAULT_API, help=f"API URL ({DEFAULT_API})")
    p.add_argument("--daemon-metrics", default=DEFAULT_METRICS,
                   help=f"metrics URL ({DEFAULT_METRICS}); 'none' to skip the daemon's view")
    p.add_argument("--model", help="served model name (default: the API's first model)")
    p.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"),
                   help="the API's key, if any (env VLLM_API_KEY)")


def _add_workload_flags(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("synthetic workload (prompts are token ids; seeded)")
    w.add_argument("--prompt-len", default="uniform:64:256",
                   help="fixed:N | uniform:LO:HI | normal:MEAN:SD tokens (uniform:64:256)")
    w.add_argument("--output-len", default="fixed:64", help="max_tokens, same forms (fixed:64)")
    w.add_argument("--shared-prefix", type=int, default=0,
                   help="tokens every prompt shares (exercises prefix caching) (0)")
    w.add_argument("--seed", type=int, default=0, help="workload and arrival seed (0)")
    w.add_argument("--token-ids", default="16:500",
                   help="prompt token ids are drawn from LOW:HIGH (16:500)")


def _add_output_flags(p: argparse.ArgumentParser, progress: bool = True) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    if progress:
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="one-line progress on stderr (default: when stderr is a terminal)")


def _workload(args) -> Workload:
    low, sep, high = args.token_ids.partition(":")
    try:
        token_low, token_high = int(low), int(high)
    except ValueError:
        raise UsageError(f"--token-ids {args.token_ids!r}: expected LOW:HIGH") from None
    return Workload(WorkloadSpec(
        prompt_len=LengthDistribution.parse(args.prompt_len, "--prompt-len"),
        output_len=LengthDistribution.parse(args.output_len, "--output-len"),
        shared_prefix_len=args.shared_prefix, seed=args.seed,
        token_id_low=token_low, token_id_high=token_high))


def _progress(args) -> bool:
    return sys.stderr.isatty() if args.progress is None else args.progress


def _metrics_url(text: str | None) -> str | None:
    if not text or text.lower() == "none":
        return None
    return text if text.rstrip("/").endswith("/metrics") else text.rstrip("/") + "/metrics"


def run_tuning(args) -> int:
    try:
        return args.tuning_handler(args)
    except UsageError as exc:
        name = args.command + (f" {args.tune_command}" if args.command == "tune" else "")
        print(f"vllm-exporter {name}: {exc}", file=sys.stderr)
        return 2


def _run_plan(args) -> int:
    from .plan import compare, daemon_engine, format_plan, gpu_memory_from_nvml, make_plan

    for flag in ("gpu_memory_gib", "kv_cache_gib", "weights_gib"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    if args.overhead_gib < 0:
        raise UsageError(f"--overhead-gib must be >= 0, got {args.overhead_gib}")
    engine = daemon_engine(_metrics_url(args.daemon)) if args.daemon else None
    # With --daemon, what the flags leave open is taken from the engine: like for like.
    running = engine["config"] if engine else {}
    block_size = args.block_size
    if block_size is None:
        block_size = int(engine["block_size"]) if engine and engine["block_size"] else 16
    kv_cache_dtype = (args.kv_cache_dtype if args.kv_cache_dtype != "auto"
                      else running.get("kv_cache_dtype") or "auto")
    dtype = args.dtype or running.get("dtype") or None
    max_model_len = args.max_model_len or _int_or_none(running.get("max_model_len"))
    utilization = args.gpu_memory_utilization
    if utilization is None:
        utilization = _float_or_none(running.get("gpu_memory_utilization")) or 0.9
    gpu_memory = None
    if args.kv_cache_gib is None:
        gpu_memory = (int(args.gpu_memory_gib * GiB) if args.gpu_memory_gib is not None
                      else gpu_memory_from_nvml(args.gpu_index))
    plan = make_plan(
        args.model_dir, gpu_memory_bytes=gpu_memory,
        kv_cache_bytes=int(args.kv_cache_gib * GiB) if args.kv_cache_gib else None,
        gpu_memory_utilization=utilization,
        overhead_bytes=int(args.overhead_gib * GiB),
        weights_bytes=int(args.weights_gib * GiB) if args.weights_gib else None,
        dtype=dtype, kv_cache_dtype=kv_cache_dtype, block_size=block_size,
        max_model_len=max_model_len, avg_context_len=args.avg_context_len,
        **_speculation_and_prefix(args, running))
    if engine is not None:
        plan["daemon"] = compare(plan, engine)
    if args.json:
        emit_json(plan)
    else:
        print(format_plan(plan))
    return 0 if plan["fits"] else 1


def _speculation_and_prefix(args, running: dict) -> dict:
    """make_plan's speculative-decoding and prefix-cache arguments: the flags, else what the
    daemon's engine runs with (its vllm_engine_config_info labels)."""
    method = args.speculative_method or (running.get("speculative_method") or None)
    if method == "none":
        method = None
    tokens = args.num_speculative_tokens
    if tokens is None:
        tokens = _int_or_none(running.get("num_speculative_tokens")) or 0
    if tokens < 0 or (args.shared_prefix_len is not None and args.shared_prefix_len < 0):
        raise UsageError("--num-speculative-tokens and --shared-prefix-len must be >= 0")
    prefix = not args.no_prefix_caching and running.get("enable_prefix_caching") != "false"
    return {"speculative_method": method, "num_speculative_tokens": tokens,
            "draft_model_dir": args.draft_model, "enable_prefix_caching": prefix,
            "shared_prefix_len": args.shared_prefix_len}


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None


def _float_or_none(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _run_bench(args) -> int:
    from .bench import format_bench, run_bench
    from .loadgen import LoadSpec

    workload = _workload(args)
    if args.poisson and args.rate is None:
        raise UsageError("--poisson needs --rate")
    load = LoadSpec(concurrency=args.concurrency, rate=args.rate, poisson=args.poisson,
                    requests=args.requests, duration=args.duration, seed=args.seed)
    report = run_bench(args.daemon_api, _metrics_url(args.daemon_metrics), workload, load,
                       model=args.model, api_key=args.api_key, progress=_progress(args))
    if args.json:
        emit_json(report)
    else:
        print(format_bench(report))
    return 0 if report["client"]["requests_failed"] == 0 else 1


def _run_tune_batch(args) -> int:
    from .objective import parse_objectives
    from .plot import plot_sweep
    from .sweep import format_sweep, parse_concurrency_list, run_sweep

    objectives = parse_objectives(args.objective)
    concurrencies = parse_concurrency_list(args.concurrency)
    if args.plot:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:  # before the sweep, not after
            raise UsageError("--plot needs matplotlib (pip install matplotlib); "
                             "or pass --plot '' for no plot")
    metrics_url = _metrics_url(args.daemon_metrics)
    if metrics_url is None:
        raise UsageError("tune batch-size needs --daemon-metrics (the daemon's view of each "
                         "point)")
    workload = _workload(args)
    sweep = run_sweep(args.daemon_api, metrics_url, workload, concurrencies, objectives,
                      source=args.objective_source, rounds=args.rounds,
                      min_requests=args.min_requests, warmup=args.warmup, model=args.model,
                      api_key=args.api_key, progress=_progress(args))
    if args.plot:
        plot_sweep(sweep, args.plot)
        sweep["plot"] = args.plot
    if args.json:
        emit_json(sweep)
    else:
        print(format_sweep(sweep))
        if args.plot:
            print(f"plot: {args.plot}")
    return 0 if sweep["chosen_concurrency"] is not None else 1


def _run_tune_memory(args) -> int:
    from pathlib import Path

    from .gpu_memory import KNOBS, SearchSettings, format_search, search

    knob = KNOBS[args.knob]
    defaults = {"gpu_memory_utilization": (0.5, 0.98), "kv_cache_space_gib": (1, 16)}[args.knob]
    base = {}
    if args.config:
        try:
            base = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"--config {args.config}: {exc}") from None
        if not isinstance(base, dict):
            raise UsageError(f"--config {args.config}: the top level must be a mapping")
    settings = SearchSettings(
        knob=knob, low=args.low if args.low is not None else defaults[0],
        high=args.high if args.high is not None else defaults[1],
        tolerance=args.tolerance if args.tolerance is not None else knob.default_tolerance,
        max_starts=args.max_starts, base_config=base, start_timeout=args.start_timeout,
        verify_requests=args.verify_requests, verify_concurrency=args.verify_concurrency,
        log_dir=Path(args.log_dir) if args.log_dir else None, progress=_progress(args))
    _check_base_config(args.config, base)
    result = search(settings, _workload(args))
    if args.json:
        emit_json(result)
    else:
        print(format_search(result))
    return 0 if result["best"] is not None else 1


def _check_base_config(path: str | None, base: dict) -> None:
    """Validate the base config as `serve` would, before any engine starts."""
    import tempfile

    from ..config import ConfigError, load_config

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(base, f)
        f.flush()
        try:
            load_config(f.name)
        except ConfigError as exc:
            raise UsageError(f"--config {path}: {exc.field_path}: {exc.problem}") from None


def _run_profile(args) -> int:
    from .profile import run_profile

    result = run_profile(args.daemon_api, args.trace_dir, args.out, args.seconds,
                         token=args.token, api_key=args.api_key, max_steps=args.max_steps,
                         load_concurrency=args.load_concurrency, workload=_workload(args),
                         progress=_progress(args))
    if result["guard"] == "open":
        print("warning: the profiling routes answer without a token: anyone who reaches the "
              "API port can start a profile (see docs/tuning.md)", file=sys.stderr)
    if args.json:
        emit_json(result)
    else:
        for trace in result["traces"]:
            print(f"{trace['path']}: {trace['events']:,} events")
    return 0
