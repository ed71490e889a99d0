"""Engine: scheduler state, queueing, KV cache, prefix cache, preemptions, request shapes,
prefill vs decode, and the tuning configuration."""

from __future__ import annotations

from ..metrics import CONDITIONAL_FAMILIES, SPEC_DECODE_OFF
from .grafana import Dashboard, Row, Target, heatmap, stat, table, timeseries
from .queries import ENGINE, buckets, increase, mean, quantile, rate, sel, sum_by
from .variables import model_variable, scope_variables

CONFIG_COLUMNS_HIDDEN = ("Time", "__name__", "Value", "job")


def _by_model(expr: str) -> str:
    return sum_by(("model",), expr)


def _scheduler() -> Row:
    return Row("Scheduler", [
        timeseries("Running and waiting requests", "Requests in the running batch and waiting "
                   "to be scheduled (0 once the engine is idle).", "short", [
                       Target(_by_model(sel("vllm_requests_running", ENGINE)),
                              "running {{model}}"),
                       Target(_by_model(sel("vllm_requests_waiting", ENGINE)),
                              "waiting {{model}}"),
                       Target(_by_model(sel("vllm_frontend_requests_unfinished", ENGINE)),
                              "unfinished at the API {{model}}")]),
        timeseries("Queue time", "p50/p95/p99 of the time finished requests waited before "
                   "first scheduled.", "s",
                   [Target(quantile(q, "vllm_request_queue_time_seconds", ENGINE),
                           f"p{q * 100:g} {{{{model}}}}") for q in (0.5, 0.95, 0.99)]),
        timeseries("Engine steps", "Engine steps per second whose statistics reached the front "
                   "end.", "ops", [Target(_by_model(rate("vllm_engine_steps_total", ENGINE)),
                                          "{{model}}")]),
        stat("Engine up", "1 while the engine serves; 0 while it starts, after it died, or at "
             "shutdown.", "bool_yes_no", [Target(sel("vllm_engine_up", ENGINE), "{{model}}")],
             thresholds=[(None, "red"), (1, "green")]),
        stat("Last engine step", "Seconds since the last engine step the front end saw (grows "
             "while idle; VllmEngineStalled fires when it grows while requests are pending).",
             "s", [Target(f"time() - max by (model) "
                          f"({sel('vllm_engine_last_step_timestamp_seconds', ENGINE)})",
                          "{{model}}")]),
        timeseries("Preemptions", "Requests preempted per second (KV-cache pressure); each is "
                   "recomputed.", "ops",
                   [Target(_by_model(rate("vllm_preemptions_total", ENGINE)), "{{model}}")],
                   width=8, height=4),
        timeseries("Waiting requests by reason", "Why requests wait: capacity (no room in the "
                   "batch or KV cache yet) or deferred (LoRA budget, KV transfer, blocked). "
                   "The reasons add up to the waiting line above.", "short",
                   [Target(sum_by(("model", "reason"),
                                  sel("vllm_requests_waiting_by_reason", ENGINE)),
                           "{{reason}} {{model}}")], stack=True),
        timeseries("Admission rejections", "Requests the API refused (HTTP 503) at vLLM's "
                   "queue limits (--max-num-queued-reqs / --max-num-queued-tokens), per "
                   "second; VllmRequestsRejected pages on them.", "reqps",
                   [Target(sum_by(("model", "reason"),
                                  rate("vllm_admission_rejections_total", ENGINE)),
                           "{{reason}} {{model}}")],
                   no_value=CONDITIONAL_FAMILIES["vllm_admission_rejections_total"]),
        timeseries("Waiting on KV transfer", "Waiting requests whose KV cache is loaded "
                   "through a KV connector, by stage (disaggregated prefill consumers only).",
                   "short",
                   [Target(sum_by(("model", "stage"),
                                  sel("vllm_requests_waiting_kv_fetch", ENGINE)),
                           "{{stage}} {{model}}")], stack=True,
                   no_value=CONDITIONAL_FAMILIES["vllm_requests_waiting_kv_fetch"]),
        stat("Sleep state", "The engine's sleep state (vLLM's sleep mode: /sleep and /wake_up "
             "in its development mode): awake, kv_cache_released, weights_offloaded or "
             "discard_all.", "short",
             [Target(f"max by (model, sleep_state) "
                     f"({sel('vllm_engine_sleep_state', ENGINE)}) == 1",
                     "{{sleep_state}} {{model}}")], width=8),
    ])


