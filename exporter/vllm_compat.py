"""The only module that imports vLLM internals. Shims for vLLM 0.26 .. 0.34.

vLLM moved its server helpers between releases; each name is looked up in the modules that hold
it, newest first (checked against the 0.26.0, 0.32.0, 0.33.0 and 0.34.0 sources):
    0.26: vllm.entrypoints.openai.{api_server,cli_args}, vllm.entrypoints.launcher
    0.32: vllm.entrypoints.launchers.{launcher,app,cli_args,api_server.entry,api_server.app_state}
    0.33, 0.34: as 0.32, but cli_args and cli_env_setup moved to vllm.entrypoints.common.
Stats objects grow fields from release to release; stats.py reads them by attribute, optional
ones with getattr, so the rest of the package never imports vLLM directly.
"""

from __future__ import annotations

import importlib
import sys
import time
from argparse import Namespace
from typing import Any, Callable

import vllm
from vllm.v1.metrics.loggers import AggregateStatLoggerBase, StatLoggerBase  # noqa: F401

from .capacity import kv_bytes_per_token, kv_cache_dtype_bytes
from .engine_settings import ENGINE_SETTINGS

VLLM_VERSION: str = getattr(vllm, "__version__", "unknown")


def _first_attr(name: str, modules: tuple[str, ...]) -> Any:
    """`name` from the first of `modules` that has it (vLLM moves helpers between releases)."""
    errors = []
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            errors.append(f"{module_name}: {exc}")
            continue
        if hasattr(module, name):
            return getattr(module, name)
        errors.append(f"{module_name}: no {name}")
    raise ImportError(f"vLLM {VLLM_VERSION}: cannot find {name} ({'; '.join(errors)})")


_LAUNCHER_MODULES = (
    "vllm.entrypoints.launchers.launcher",       # 0.32 - 0.34
    "vllm.entrypoints.openai.api_server",        # 0.26
)
_ENTRY_MODULES = (
    "vllm.entrypoints.launchers.api_server.entry",  # 0.32 - 0.34
    "vllm.entrypoints.openai.api_server",        # 0.26
)
_CLI_ARGS_MODULES = (
    "vllm.entrypoints.common.cli_args",          # 0.33, 0.34
    "vllm.entrypoints.launchers.cli_args",       # 0.32
    "vllm.entrypoints.openai.cli_args",          # 0.26
)
_ENV_SETUP_MODULES = (
    "vllm.entrypoints.common.startup",           # 0.33, 0.34
    "vllm.entrypoints.serve.utils.api_utils",    # 0.26, 0.32
)


# --- statistics ---------------------------------------------------------------------------

def finish_reason_name(reason: Any) -> str:
    """vLLM's FinishReason is an IntEnum whose str() is the user-facing name."""
    return str(reason)


def engine_config_labels(vllm_config: Any, served_model_name: str) -> dict[str, str]:
    """The tuning configuration the engine actually runs with, as label values: each label of
    engine_settings.ENGINE_SETTINGS read from its path in VllmConfig."""
    labels = {}
    for setting in ENGINE_SETTINGS:
        if setting.info_label and setting.vllm:
            labels[setting.name] = _label_text(_read_path(vllm_config, setting.vllm)) or \
                setting.unset
    labels["model"] = served_model_name
    labels["vllm_version"] = VLLM_VERSION
    return labels


def _read_path(obj: Any, path: str) -> Any:
    """`obj.a.b` for path "a.b"; None where an attribute is missing (older vLLM releases)."""
    for name in path.split("."):
        obj = getattr(obj, name, None)
    return obj


def _label_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).removeprefix("torch.")


def kv_cache_geometry(vllm_config: Any) -> dict[str, float]:
    """Blocks, block size and bytes per token of the engine's KV cache (0 where unknown)."""
    model_config = vllm_config.model_config
    cache_config = vllm_config.cache_config
    blocks = cache_config.num_gpu_blocks or 0
    block_size = cache_config.block_size or 0
    try:
        text_config = getattr(model_config, "hf_text_config", model_config.hf_config)
        layers = int(text_config.num_hidden_layers)
        mla = bool(getattr(model_config, "use_mla", False))
        kv_heads = 1 if mla else int(model_config.get_total_num_kv_heads())
        head_dim = int(model_config.get_head_size())
        element = kv_cache_dtype_bytes(cache_config.cache_dtype, str(model_config.dtype))
        per_token = kv_bytes_per_token(layers, kv_heads, head_dim, element, mla=mla)
    except (AttributeError, TypeError, ValueError):
        per_token = 0
    # vLLM's own group-aware capacity (0.26+), right where blocks x block size is not (hybrid
    # models); per data-parallel engine, where num_gpu_blocks is summed over the engines.
    size_tokens = getattr(cache_config, "kv_cache_size_tokens", None)
    concurrency = getattr(cache_config, "kv_cache_max_concurrency", None)
    return {"blocks": blocks, "block_size": block_size, "bytes_per_token": per_token,
            "capacity_tokens": int(size_tokens) if size_tokens else None,
            "max_concurrency": float(concurrency) if concurrency is not None else None}


