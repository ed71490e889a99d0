"""Every engine and daemon metric family: name, type, help, labels, buckets. The single source.

`FAMILIES` lists each family as a `FamilySpec` (families.py). Families the vLLM front ends
produce live in per-process shards (shard.py) that the metrics process merges (aggregate.py);
the metrics process's own families are prometheus-client objects that `EngineMetrics` creates
(families.create_client) in our own `CollectorRegistry` (vLLM rewrites the default registry).
The labels of vllm_engine_config_info come from the engine settings table (engine_settings.py).
docs/metrics.md is generated from the specs (`vllm-exporter docs metrics`), and the tests check
that dashboards, rules and docs name only families in catalog.all_families().

Names follow the Prometheus conventions: base units in the name, `_total` on counters (the
spec's name is the name users query), `_info` for identity, no colons.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.utils import floatToGoString

from .engine_settings import ENGINE_CONFIG_LABELS
from .families import ENGINE_LABELS, FamilySpec, create_client

# FamilySpec, ENGINE_LABELS and ENGINE_CONFIG_LABELS are also imported from here (the GPU
# family table, older callers): one definition each, in families.py and engine_settings.py.

# The values of vllm_engine_state's `state` label, and how severe each is when processes that
# share an engine report different ones (the most severe wins: aggregate.py).
ENGINE_STATES = ("starting", "serving", "stopping", "dead")
STATE_SEVERITY = {"serving": 0, "starting": 1, "stopping": 2, "dead": 3}


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
# KV-cache block residency (sampled by vLLM at eviction): reuse gaps of milliseconds to
# blocks that stay cached for an hour.
KV_RESIDENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0, 3600.0,
)

DEFAULT_BUCKETS: dict[str, tuple[float, ...]] = {
    "time_to_first_token": FIRST_TOKEN_BUCKETS,
    "inter_token_latency": TOKEN_LATENCY_BUCKETS,
    "time_per_output_token": TOKEN_LATENCY_BUCKETS,
    "request_duration": REQUEST_DURATION_BUCKETS,
    "request_tokens": TOKEN_COUNT_BUCKETS,
    "kv_cache_residency": KV_RESIDENCY_BUCKETS,
}

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
    FamilySpec("vllm_request_prefill_kv_computed_tokens", "histogram",
               "Prompt tokens whose KV a finished request computed in prefill (prompt length "
               "less the tokens served from the local prefix cache or a KV connector).",
               source="FinishedRequestStats.num_prompt_tokens - num_cached_tokens (0.26-0.33)",
               buckets_key="request_tokens"),
    FamilySpec("vllm_aborted_request_duration_seconds", "histogram",
               "Time from arrival to abort of requests aborted at the API front end (client "
               "disconnects, cancelled streams), summed over every API-server process; vLLM's "
               "own latency histograms leave these requests out.",
               labels=("model",),
               source="the front end's abort path: now - RequestState.stats.arrival_time of "
                      "each live request aborted (0.26-0.33)",
               buckets_key="request_duration"),
    # --- waiting, admission and sleep -------------------------------------------------------
    FamilySpec("vllm_requests_waiting_by_reason", "gauge",
               "Waiting requests by why they wait: capacity (waiting for room in the batch or "
               "KV cache) or deferred (held back by a transient constraint: LoRA budget, KV "
               "transfer, blocked status). The reasons add up to vllm_requests_waiting.",
               labels=ENGINE_LABELS + ("reason",), aggregate="latest",
               source="SchedulerStats.num_waiting_reqs (capacity), num_skipped_waiting_reqs "
                      "(deferred) (0.26-0.33)"),
    FamilySpec("vllm_requests_waiting_kv_fetch", "gauge",
               "Waiting requests whose KV cache is loaded asynchronously through a KV "
               "connector, by stage: waiting_to_start, in_progress, completed_waiting (loaded, "
               "not running yet). Only on an engine that consumes KV transfers.",
               labels=ENGINE_LABELS + ("stage",), aggregate="latest",
               source="SchedulerStats.num_kv_fetch_reqs_by_stage (0.32-0.33; absent on "
                      "0.26-0.31, and without kv_transfer_config as a KV consumer; tested "
                      "against vLLM's own figures on the CPU build with a test connector that "
                      "loads ExampleConnector's files asynchronously)"),
    FamilySpec("vllm_admission_rejections_total", "counter",
               "Requests the API front end refused (HTTP 503) because a queue limit was "
               "reached, by reason: max_num_queued_reqs or max_num_queued_tokens (vLLM's "
               "--max-num-queued-reqs / --max-num-queued-tokens). Summed over every "
               "API-server process.",
               labels=("model", "reason"),
               source="StatLogger.record_admission_rejection(reason) (0.32-0.33; absent on "
                      "0.26-0.31)"),
    FamilySpec("vllm_engine_sleep_state", "gauge",
               "1 for the engine's sleep state, 0 for the others: awake, kv_cache_released "
               "(sleep level 0, vLLM 0.31+), weights_offloaded (level 1) or discard_all "
               "(level 2). Exact with one API-server process; with several, each knows only "
               "the sleep and wake calls it served, and a state any of them reports shows "
               "as 1.",
               labels=ENGINE_LABELS + ("sleep_state",),
               source="StatLogger.record_sleep_state(sleep, level) (0.26-0.33; sleep mode runs on "
                      "CUDA, ROCm and XPU only: verified on an H100 against vLLM's own "
                      "gauge at levels 1 and 2; the CPU build's /sleep and /wake_up, which "
                      "free nothing, are tested the same way)"),
    # --- where prompt tokens come from ------------------------------------------------------
    FamilySpec("vllm_prompt_tokens_by_source_total", "counter",
               "Prompt tokens by where their KV came from: local_compute (prefilled here), "
               "local_cache_hit (local prefix cache) or external_kv_transfer (a KV connector). "
               "The sources add up to vllm_prompt_tokens_total.",
               labels=ENGINE_LABELS + ("source",),
               source="IterationStats.prompt_token_stats.{computed, local_cache_hit, "
                      "external_kv_transfer} (0.26-0.33)"),
    FamilySpec("vllm_external_prefix_cache_queries_total", "counter",
               "Prompt tokens looked up in an external KV cache through a KV connector (only "
               "with a KV connector).",
               source="SchedulerStats.connector_prefix_cache_stats.queries (0.26-0.33; absent "
                      "without kv_transfer_config; tested against vLLM's own figures with "
                      "vLLM's ExampleConnector on the CPU build)"),
    FamilySpec("vllm_external_prefix_cache_hits_total", "counter",
               "Prompt tokens found in an external KV cache through a KV connector (only with "
               "a KV connector).",
               source="SchedulerStats.connector_prefix_cache_stats.hits (0.26-0.33; absent without "
                      "kv_transfer_config; tested against vLLM's own figures with vLLM's "
                      "ExampleConnector on the CPU build)"),
    FamilySpec("vllm_prefix_cache_hits_by_tier_total", "counter",
               "Cached prompt tokens by the cache tier that held them (only with a KV "
               "connector): device (the local prefix cache; equals vllm_prefix_cache_hits_total), "
               "host, disk, p2p (another vLLM instance) or external_unspecified (a connector "
               "that does not say). The tiers other than device add up to "
               "vllm_external_prefix_cache_hits_total.",
               labels=ENGINE_LABELS + ("tier",),
               source="SchedulerStats.prefix_cache_stats.hits (device) and "
                      "connector_prefix_cache_stats.hits_by_source (0.32+; absent without "
                      "kv_transfer_config; with an older vLLM only the device tier moves)"),
    # --- speculative decoding (only with a speculative_config) ------------------------------
    FamilySpec("vllm_spec_decode_drafts_total", "counter",
               "Speculative-decoding drafts: one per request per step that proposed draft "
               "tokens.",
               source="SchedulerStats.spec_decoding_stats.num_drafts (0.26-0.33; absent without "
                      "speculative decoding)"),
    FamilySpec("vllm_spec_decode_draft_tokens_total", "counter",
               "Draft tokens proposed for verification.",
               source="SchedulerStats.spec_decoding_stats.num_draft_tokens (0.26-0.33; absent "
                      "without speculative decoding)"),
    FamilySpec("vllm_spec_decode_accepted_tokens_total", "counter",
               "Draft tokens the target model accepted. Acceptance rate: rate of this / rate "
               "of draft tokens; mean accepted length per step: 1 + rate of this / rate of "
               "drafts.",
               source="SchedulerStats.spec_decoding_stats.num_accepted_tokens (0.26-0.33; absent "
                      "without speculative decoding)"),
    FamilySpec("vllm_spec_decode_accepted_tokens_per_position_total", "counter",
               "Accepted draft tokens by their position in the draft (0 = first); one "
               "position per speculative token configured (num_speculative_tokens).",
               labels=ENGINE_LABELS + ("position",),
               source="SchedulerStats.spec_decoding_stats.num_accepted_tokens_per_pos (0.26-0.33; "
                      "absent without speculative decoding)"),
    # --- opt-in vLLM statistics (engine.kv_cache_metrics, engine.enable_mfu_metrics) -------
    FamilySpec("vllm_kv_block_lifetime_seconds", "histogram",
               "KV-cache blocks from allocation to eviction, for the blocks vLLM samples "
               "(engine.kv_cache_metrics_sample).",
               source="SchedulerStats.kv_cache_eviction_events[].lifetime_seconds (0.26-0.33; only "
                      "with engine.kv_cache_metrics)",
               buckets_key="kv_cache_residency"),
    FamilySpec("vllm_kv_block_idle_before_evict_seconds", "histogram",
               "Time a sampled KV-cache block sat unused before it was evicted.",
               source="SchedulerStats.kv_cache_eviction_events[].idle_seconds (0.26-0.33; only "
                      "with engine.kv_cache_metrics)",
               buckets_key="kv_cache_residency"),
    FamilySpec("vllm_kv_block_reuse_gap_seconds", "histogram",
               "Time between consecutive uses of a sampled KV-cache block (its last few uses, "
               "observed at eviction).",
               source="SchedulerStats.kv_cache_eviction_events[].reuse_gaps_seconds (0.26-0.33; "
                      "only with engine.kv_cache_metrics)",
               buckets_key="kv_cache_residency"),
    FamilySpec("vllm_estimated_flops_per_gpu_total", "counter",
               "Floating-point operations per GPU, as vLLM estimates them from the model's "
               "shape and each step's batch. Model FLOPs utilisation (MFU): rate of this / the "
               "GPU's peak FLOP/s.",
               source="SchedulerStats.perf_stats.num_flops_per_gpu (0.26-0.33; only with "
                      "engine.enable_mfu_metrics)"),
    FamilySpec("vllm_estimated_read_bytes_per_gpu_total", "counter",
               "Bytes read from GPU memory per GPU, as vLLM estimates them (weights, KV cache, "
               "activations).",
               source="SchedulerStats.perf_stats.num_read_bytes_per_gpu (0.26-0.33; only with "
                      "engine.enable_mfu_metrics)"),
    FamilySpec("vllm_estimated_write_bytes_per_gpu_total", "counter",
               "Bytes written to GPU memory per GPU, as vLLM estimates them.",
               source="SchedulerStats.perf_stats.num_write_bytes_per_gpu (0.26-0.33; only with "
                      "engine.enable_mfu_metrics)"),
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
               "Tokens the KV cache holds: vLLM's own figure where it reports one (max "
               "concurrency x max_model_len, right for models that mix KV-cache layer types), "
               "else blocks x block size.",
               source="CacheConfig.kv_cache_size_tokens (0.26-0.33), else num_gpu_blocks x "
                      "block_size"),
    FamilySpec("vllm_kv_cache_bytes_per_token", "gauge",
               "KV-cache bytes one token costs across the whole model: 2 x layers x KV heads x "
               "head dim x KV dtype bytes (grouped-query attention and KV dtype accounted; MLA "
               "stores one latent vector instead of K and V).",
               source="ModelConfig (layers, KV heads, head size), CacheConfig.cache_dtype"),
    FamilySpec("vllm_kv_cache_capacity_bytes", "gauge",
               "KV-cache bytes across the model: blocks x block size x bytes per token.",
               source="derived"),
    FamilySpec("vllm_kv_cache_max_concurrency", "gauge",
               "Requests of max_model_len tokens the KV cache holds at once, as vLLM computes "
               "it (per engine; group-aware for hybrid models).",
               source="CacheConfig.kv_cache_max_concurrency (0.26-0.33)"),
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

# Families that exist only where vLLM provides them (a feature switched on, a newer release),
# and are absent otherwise: never a 0 that would read as "measured, nothing happened". The value
# says what provides them; dashboards show it where such a panel has no data.
SPEC_DECODE_OFF = "not enabled (no speculative decoding)"
CONDITIONAL_FAMILIES: dict[str, str] = {
    "vllm_spec_decode_drafts_total": SPEC_DECODE_OFF,
    "vllm_spec_decode_draft_tokens_total": SPEC_DECODE_OFF,
    "vllm_spec_decode_accepted_tokens_total": SPEC_DECODE_OFF,
    "vllm_spec_decode_accepted_tokens_per_position_total": SPEC_DECODE_OFF,
    "vllm_kv_block_lifetime_seconds": "not enabled (engine.kv_cache_metrics)",
    "vllm_kv_block_idle_before_evict_seconds": "not enabled (engine.kv_cache_metrics)",
    "vllm_kv_block_reuse_gap_seconds": "not enabled (engine.kv_cache_metrics)",
    "vllm_estimated_flops_per_gpu_total": "not enabled (engine.enable_mfu_metrics)",
    "vllm_estimated_read_bytes_per_gpu_total": "not enabled (engine.enable_mfu_metrics)",
    "vllm_estimated_write_bytes_per_gpu_total": "not enabled (engine.enable_mfu_metrics)",
    "vllm_requests_waiting_kv_fetch": "no KV-transfer consumer (kv_transfer_config)",
    "vllm_external_prefix_cache_queries_total": "no KV connector (kv_transfer_config)",
    "vllm_external_prefix_cache_hits_total": "no KV connector (kv_transfer_config)",
    "vllm_prefix_cache_hits_by_tier_total": "no KV connector (kv_transfer_config)",
    "vllm_admission_rejections_total": "vLLM 0.32+ only",
}


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
                buckets = SCRAPE_DURATION_BUCKETS if family.kind == "histogram" else None
                setattr(self, attr_name(family), create_client(family, self.registry, buckets))


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