def _speculative_decoding() -> Row:
    accepted = _by_model(rate("vllm_spec_decode_accepted_tokens_total", ENGINE))
    drafted = _by_model(rate("vllm_spec_decode_draft_tokens_total", ENGINE))
    drafts = _by_model(rate("vllm_spec_decode_drafts_total", ENGINE))
    per_position = sum_by(("model", "position"),
                          rate("vllm_spec_decode_accepted_tokens_per_position_total", ENGINE))
    return Row("Speculative decoding", [
        timeseries("Draft acceptance rate", "Share of the proposed draft tokens the target "
                   "model accepted. Below alerts.thresholds.spec_decode_acceptance_ratio for "
                   "15m, VllmSpecDecodeLowAcceptance warns that speculation may cost more "
                   "than it saves.", "percentunit",
                   [Target(f"{accepted} / {drafted}", "{{model}}")], max_value=1,
                   no_value=SPEC_DECODE_OFF),
        timeseries("Mean accepted length", "Tokens each draft yields per step on average: the "
                   "accepted draft tokens plus the one token the target model adds (1 = no "
                   "gain from speculation).", "short",
                   [Target(f"1 + {accepted} / {drafts}", "{{model}}")], no_value=SPEC_DECODE_OFF),
        timeseries("Acceptance by draft position", "Share of drafts whose token at each "
                   "position was accepted (position 0 first): where it falls off, fewer "
                   "speculative tokens would do.", "percentunit",
                   [Target(f"{per_position} / on (model) group_left {drafts}",
                           "position {{position}} {{model}}")], max_value=1,
                   no_value=SPEC_DECODE_OFF),
    ])


def _kv_cache() -> Row:
    capacity = sel("vllm_kv_cache_capacity_tokens", ENGINE)
    usage = sel("vllm_kv_cache_usage_ratio", ENGINE)
    return Row("KV cache", [
        timeseries("KV-cache usage", "Fraction of the KV-cache blocks in use.", "percentunit",
                   [Target(f"max by (model, engine) ({usage})", "{{model}} engine {{engine}}")],
                   max_value=1),
        timeseries("KV-cache tokens in use", "Usage x capacity: tokens held in the KV cache, "
                   "against its capacity.", "short", [
                       Target(f"sum by (model) ({usage} * {capacity})", "in use {{model}}"),
                       Target(_by_model(capacity), "capacity {{model}}")]),
        timeseries("Prefix-cache hit ratio", "Share of prompt tokens looked up in the prefix "
                   "cache that were found there.", "percentunit",
                   [Target(f"{_by_model(rate('vllm_prefix_cache_hits_total', ENGINE))} / "
                           f"{_by_model(rate('vllm_prefix_cache_queries_total', ENGINE))}",
                           "{{model}}")], max_value=1),
        stat("KV-cache capacity (tokens)", "Tokens the KV cache holds: blocks x block size.",
             "short", [Target(_by_model(capacity), "{{model}}")]),
        stat("KV-cache capacity (bytes)", "KV-cache bytes across the model.", "bytes",
             [Target(_by_model(sel("vllm_kv_cache_capacity_bytes", ENGINE)), "{{model}}")]),
        stat("KV-cache blocks", "Blocks the engine allocated.", "short",
             [Target(_by_model(sel("vllm_kv_cache_blocks", ENGINE)), "{{model}}")]),
        stat("Block size", "Tokens per KV-cache block.", "short",
             [Target(f"max by (model) ({sel('vllm_kv_cache_block_size_tokens', ENGINE)})",
                     "{{model}}")]),
        stat("KV bytes per token", "KV-cache bytes one token costs across the whole model.",
             "bytes", [Target(f"max by (model) ({sel('vllm_kv_cache_bytes_per_token', ENGINE)})",
                              "{{model}}")]),
        stat("Tokens per second (gen)", "Tokens generated per second.", "suffix: tok/s",
             [Target(_by_model(rate("vllm_generation_tokens_total", ENGINE)), "{{model}}")]),
        stat("Max concurrency", "Requests of max_model_len tokens the KV cache holds at once, "
             "as vLLM computes it (right for hybrid models too).", "short",
             [Target(f"max by (model) ({sel('vllm_kv_cache_max_concurrency', ENGINE)})",
                     "{{model}}")]),
        timeseries("Prompt tokens by source", "Where prompt tokens' KV came from, per second: "
                   "computed here, the local prefix cache, or a KV connector.", "suffix: tok/s",
                   [Target(sum_by(("model", "source"),
                                  rate("vllm_prompt_tokens_by_source_total", ENGINE)),
                           "{{source}} {{model}}")], stack=True, width=12),
        timeseries("Prefill KV computed per request (p50, p95)", "Prompt tokens whose KV a "
                   "finished request had to compute (prompt less cached tokens).", "short",
                   [Target(quantile(q, "vllm_request_prefill_kv_computed_tokens", ENGINE),
                           f"p{q * 100:g} {{{{model}}}}") for q in (0.5, 0.95)], width=12),
        timeseries("KV block residency (p50, p95)", "Sampled KV-cache blocks: lifetime from "
                   "allocation to eviction, idle time before eviction, and the gap between "
                   "reuses (vLLM's opt-in engine.kv_cache_metrics).", "s",
                   [Target(quantile(q, f"vllm_kv_block_{name}_seconds", ENGINE),
                           f"{name.replace('_', ' ')} p{q * 100:g} {{{{model}}}}")
                    for name in ("lifetime", "idle_before_evict", "reuse_gap")
                    for q in (0.5, 0.95)],
                   no_value=CONDITIONAL_FAMILIES["vllm_kv_block_lifetime_seconds"], width=12),
        timeseries("Estimated model FLOP/s and memory traffic per GPU", "vLLM's estimate "
                   "(opt-in engine.enable_mfu_metrics). MFU = this FLOP/s / the GPU's peak "
                   "FLOP/s for the dtype.", "short", [
                       Target(sum_by(("model", "engine"),
                                     rate("vllm_estimated_flops_per_gpu_total", ENGINE)),
                              "FLOP/s {{model}} engine {{engine}}"),
                       Target(sum_by(("model", "engine"), _memory_traffic()),
                              "bytes/s {{model}} engine {{engine}}")],
                   no_value=CONDITIONAL_FAMILIES["vllm_estimated_flops_per_gpu_total"],
                   width=12),
    ])


