"""The default rule pack, generated from code so thresholds and SLOs come from the config.

`default_rule_file(thresholds, slo)` returns the pack in the rule-file format (rules.py reads
it like any user file); `vllm-exporter rules export` renders it as PromQL. Every rule has a
section in docs/runbook.md (the anchor is the alert name in lower case).
"""

from __future__ import annotations

from typing import Any

from ..slo import SloConfig
from .expr import format_duration

# Where docs/runbook.md is published; alerts.runbook_base_url points rules at a team's own copy.
RUNBOOK_BASE = "https://github.com/vllm-exporter/vllm-exporter/blob/main/docs/runbook.md"

# key -> (default, meaning). Override with alerts.thresholds in the config.
DEFAULT_THRESHOLDS: dict[str, float] = {
    "ttft_p95_seconds": 2.0,
    "inter_token_latency_p95_seconds": 0.2,
    "min_request_rate": 0.02,          # requests/s a latency quantile needs to be trusted
    "min_token_rate": 1.0,             # tokens/s the inter-token quantile needs
    "tpot_regression_increase": 0.5,   # +50 % mean time per output token vs the last hour
    "waiting_requests": 10,
    "queue_time_p95_seconds": 5.0,
    "kv_cache_usage_ratio": 0.95,
    "preemptions_per_second": 0.5,
    "engine_stall_seconds": 60,
    "error_ratio": 0.05,
    # Bytes the engine may hold beyond vLLM's own budget before it pages: the CUDA context
    # (~0.5 GiB) and CUDA graphs (0.73 GiB for a 7B model) lie outside that budget; measured
    # 1.81 GiB over on an H100 (0.40) and 1.47 GiB on an H200 (0.85) on healthy engines.
    "gpu_memory_over_budget_bytes": 3 * 1024 ** 3,
    "foreign_process_memory_bytes": 1073741824,
    "gpu_collector_stale_seconds": 120,
    "exporter_errors_per_second": 0.05,
    # Speculative decoding: warn when fewer than this share of draft tokens are accepted (with
    # at least min_draft_token_rate draft tokens/s, so an idle engine stays quiet).
    "spec_decode_acceptance_ratio": 0.3,
    "min_draft_token_rate": 1.0,
    # Requests/s the API refuses at vLLM's queue limits (--max-num-queued-reqs/-tokens).
    "admission_rejections_per_second": 0.05,
    # Waiting requests held back by a KV transfer, or deferred (LoRA budget, grammar, ...).
    "kv_transfer_waiting_requests": 10,
    "deferred_requests": 10,
    # Output-health canary (advice.canary_interval_seconds > 0): page when, for this long, no
    # probe reproduced even this share of the engine's first answer. vLLM is not batch
    # invariant: under load a greedy answer may leave the reference after some tokens, so
    # only an early, lasting divergence (a corrupting kernel or KV cache) pages.
    "canary_token_match_ratio": 0.25,
    "canary_window_seconds": 900,
}

# Thresholds with a range of their own (checked besides >= 0): key -> (check, the range).
THRESHOLD_RANGES = {
    "canary_token_match_ratio": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "canary_window_seconds": (lambda v: v >= 60, ">= 60 (a lasting change over several "
                                                 "canary probes)"),
}

# Thresholds that no longer exist: a config naming one is refused with this message.
RENAMED_THRESHOLDS = {
    "gpu_memory_over_budget_ratio": "replaced by gpu_memory_over_budget_bytes (bytes beyond "
                                    "vLLM's budget; a ratio paged healthy engines with small "
                                    "budgets)",
}

THROTTLE_REASONS = ["hw_slowdown", "hw_thermal_slowdown", "sw_thermal_slowdown",
                    "hw_power_brake_slowdown"]

# (speed, long window, short window, burn rate, for, severity): the SRE workbook's pair.
BURN_WINDOWS = (
    ("Fast", "1h", "5m", 14.4, "2m", "critical"),
    ("Slow", "6h", "30m", 6.0, "15m", "warning"),
)


def runbook(alert: str, base: str | None = None) -> str:
    return f"{base or RUNBOOK_BASE}#{alert.lower()}"


def _rule(alert: str, kind: str, for_: str, severity: str, summary: str, description: str,
          **fields: Any) -> dict[str, Any]:
    return {"alert": alert, "kind": kind, **fields, "for": for_, "severity": severity,
            "annotations": {"summary": summary, "description": description,
                            "runbook_url": runbook(alert)}}