def engine_features(vllm_config: Any) -> dict[str, Any]:
    """The statistics the engine's config switches on, for StatsRecorder.expect."""
    speculative = getattr(vllm_config, "speculative_config", None)
    observability = getattr(vllm_config, "observability_config", None)
    kv_transfer = getattr(vllm_config, "kv_transfer_config", None)
    return {
        "num_speculative_tokens": int(getattr(speculative, "num_speculative_tokens", 0) or 0),
        "kv_cache_metrics": bool(getattr(observability, "kv_cache_metrics", False)),
        "mfu_metrics": bool(getattr(observability, "enable_mfu_metrics", False)),
        "kv_connector": kv_transfer is not None,
        # Async KV loads by stage: only on a consumer, and only where vLLM reports them (0.32+).
        "kv_consumer": bool(getattr(kv_transfer, "is_kv_consumer", False))
        and KV_FETCH_STAGES_REPORTED,
        "admission_rejections": ADMISSION_REJECTIONS_REPORTED,
    }


# vLLM calls record_admission_rejection from 0.32 on (its base class gained the method then).
ADMISSION_REJECTIONS_REPORTED: bool = hasattr(AggregateStatLoggerBase,
                                              "record_admission_rejection")
KV_FETCH_STAGES_REPORTED: bool = "num_kv_fetch_reqs_by_stage" in getattr(
    importlib.import_module("vllm.v1.metrics.stats").SchedulerStats, "__dataclass_fields__", {})


def served_model_name(vllm_config: Any) -> str:
    name = vllm_config.model_config.served_model_name
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    return str(name or vllm_config.model_config.model)


# --- the in-process OpenAI server ----------------------------------------------------------

def parse_server_args(argv: list[str]) -> Namespace:
    """vLLM's own server argument parser and validation, on an argv we build from our config."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    make_arg_parser = _first_attr("make_arg_parser", _CLI_ARGS_MODULES)
    validate = _first_attr("validate_parsed_serve_args", _CLI_ARGS_MODULES)
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm-exporter serve"))
    args = parser.parse_args(argv)
    validate(args)
    return args


def cli_env_setup() -> None:
    """What vLLM's CLI does before serving (spawn start method for workers)."""
    _first_attr("cli_env_setup", _ENV_SETUP_MODULES)()


def setup_server(args: Namespace):
    """Bind the API socket (before the engine loads, so a busy port fails fast)."""
    return _first_attr("setup_server", _LAUNCHER_MODULES)(args, reuse_port=False)


class EngineConfigRefused(ValueError):
    """vLLM refused the engine configuration (before any engine process started)."""


