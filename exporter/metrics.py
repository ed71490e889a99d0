"""Every engine and daemon metric family: name, type, help, labels, buckets. The single source.

`FAMILIES` lists each family as a `FamilySpec`. Families the vLLM front ends produce live in
per-process shards (shard.py) that the metrics process merges (aggregate.py); the metrics
process's own families are prometheus-client objects that `EngineMetrics` creates in our own
`CollectorRegistry` (vLLM rewrites the default registry).
docs/metrics.md is generated from the specs (`vllm-exporter docs metrics`), and the tests check
that dashboards, rules and docs name only families defined here or in `gpu.GPU_FAMILIES`.

Names follow the Prometheus conventions: base units in the name, `_total` on counters (the
spec's name is the name users query), `_info` for identity, no colons.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.utils import floatToGoString

ENGINE_LABELS = ("model", "engine")
# The values of vllm_engine_state's `state` label, and how severe each is when processes that
# share an engine report different ones (the most severe wins: aggregate.py).
ENGINE_STATES = ("starting", "serving", "stopping", "dead")
STATE_SEVERITY = {"serving": 0, "starting": 1, "stopping": 2, "dead": 3}


@dataclass(frozen=True)
class FamilySpec:
    """One metric family as users see it on /metrics."""

    name: str
    kind: str  # counter | gauge | histogram | info
    help: str
    labels: tuple[str, ...] = ENGINE_LABELS
    source: str = ""  # where the value comes from (vLLM field, NVML call, the daemon itself)
    buckets_key: str | None = None  # for histograms: the key under `histogram_buckets` in config
    # "shard": written by the processes that produce it (vLLM front ends, the daemon) into their
    # own shard and aggregated by the metrics process (shard.py, aggregate.py); "server": owned
    # by the metrics process itself (prometheus-client objects in its registry); "collector":
    # computed by a collector of the metrics process at each scrape.
    where: str = "shard"
    # How the metrics process merges a shard family over processes (docs/topologies.md):
    # sum (counters, histograms), sum_live (gauges of processes still running), latest (engine
    # state gauges: from the process that received that engine rank's newest scheduler stats),
    # max (per-engine constants and timestamps), state (the engine's lifecycle state).
    aggregate: str = ""

    @property
    def merge(self) -> str:
        if self.aggregate:
            return self.aggregate
        return "sum" if self.kind in ("counter", "histogram") else "max"

    @property
    def client_name(self) -> str:
        """The name prometheus-client takes (it appends `_total` to counters itself)."""
        if self.kind == "counter" and self.name.endswith("_total"):
            return self.name[: -len("_total")]
        if self.kind == "info" and self.name.endswith("_info"):
            return self.name[: -len("_info")]
        return self.name


# Bucket defaults. Latencies span sub-millisecond inter-token gaps to hour-long requests, so the
# lists are dense below 100 ms and sparse above a minute.
TOKEN_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 80.0,
)
FIRST_TOKEN_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
REQUEST_DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0,
    60.0, 90.0, 120.0, 180.0, 240.0, 300.0, 480.0, 600.0, 900.0, 1200.0, 1800.0, 3600.0,
)
TOKEN_COUNT_BUCKETS = tuple(
    float(m * 10**e) for e in range(7) for m in (1, 2, 5) if m * 10**e <= 1_000_000
)

DEFAULT_BUCKETS: dict[str, tuple[float, ...]] = {
    "time_to_first_token": FIRST_TOKEN_BUCKETS,
    "inter_token_latency": TOKEN_LATENCY_BUCKETS,
    "time_per_output_token": TOKEN_LATENCY_BUCKETS,
    "request_duration": REQUEST_DURATION_BUCKETS,
    "request_tokens": TOKEN_COUNT_BUCKETS,
}

ENGINE_CONFIG_LABELS = (
    "model", "served_model_name", "vllm_version", "quantization", "dtype", "kv_cache_dtype",
    "gpu_memory_utilization", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
    "block_size", "enable_prefix_caching", "enable_chunked_prefill", "tensor_parallel_size",
    "pipeline_parallel_size", "data_parallel_size", "seed", "device",
)

FAMILIES: tuple[FamilySpec, ...] = (
    # --- engine state, one update per engine step -------------------------------------------
    FamilySpec("vllm_requests_running", "gauge",
               "Requests in the engine's running batch.",
               aggregate="latest",
               source="SchedulerStats.num_running_reqs (0 when idle, see docs/metrics-guide.md)"),
    FamilySpec("vllm_requests_waiting", "gauge",
               "Requests waiting to be scheduled, deferred ones included.",
               aggregate="latest",
               source="SchedulerStats.num_waiting_reqs + num_skipped_waiting_reqs"),
    FamilySpec("vllm_lora_requests_running", "gauge",
               "Running requests per LoRA adapter (only adapters with requests are listed by "
               "vLLM; an adapter that has none shows 0). Beyond daemon.max_lora_adapters "
               "names, adapters fold into adapter=\"other\".",
               labels=ENGINE_LABELS + ("adapter",),
               aggregate="latest", source="SchedulerStats.running_lora_adapters"),
    FamilySpec("vllm_lora_requests_waiting", "gauge",
               "Waiting requests per LoRA adapter, as vLLM counts them: only requests the "
               "engine has reported on (preempted ones); queued requests not yet scheduled "
               "are in vllm_requests_waiting only.",
               labels=ENGINE_LABELS + ("adapter",),
               aggregate="latest", source="SchedulerStats.waiting_lora_adapters"),
    FamilySpec("vllm_kv_cache_usage_ratio", "gauge",
               "Fraction of the KV-cache blocks in use by requests (0-1).",
               aggregate="latest", source="SchedulerStats.kv_cache_usage"),
    FamilySpec("vllm_prompt_tokens_total", "counter",
               "Prompt tokens processed (prefilled), cached tokens included.",
               source="IterationStats.num_prompt_tokens"),
    FamilySpec("vllm_generation_tokens_total", "counter",
               "Tokens generated.",
               source="IterationStats.num_generation_tokens"),
    FamilySpec("vllm_prefix_cache_queries_total", "counter",
               "Prompt tokens looked up in the prefix cache.",
               source="SchedulerStats.prefix_cache_stats.queries"),
    FamilySpec("vllm_prefix_cache_hits_total", "counter",
               "Prompt tokens found in the prefix cache.",
               source="SchedulerStats.prefix_cache_stats.hits"),
    FamilySpec("vllm_preemptions_total", "counter",
               "Requests preempted by the scheduler (KV-cache pressure); each is recomputed.",
               source="IterationStats.num_preempted_reqs"),
    FamilySpec("vllm_requests_finished_total", "counter",
               "Requests the engine finished, by finish reason (stop, length, abort, error, "
               "repetition).",
               labels=ENGINE_LABELS + ("finish_reason",),
               source="IterationStats.finished_requests[].finish_reason"),
    FamilySpec("vllm_requests_aborted_total", "counter",
               "Requests aborted at the API front end before they finished (client disconnects, "
               "cancelled streams), summed over every API-server process.",
               labels=("model",),
               source="the daemon, on vLLM's front-end abort path"),
    FamilySpec("vllm_engine_steps_total", "counter",
               "Engine steps whose scheduler statistics reached a front end (vLLM sends each "
               "step's scheduler statistics to exactly one API-server process).",
               source="each StatLogger.record() call that carries SchedulerStats"),
    FamilySpec("vllm_engine_last_step_timestamp_seconds", "gauge",
               "Unix time of the last engine step whose scheduler statistics a front end saw.",
               source="the time of each StatLogger.record() call that carries SchedulerStats"),
    # --- per-request latency and length histograms ------------------------------------------
    FamilySpec("vllm_time_to_first_token_seconds", "histogram",
               "Time from request arrival to its first generated token.",
               source="IterationStats.time_to_first_tokens_iter",
               buckets_key="time_to_first_token"),
    FamilySpec("vllm_inter_token_latency_seconds", "histogram",
               "Time between two consecutive output tokens of a request.",
               source="IterationStats.inter_token_latencies_iter",
               buckets_key="inter_token_latency"),
    FamilySpec("vllm_time_per_output_token_seconds", "histogram",
               "Per finished request: decode time divided by output tokens after the first.",
               source="FinishedRequestStats.mean_time_per_output_token",
               buckets_key="time_per_output_token"),
    FamilySpec("vllm_e2e_request_latency_seconds", "histogram",
               "Time from request arrival to its last token (finished requests).",
               source="FinishedRequestStats.e2e_latency",
               buckets_key="request_duration"),
    FamilySpec("vllm_request_queue_time_seconds", "histogram",
               "Time a finished request waited in the queue before first scheduled.",
               source="FinishedRequestStats.queued_time",
               buckets_key="request_duration"),
    FamilySpec("vllm_request_prefill_time_seconds", "histogram",
               "Time from first scheduled to first token (finished requests).",
               source="FinishedRequestStats.prefill_time",
               buckets_key="request_duration"),
    FamilySpec("vllm_request_decode_time_seconds", "histogram",
               "Time from first token to last token (finished requests).",
               source="FinishedRequestStats.decode_time",
               buckets_key="request_duration"),
    FamilySpec("vllm_request_prompt_tokens", "histogram",
               "Prompt length of finished requests, in tokens.",
               source="FinishedRequestStats.num_prompt_tokens",
               buckets_key="request_tokens"),
    FamilySpec("vllm_request_generation_tokens", "histogram",
               "Generated length of finished requests, in tokens.",
               source="FinishedRequestStats.num_generation_tokens",
               buckets_key="request_tokens"),
    FamilySpec("vllm_slo_requests_total", "counter",
               "Requests that met (result=good) or missed (result=bad) each configured latency "
               "objective, judged per request against the exact threshold.",
               labels=ENGINE_LABELS + ("objective", "result"),
               source="the stat logger, per request, against config slo.objectives"),
    # --- configuration and capacity, set once the engine is initialised ---------------------
    FamilySpec("vllm_engine_config_info", "info",
               "The engine's tuning configuration as labels (value 1).",
               labels=ENGINE_CONFIG_LABELS,
               source="VllmConfig (model, cache, scheduler, parallel configs)"),
    FamilySpec("vllm_kv_cache_blocks", "gauge",
               "KV-cache blocks the engine allocated (per engine, per rank).",
               source="CacheConfig.num_gpu_blocks"),
    FamilySpec("vllm_kv_cache_block_size_tokens", "gauge",
               "Tokens per KV-cache block.",
               source="CacheConfig.block_size"),
    FamilySpec("vllm_kv_cache_capacity_tokens", "gauge",
               "Tokens the KV cache holds: blocks x block size.",
               source="CacheConfig.num_gpu_blocks x block_size"),
    FamilySpec("vllm_kv_cache_bytes_per_token", "gauge",
               "KV-cache bytes one token costs across the whole model: 2 x layers x KV heads x "
               "head dim x KV dtype bytes (grouped-query attention and KV dtype accounted; MLA "
               "stores one latent vector instead of K and V).",
               source="ModelConfig (layers, KV heads, head size), CacheConfig.cache_dtype"),
    FamilySpec("vllm_kv_cache_capacity_bytes", "gauge",
               "KV-cache bytes across the model: capacity tokens x bytes per token.",
               source="derived"),
    # --- the daemon's own health ------------------------------------------------------------
    FamilySpec("vllm_exporter_build_info", "info",
               "The exporter's version and the versions it runs with (value 1).",
               labels=("version", "vllm_version", "python_version", "mode"),
               where="server", source="the daemon"),
    FamilySpec("vllm_engine_up", "gauge",
               "1 while the engine serves, 0 while it starts, after it died, or at shutdown.",
               labels=("model",), aggregate="state", source="the daemon's engine health check"),
    FamilySpec("vllm_engine_state", "gauge",
               "1 for the engine's current state, 0 for the others: starting, serving, "
               "stopping (SIGTERM drain) or dead (the engine process died; the daemon exits "
               "daemon.exit_delay_seconds later).",
               labels=("model", "state"), aggregate="state",
               source="the daemon's engine health check"),
    FamilySpec("vllm_engine_requests_unfinished", "gauge",
               "Requests sent to this engine rank that have not finished, summed over every "
               "API-server process (what the stall rule asks: does this rank have work?).",
               aggregate="sum_live",
               source="AsyncLLM's engine client: in-flight requests per data-parallel rank"),
    FamilySpec("vllm_frontend_requests_unfinished", "gauge",
               "Requests the API front ends hold that have not finished, summed over every "
               "API-server process.",
               labels=("model",), aggregate="sum_live",
               source="AsyncLLM.get_num_unfinished_requests()"),
    FamilySpec("vllm_exporter_stat_logger_records_total", "counter",
               "Calls of our stat logger's record() (the hot path).",
               labels=(), source="the daemon"),
    FamilySpec("vllm_exporter_stat_logger_seconds_total", "counter",
               "Time spent inside our stat logger's record(), on vLLM's event loop.",
               labels=(), source="the daemon"),
    FamilySpec("vllm_exporter_idle_resets_total", "counter",
               "Times the engine-state gauges were reset to 0 because the engine went idle "
               "(no steps and no unfinished requests).",
               labels=(), source="the daemon's idle watchdog"),
    FamilySpec("vllm_exporter_errors_total", "counter",
               "Errors caught inside the exporter, by component; the component keeps running.",
               labels=("component",), source="the daemon"),
    FamilySpec("vllm_exporter_scrape_duration_seconds", "histogram",
               "Time to render one /metrics response.",
               labels=(), where="server", source="the metrics server",
               buckets_key=None),
    FamilySpec("vllm_exporter_scrapes_total", "counter",
               "Requests to the metrics port, by path and HTTP status code.",
               labels=("path", "code"), where="server", source="the metrics server"),
    FamilySpec("vllm_exporter_scrapes_rejected_total", "counter",
               "Requests or connections the metrics port refused to protect itself, by reason "
               "(concurrency: 503 beyond metrics.max_concurrent_requests; connections: closed "
               "beyond metrics.max_connections; too_large: request line or headers too long).",
               labels=("reason",), where="server", source="the metrics server"),
    FamilySpec("vllm_exporter_config_reloads_total", "counter",
               "Reloads of the metrics port's web config file (SIGHUP), by result; on failure "
               "the previous configuration stays active.",
               labels=("result",), where="server", source="the daemon's SIGHUP handler"),
    FamilySpec("vllm_exporter_processes", "gauge",
               "Processes that write metrics for this server, by role (frontend: a vLLM "
               "API-server process; daemon: the daemon's own process; metrics: the metrics "
               "process) and state (live, or exited: its counters still count in every total).",
               labels=("role", "state"), where="collector",
               source="the metrics process, from the shards it reads, at each scrape"),
    FamilySpec("vllm_exporter_label_overflow_total", "counter",
               "Updates whose label value was beyond its cap and was folded into \"other\" "
               "(or, for gpu, left out), by label: engine (beyond daemon.max_engines engine "
               "indexes), adapter (beyond daemon.max_lora_adapters LoRA adapters active at "
               "once), gpu (beyond gpu.max_devices GPUs, counted per NVML start).",
               labels=("label",), source="the stat logger"),
)

ERROR_COMPONENTS = ("stat_logger", "idle_watchdog", "engine_health", "metrics_server", "gpu",
                    "alerts")

SCRAPE_DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)


def spec(name: str) -> FamilySpec:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(name)


@dataclass
class EngineMetrics:
    """The prometheus-client objects for the metrics process's own families ("server" in
    FAMILIES), in one registry. The families front ends write live in shards (shard.py).

    Attribute names are the family names without the `vllm_` prefix and the counter `_total`
    suffix (e.g. `requests_running`, `prompt_tokens`), so call sites read like the docs.
    """

    registry: CollectorRegistry
    buckets: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(DEFAULT_BUCKETS))

    def __post_init__(self) -> None:
        for family in FAMILIES:
            if family.where == "server":
                setattr(self, attr_name(family), self._create(family))

    def _create(self, family: FamilySpec):
        kwargs = dict(name=family.client_name, documentation=family.help,
                      labelnames=family.labels, registry=self.registry)
        if family.kind == "counter":
            return Counter(**kwargs)
        if family.kind in ("gauge", "info"):
            # Info families are gauges fixed at 1: prometheus-client's Info type cannot be
            # re-labelled (the engine's config is known only once the engine is up).
            if family.kind == "info":
                kwargs["name"] = family.name
            return Gauge(**kwargs)
        if family.kind == "histogram":
            return Histogram(buckets=SCRAPE_DURATION_BUCKETS, **kwargs)
        raise ValueError(f"unknown kind {family.kind!r} for {family.name}")


def attr_name(family: FamilySpec) -> str:
    name = family.name
    for prefix in ("vllm_exporter_", "vllm_"):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if family.kind == "counter" and name.endswith("_total"):
        name = name[: -len("_total")]
    return name


def format_bound(bound: float) -> str:
    return floatToGoString(bound)  # the `le` spelling prometheus-client's own histograms use
