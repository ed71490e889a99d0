"""The metric families the advisor publishes (once per evaluation)."""

from __future__ import annotations

from ..families import FamilySpec

SOURCE = "the advisor in the metrics process (exporter/advice)"
ADVICE_LABELS = ("model", "rule", "parameter")

ADVICE_FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec("vllm_advice_info", "info",
               "One series per piece of tuning advice the advisor gives now (value 1): the "
               "engine setting, the action, the expected effect on throughput, latency and "
               "memory (up | down | none | mixed) and the confidence. Never applied "
               "automatically; the values are in vllm_advice_current_value and "
               "vllm_advice_suggested_value, the evidence on the /advice page.",
               labels=ADVICE_LABELS + ("action", "throughput", "latency", "memory",
                                       "confidence"),
               source=SOURCE, where="server"),
    FamilySpec("vllm_advice_current_value", "gauge",
               "The setting's current value for each piece of advice (booleans 0/1; replicas: "
               "1, this server).",
               labels=ADVICE_LABELS, source=SOURCE, where="server"),
    FamilySpec("vllm_advice_suggested_value", "gauge",
               "The suggested value for each piece of advice (booleans 0/1; "
               "num_speculative_tokens 0: speculation off).",
               labels=ADVICE_LABELS, source=SOURCE, where="server"),
    FamilySpec("vllm_advice_rule_active", "gauge",
               "1 while a rule of advice has advice for the model, 0 while it is silent "
               "(present for every rule once the model has been seen for a whole sample "
               "interval).",
               labels=("model", "rule"), source=SOURCE, where="server"),
    FamilySpec("vllm_forecast_kv_cache_headroom_tokens", "gauge",
               "KV-cache tokens left now: capacity x (1 - usage), summed over engine ranks.",
               labels=("model",), source=SOURCE, where="server"),
    FamilySpec("vllm_forecast_kv_cache_headroom_requests", "gauge",
               "Requests of the window's mean context (prompt + generated tokens of finished "
               "requests) that the KV-cache headroom holds.",
               labels=("model",), source=SOURCE, where="server"),
    FamilySpec("vllm_forecast_kv_cache_full_seconds", "gauge",
               "Seconds until the KV cache is full at the window's growth of its usage "
               "(least squares); 0 when full, +Inf when not growing.",
               labels=("model",), source=SOURCE, where="server"),
    FamilySpec("vllm_forecast_batch_full_seconds", "gauge",
               "Seconds until the running batch reaches max_num_seqs (x data-parallel ranks) "
               "at its growth over the window, after which new requests wait in the queue; 0 "
               "when full, +Inf when not growing.",
               labels=("model",), source=SOURCE, where="server"),
    FamilySpec("vllm_energy_per_output_token_joules", "gauge",
               "GPU energy per generated token over the advisor's window: the increase of "
               "vllm_gpu_energy_joules_total on the engine's GPUs over the tokens generated. "
               "Absent without NVML energy (the CPU build).",
               labels=("model", "quantization", "kv_cache_dtype"), source=SOURCE,
               where="server"),
    FamilySpec("vllm_canary_token_match_ratio", "gauge",
               "Output-health canary (opt-in): share of the engine's first greedy answer to "
               "the canary prompt that the latest answer reproduced before its first "
               "different token (1: identical).",
               labels=("model",), source="the canary in the metrics process "
               "(advice.canary_interval_seconds)", where="server"),
    FamilySpec("vllm_canary_logprob_drift", "gauge",
               "Output-health canary (opt-in): the largest change of a token's "
               "log-probability (nats) between the latest and the first answer, along their "
               "common prefix.",
               labels=("model",), source="the canary in the metrics process "
               "(advice.canary_interval_seconds)", where="server"),
    FamilySpec("vllm_canary_requests_total", "counter",
               "Output-health canary requests by result: ok (answered and compared) or "
               "failed (the API did not answer). They are left out of the per-request families "
               "(vllm_requests_finished_total; the e2e, queue, prefill, decode and time per "
               "output token histograms; prompt, generation and prefill-KV length histograms; "
               "vllm_slo_requests_total of e2e and TPOT objectives) by their request id "
               "(cmpl-vllm-exporter-canary-*). The step-level families (token counters, TTFT "
               "and its SLO objectives, inter-token latency, running and waiting requests, "
               "KV-cache usage) include them.",
               labels=("model", "result"), source="the canary in the metrics process "
               "(advice.canary_interval_seconds)", where="server"),
    FamilySpec("vllm_exporter_advice_evaluations_total", "counter",
               "Evaluations of the rules of advice (one per advice.interval_seconds).",
               labels=(), source=SOURCE, where="server"),
    FamilySpec("vllm_exporter_advice_errors_total", "counter",
               "Rule evaluations (or samples) of the advisor that raised an error; the other "
               "rules go on.",
               labels=("rule",), source=SOURCE, where="server"),
)

# Families present only with an opt-in feature: family -> what switches it on (as
# metrics.CONDITIONAL_FAMILIES; rules and panels may find them absent).
CANARY_OFF = "the canary is off (advice.canary_interval_seconds)"
CONDITIONAL_ADVICE_FAMILIES: dict[str, str] = {
    "vllm_canary_token_match_ratio": CANARY_OFF,
    "vllm_canary_logprob_drift": CANARY_OFF,
    "vllm_canary_requests_total": CANARY_OFF,
}