def _refusal(exc: Exception) -> str:
    """vLLM's own words, without pydantic's input dump: one line per problem."""
    errors = getattr(exc, "errors", None)
    if callable(errors):  # pydantic's ValidationError (vLLM's config dataclasses)
        try:
            return "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())) or 'config'}: "
                             f"{e['msg']}" for e in errors())
        except Exception:  # a shape of another pydantic version: its first line
            pass
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def build_engine(args: Namespace, stat_loggers: list[Callable]) -> Any:
    """An AsyncLLM from the parsed server args, with our stat logger attached.
    EngineConfigRefused when vLLM refuses the configuration (a setting this platform or model
    cannot run), before any engine process starts."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    engine_args = AsyncEngineArgs.from_cli_args(args)
    try:
        vllm_config = engine_args.create_engine_config(
            usage_context=UsageContext.OPENAI_API_SERVER)
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        raise EngineConfigRefused(_refusal(exc)) from exc
    return AsyncLLM.from_vllm_config(
        vllm_config=vllm_config,
        usage_context=UsageContext.OPENAI_API_SERVER,
        stat_loggers=stat_loggers,
        enable_log_requests=getattr(engine_args, "enable_log_requests", False),
        disable_log_stats=False,
    )


def run_server_processes(args: Namespace) -> None:
    """What `vllm serve` does with these arguments: its default API-server count for the
    data-parallel mode, then its launcher (API-server processes beside the engine processes),
    or one in-process server where that default is 1. Blocks until the server stops."""
    from vllm.entrypoints.cli.serve import ServeSubcommand

    ServeSubcommand.cmd(args)


async def serve(engine: Any, listen_address: str, sock: Any, args: Namespace):
    """vLLM's own FastAPI app on `sock`; returns the server's shutdown awaitable when it stops."""
    build_and_serve = _first_attr("build_and_serve", _ENTRY_MODULES)
    return await build_and_serve(engine, listen_address, sock, args)


def engine_dead(engine: Any) -> bool:
    return bool(getattr(engine, "errored", False))


def unfinished_requests(engine: Any) -> int:
    """Requests the front end holds (AsyncLLM has no such method in 0.26; its processor does)."""
    return int(engine.output_processor.get_num_unfinished_requests())


def unfinished_by_engine(engine: Any) -> tuple[int, dict[int, int]]:
    """(requests this front end holds, {data-parallel rank: its requests in flight there}).

    The data-parallel load-balancing client remembers which rank each request went to
    (`engine_inflight` per rank identity in 0.32+, `reqs_in_flight` per request before);
    a client of a single rank has all of them there.
    """
    total = unfinished_requests(engine)
    client = engine.engine_core
    inflight = getattr(client, "engine_inflight", None)
    if inflight is not None:
        return total, {int.from_bytes(identity, "little"): int(n)
                       for identity, n in list(inflight.items())}
    requests = getattr(client, "reqs_in_flight", None)
    if requests is not None:
        counts: dict[int, int] = {}
        for identity in list(requests.values()):
            rank = int.from_bytes(identity, "little")
            counts[rank] = counts.get(rank, 0) + 1
        return total, counts
    ranks = list(getattr(client, "engine_ranks_managed", None) or [0])
    return total, ({ranks[0]: total} if len(ranks) == 1 else {})


def find_async_llm() -> Any:
    """The AsyncLLM whose constructor is building the calling stat logger, or None.

    vLLM hands a stat logger only its config; the engine object it belongs to is the `self` of
    an `AsyncLLM.__init__` frame further up the stack (its output processor and engine client
    already exist by then).
    """
    from vllm.v1.engine.async_llm import AsyncLLM

    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, AsyncLLM):
            return candidate
        frame = frame.f_back
    return None


def watch_async_llm(engine: Any, frontend: Any,
                    on_aborted: Callable[[int, list[float]], None] | None = None) -> None:
    """Wire a front end to its engine: client aborts, unfinished requests per rank, engine
    death, and a stop told apart from a death. `on_aborted(n, seconds)` replaces the front
    end's abort count where given (seconds: each aborted request's time since arrival)."""
    count_client_aborts(engine, on_aborted or (lambda n, _: frontend.count_client_aborts(n)))
    frontend.watch_engine(lambda: unfinished_by_engine(engine), lambda: engine_dead(engine))
    before_engine_shutdown(engine, frontend.mark_stopping)


def count_client_aborts(engine: Any, on_aborted: Callable[[int, list[float]], None]) -> None:
    """Call `on_aborted(n, seconds)` each time the front end aborts n live requests; `seconds`
    holds each one's time since it arrived (where vLLM tracked its arrival).

    vLLM's output processor drops a request aborted by its client (a closed stream) without
    producing finished-request statistics, so no stat logger ever sees it. The wrapper counts
    the requests that were still live when the abort arrived (its return value), and reads
    their arrival times before vLLM drops their state.
    """
    processor = engine.output_processor
    original = processor.abort_requests

    def abort_requests(request_ids: Any, *args: Any, **kwargs: Any):
        request_ids = list(request_ids)  # may be a one-shot iterable
        arrivals = _arrival_times(processor, request_ids, *args, **kwargs)
        aborted = original(request_ids, *args, **kwargs)
        if aborted:
            now = time.time()
            on_aborted(len(aborted), [now - arrivals[r] for r in aborted if r in arrivals])
        return aborted

    processor.abort_requests = abort_requests


def _arrival_times(processor: Any, request_ids: list, internal: bool = False,
                   *_: Any, **kwargs: Any) -> dict[str, float]:
    """{internal request id: arrival time (wall clock)} of the live requests that
    abort_requests(request_ids, internal) will abort: internal ids name themselves, an external
    id every request made from it (0.26-0.34: OutputProcessor.external_req_ids)."""
    internal = kwargs.get("internal", internal)
    states = getattr(processor, "request_states", None) or {}
    if internal:
        candidates = request_ids
    else:
        external = getattr(processor, "external_req_ids", None) or {}
        candidates = [i for r in request_ids for i in external.get(r, ())] or request_ids
    out = {}
    for request_id in candidates:
        stats = getattr(states.get(request_id), "stats", None)
        arrival = getattr(stats, "arrival_time", None)
        if arrival:
            out[request_id] = arrival
    return out


def before_engine_shutdown(engine: Any, callback: Callable[[], None]) -> None:
    """Call `callback()` when something asks the engine to shut down (a stop, not a crash)."""
    original = engine.shutdown

    def shutdown(*args: Any, **kwargs: Any):
        callback()
        return original(*args, **kwargs)

    engine.shutdown = shutdown