def default_rule_file(thresholds: dict[str, float] | None = None,
                      slo: SloConfig | None = None,
                      runbook_base: str | None = None) -> dict[str, Any]:
    t = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    slo = slo or SloConfig()
    on_model = "{{ $labels.model }} (engine {{ $labels.engine }})"
    on_gpu = "GPU {{ $labels.gpu }} ({{ $labels.name }}, {{ $labels.uuid }})"
    rules = [
        _rule("VllmHighTimeToFirstToken", "threshold", "5m", "warning",
              "Slow first tokens on {{ $labels.model }}",
              f"p95 time to first token over 5m is {{{{ $value | humanizeDuration }}}} on "
              f"{on_model}, above {t['ttft_p95_seconds']:g}s.",
              signal={"quantile": 0.95, "histogram": "vllm_time_to_first_token_seconds",
                      "window": "5m"},
              above=t["ttft_p95_seconds"], min_rate=t["min_request_rate"]),
        _rule("VllmHighInterTokenLatency", "threshold", "5m", "warning",
              "Slow decoding on {{ $labels.model }}",
              f"p95 inter-token latency over 5m is {{{{ $value | humanizeDuration }}}} on "
              f"{on_model}, above {t['inter_token_latency_p95_seconds']:g}s.",
              signal={"quantile": 0.95, "histogram": "vllm_inter_token_latency_seconds",
                      "window": "5m"},
              above=t["inter_token_latency_p95_seconds"], min_rate=t["min_token_rate"]),
        _rule("VllmLatencyRegression", "regression", "10m", "warning",
              "Time per output token regressed on {{ $labels.model }}",
              f"Mean time per output token over 10m is {{{{ $value | humanizePercentage }}}} of "
              f"the hour before on {on_model} (alert above "
              f"+{t['tpot_regression_increase'] * 100:g} %, with at least "
              f"{t['min_request_rate']:g} req/s in both windows).",
              signal={"mean": "vllm_time_per_output_token_seconds", "window": "10m"},
              baseline_window="1h", increase_over=t["tpot_regression_increase"],
              min_rate=t["min_request_rate"]),
        _rule("VllmRequestsQueueing", "threshold", "5m", "warning",
              "Requests queue up on {{ $labels.model }}",
              f"{{{{ $value }}}} requests are waiting on {on_model} "
              f"(alert above {t['waiting_requests']:g} for 5m).",
              signal={"gauge": "vllm_requests_waiting"}, above=t["waiting_requests"]),
        _rule("VllmHighQueueTime", "threshold", "5m", "warning",
              "Requests wait long before being scheduled on {{ $labels.model }}",
              f"p95 queue time over 5m is {{{{ $value | humanizeDuration }}}} on {on_model}, "
              f"above {t['queue_time_p95_seconds']:g}s.",
              signal={"quantile": 0.95, "histogram": "vllm_request_queue_time_seconds",
                      "window": "5m"},
              above=t["queue_time_p95_seconds"], min_rate=t["min_request_rate"]),
        _rule("VllmKvCacheSaturated", "threshold", "10m", "warning",
              "KV cache nearly full on {{ $labels.model }}",
              f"KV-cache usage is {{{{ $value | humanizePercentage }}}} on {on_model} "
              f"(alert above {t['kv_cache_usage_ratio'] * 100:g} % for 10m).",
              signal={"gauge": "vllm_kv_cache_usage_ratio"}, above=t["kv_cache_usage_ratio"]),
        _rule("VllmPreemptionStorm", "threshold", "5m", "warning",
              "Requests are being preempted on {{ $labels.model }}",
              f"{{{{ $value | humanize }}}} preemptions/s over 5m on {on_model} "
              f"(alert above {t['preemptions_per_second']:g}/s).",
              signal={"rate": "vllm_preemptions_total", "window": "5m"},
              above=t["preemptions_per_second"]),
        _rule("VllmEngineStalled", "stall", "1m", "critical",
              "The engine of {{ $labels.model }} makes no progress",
              f"No engine step for {{{{ $value | humanizeDuration }}}} on {on_model} while "
              f"requests are pending (alert after {t['engine_stall_seconds']:g}s).",
              timestamp="vllm_engine_last_step_timestamp_seconds",
              stale_after=f"{int(t['engine_stall_seconds'])}s",
              while_positive=["vllm_engine_requests_unfinished", "vllm_requests_waiting",
                              "vllm_requests_running"],
              on=["model", "engine"]),
        _rule("VllmEngineDown", "threshold", "5m", "critical",
              "The engine of {{ $labels.model }} is not serving",
              "vllm_engine_up is 0 for {{ $labels.model }}: the engine is still starting after "
              "5m, died, or is shutting down.",
              signal={"gauge": "vllm_engine_up"}, below=1),
        _rule("VllmEngineDied", "threshold", "0s", "critical",
              "The engine of {{ $labels.model }} died",
              "The engine process of {{ $labels.model }} died (killed, crashed or out of "
              "memory). The daemon exits with code 1 daemon.exit_delay_seconds later so that "
              "its supervisor restarts it; it sends this alert before it goes.",
              signal={"gauge": "vllm_engine_state", "match": {"state": "dead"},
                      "without": ["state"]},
              above=0),
        _rule("VllmRequestsRejected", "threshold", "5m", "critical",
              "Requests are refused at the queue limit on {{ $labels.model }}",
              f"The API refuses {{{{ $value | humanize }}}} requests/s over 5m with HTTP 503 "
              f"on {{{{ $labels.model }}}} because vLLM's queue limit is reached "
              f"(--max-num-queued-reqs / --max-num-queued-tokens; alert above "
              f"{t['admission_rejections_per_second']:g}/s).",
              signal={"rate": "vllm_admission_rejections_total", "window": "5m",
                      "without": ["reason"]},
              above=t["admission_rejections_per_second"]),
        _rule("VllmRequestsWaitingOnKvTransfer", "threshold", "5m", "critical",
              "Requests wait on KV transfers on {{ $labels.model }}",
              f"{{{{ $value }}}} requests wait for their KV cache from a KV connector on "
              f"{on_model} (alert above {t['kv_transfer_waiting_requests']:g} for 5m).",
              signal={"gauge": "vllm_requests_waiting_kv_fetch", "aggregate": "sum",
                      "without": ["stage"]},
              above=t["kv_transfer_waiting_requests"]),
        _rule("VllmRequestsDeferred", "threshold", "10m", "warning",
              "Requests are held back on {{ $labels.model }}",
              f"{{{{ $value }}}} waiting requests are deferred (LoRA budget, structured-output "
              f"grammar, KV transfer) rather than waiting for capacity on {on_model} (alert "
              f"above {t['deferred_requests']:g} for 10m).",
              signal={"gauge": "vllm_requests_waiting_by_reason",
                      "match": {"reason": "deferred"}, "without": ["reason"]},
              above=t["deferred_requests"]),
        _rule("VllmSpecDecodeLowAcceptance", "threshold", "15m", "warning",
              "Speculative decoding stopped paying off on {{ $labels.model }}",
              f"Only {{{{ $value | humanizePercentage }}}} of draft tokens were accepted over "
              f"10m on {on_model} (alert below {t['spec_decode_acceptance_ratio'] * 100:g} % "
              f"for 15m, with at least {t['min_draft_token_rate']:g} draft tokens/s): "
              f"verifying the drafts may cost more than the accepted tokens save.",
              signal={"ratio": {"numerator": {"metric": "vllm_spec_decode_accepted_tokens_total"},
                                "denominator": {"metric":
                                                "vllm_spec_decode_draft_tokens_total"}},
                      "window": "10m"},
              below=t["spec_decode_acceptance_ratio"], min_rate=t["min_draft_token_rate"]),
        _rule("VllmCanaryOutputChanged", "threshold",
              format_duration(t["canary_window_seconds"]), "critical",
              "The output-health canary's answers changed on {{ $labels.model }}",
              f"For {format_duration(t['canary_window_seconds'])} no greedy canary answer on "
              f"{{{{ $labels.model }}}} reproduced even "
              f"{t['canary_token_match_ratio'] * 100:g} % of the engine's first answer before "
              f"diverging (latest {{{{ $value | humanizePercentage }}}}): the engine may be "
              f"corrupting its output (a quantized kernel, an FP8 KV cache).",
              signal={"gauge": "vllm_canary_token_match_ratio"},
              below=t["canary_token_match_ratio"]),
        _rule("VllmHighErrorRatio", "threshold", "5m", "warning",
              "Requests fail on {{ $labels.model }}",
              f"{{{{ $value | humanizePercentage }}}} of requests finished with an error or "
              f"engine abort over 5m on {on_model} (alert above "
              f"{t['error_ratio'] * 100:g} %).",
              signal={"ratio": {"numerator": {"metric": "vllm_requests_finished_total",
                                              "match": {"finish_reason": ["error", "abort"]}},
                                "denominator": {"metric": "vllm_requests_finished_total"}},
                      "window": "5m", "without": ["finish_reason"]},
              above=t["error_ratio"], min_rate=t["min_request_rate"]),
    ]
    objectives = [(o.name, f"{o.name} under {o.threshold_seconds:g}s for "
                           f"{o.target * 100:g} % of requests") for o in slo.objectives]
    objectives.append(("errors", f"errors for at most {(1 - slo.error_target) * 100:g} % of "
                                 f"requests"))
    for name, meaning in objectives:
        camel = "".join(part.capitalize() for part in name.split("_"))
        for speed, long_w, short_w, burn, for_, severity in BURN_WINDOWS:
            rules.append(_rule(
                f"Vllm{camel}SloBurnRate{speed}", "slo_burn", for_, severity,
                f"{'Fast' if speed == 'Fast' else 'Slow'} error-budget burn of the {name} SLO "
                f"on {{{{ $labels.model }}}}",
                f"The {name} SLO ({meaning}) burns its error budget "
                f"{{{{ $value | humanize }}}}x too fast over {long_w} (and over {short_w}) on "
                f"{on_model}; alert above {burn:g}x.",
                objective=name, long_window=long_w, short_window=short_w, burn_rate=burn))
    rules += [
        _rule("VllmGpuMemoryOverBudget", "threshold", "5m", "warning",
              "The engine uses more GPU memory than its budget",
              f"The engine's processes use {{{{ $value | humanize1024 }}}}B more than vLLM's "
              f"memory budget (gpu_memory_utilization x memory) on {on_gpu}; the CUDA "
              f"context and graphs account for 1-2 GiB of that on a healthy engine.",
              signal={"difference": {"minuend": {"metric": "vllm_gpu_process_memory_used_bytes",
                                                 "match": {"owner": "engine"}},
                                     "subtrahend": {"metric": "vllm_gpu_memory_budget_bytes"}},
                      "without": ["owner"]},
              above=t["gpu_memory_over_budget_bytes"]),
        _rule("VllmGpuForeignProcess", "threshold", "5m", "warning",
              "Another process uses the engine's GPU",
              f"Processes outside the engine hold {{{{ $value | humanize }}}}B on {on_gpu}, "
              f"which the engine uses.",
              signal={"gauge": "vllm_gpu_process_memory_used_bytes", "match": {"owner": "other"},
                      "without": ["owner"]},
              above=t["foreign_process_memory_bytes"],
              only_if=[{"gauge": "vllm_gpu_engine_visible", "above": 0, "on": ["uuid"]}]),
        _rule("VllmGpuThrottling", "threshold", "10m", "warning",
              "GPU clocks throttled by heat or power",
              f"{on_gpu} has been clock-throttled (thermal, power brake or hardware slowdown) "
              f"for 10m.",
              signal={"gauge": "vllm_gpu_clock_throttle_active",
                      "match": {"reason": THROTTLE_REASONS}, "without": ["reason"]},
              above=0),
        _rule("VllmGpuEccErrors", "threshold", "0s", "critical",
              "Uncorrectable GPU memory errors",
              f"{{{{ $value | humanize }}}} uncorrectable ECC errors in the last 10m on {on_gpu}.",
              signal={"increase": "vllm_gpu_ecc_errors_total", "match": {"type": "uncorrected"},
                      "window": "10m"},
              above=0),
        _rule("VllmGpuXidErrors", "threshold", "0s", "critical",
              "GPU XID errors",
              f"{{{{ $value | humanize }}}} XID {{{{ $labels.xid }}}} errors in the last 10m on "
              f"{on_gpu}.",
              signal={"increase": "vllm_gpu_xid_errors_total", "window": "10m"}, above=0),
        _rule("VllmGpuCollectorFailing", "stall", "0s", "warning",
              "GPU metrics are stale",
              f"The NVML collector has not read every GPU for {{{{ $value | humanizeDuration }}}} "
              f"(alert after {t['gpu_collector_stale_seconds']:g}s).",
              timestamp="vllm_exporter_gpu_last_success_timestamp_seconds",
              stale_after=f"{int(t['gpu_collector_stale_seconds'])}s"),
        _rule("VllmExporterErrors", "threshold", "10m", "warning",
              "vllm-exporter's {{ $labels.component }} keeps failing",
              f"{{{{ $value | humanize }}}} errors/s over 5m in the exporter's "
              f"{{{{ $labels.component }}}} component (alert above "
              f"{t['exporter_errors_per_second']:g}/s).",
              signal={"rate": "vllm_exporter_errors_total", "window": "5m"},
              above=t["exporter_errors_per_second"]),
    ]
    if runbook_base:
        for rule in rules:
            rule["annotations"]["runbook_url"] = runbook(rule["alert"], runbook_base)
    return {"rules": rules}