def _requests() -> Row:
    return Row("Request shapes and phases", [
        heatmap("Prompt length (distribution)", "Finished requests per second by prompt "
                "length.", "short", buckets("vllm_request_prompt_tokens", ENGINE)),
        heatmap("Generation length (distribution)", "Finished requests per second by generated "
                "length.", "short", buckets("vllm_request_generation_tokens", ENGINE)),
        timeseries("Request lengths (p50, p95)", "Prompt and generated lengths of finished "
                   "requests, in tokens.", "short", [
                       Target(quantile(q, f"vllm_request_{kind}_tokens", ENGINE),
                              f"{kind} p{q * 100:g} {{{{model}}}}")
                       for kind in ("prompt", "generation") for q in (0.5, 0.95)]),
        timeseries("Prefill vs decode time (mean)", "Mean time finished requests spent in "
                   "prefill (first scheduled to first token) and in decode (first to last "
                   "token).", "s", [
                       Target(mean("vllm_request_prefill_time_seconds", ENGINE),
                              "prefill {{model}}"),
                       Target(mean("vllm_request_decode_time_seconds", ENGINE),
                              "decode {{model}}")], width=12),
        timeseries("Prefill vs decode time (p95)", "p95 of the prefill and decode phases.", "s", [
            Target(quantile(0.95, "vllm_request_prefill_time_seconds", ENGINE),
                   "prefill p95 {{model}}"),
            Target(quantile(0.95, "vllm_request_decode_time_seconds", ENGINE),
                   "decode p95 {{model}}")], width=12),
        timeseries("Time per output token", "p50/p95 per finished request: decode time divided "
                   "by the output tokens after the first.", "s",
                   [Target(quantile(q, "vllm_time_per_output_token_seconds", ENGINE),
                           f"p{q * 100:g} {{{{model}}}}") for q in (0.5, 0.95)], width=12),
        timeseries("Aborted at the API", "Requests aborted at the API front end per second "
                   "(client disconnects, cancelled streams).", "reqps",
                   [Target(_by_model(rate("vllm_requests_aborted_total", ENGINE)), "{{model}}")],
                   width=8),
        stat("Aborted requests: time in engine (median, range)", "How long requests aborted "
             "at the API had been in the engine, over the dashboard's time range (vLLM's own "
             "latency histograms leave them out).", "s",
             [Target(_range_quantile(0.5, "vllm_aborted_request_duration_seconds"),
                     "{{model}}")], width=4),
    ])


def _memory_traffic() -> str:
    read = rate("vllm_estimated_read_bytes_per_gpu_total", ENGINE)
    written = rate("vllm_estimated_write_bytes_per_gpu_total", ENGINE)
    return f"{read} + {written}"


def _range_quantile(q: float, histogram: str) -> str:
    """A quantile over the dashboard's time range: for events too sparse for a rate window."""
    buckets_ = increase(f"{histogram}_bucket", ENGINE, window="$__range")
    return f"histogram_quantile({q:g}, {sum_by(('le', 'model'), buckets_)})"


def _configuration() -> Row:
    return Row("Tuning configuration", [
        table("Engine configuration", "The engine's tuning configuration "
              "(vllm_engine_config_info), one row per engine.",
              [Target(sel("vllm_engine_config_info", ENGINE), instant=True, format="table")],
              hide=CONFIG_COLUMNS_HIDDEN),
    ])


def dashboard() -> Dashboard:
    return Dashboard(
        uid="vllm-exporter-engine", title="vLLM / Engine",
        description="Scheduler, KV cache, request shapes and tuning of each vLLM engine.",
        rows=[_scheduler(), _speculative_decoding(), _kv_cache(), _requests(),
              _configuration()],
        variables=scope_variables("vllm_exporter_build_info") + [model_variable()],
        file_name="engine.json")
