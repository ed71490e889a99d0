"""`plan`: KV-cache capacity and concurrency from a model directory and a memory size.

Memory the engine may use = GPU memory x gpu_memory_utilization; the weights (their stored
size) and a fixed overhead (activations, CUDA graphs and context: vLLM measures it at start,
the plan can only take it as --overhead-gib) come off the top; the rest is KV cache. On the
CPU build the KV cache is sized directly (VLLM_CPU_KVCACHE_SPACE or --kv-cache-memory-bytes):
--kv-cache-gib plans from that figure.

KV bytes per token = 2 (K and V) x layers x KV heads x head dim x KV dtype bytes
(capacity.kv_bytes_per_token); grouped-query attention counts KV heads, not attention heads;
MLA stores one latent of kv_lora_rank + qk_rope_head_dim per token and layer.

Sliding windows: a windowed layer keeps at most `window` tokens of a sequence, so a sequence of
context C costs C x (full layers' bytes/token) + min(C, window) x (windowed layers' bytes/token).
The per-sequence figures (concurrency, longest sequence) use that; the token capacity is
reported as vLLM reports it, as if every layer held every token (a lower bound for such models).

Speculative decoding (`speculative_costs`): every running sequence keeps num_speculative_tokens
lookahead slots in the KV cache; a drafter with layers of its own (EAGLE head, MTP layers, a
draft model) stores its KV in the same block pool, so each token costs the target's bytes plus
the drafter's; a draft model's weights come off the same memory. n-gram drafting costs neither.

Prefix caching (`prefix_cache_costs`): cached blocks are free blocks not yet reused, so the
cache needs no memory of its own; a prefix is shared in whole blocks only, once for every
running sequence that starts with it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path

from .. import capacity
from . import daemon_view
from .errors import UsageError
from .model_files import (ModelShape, checkpoint_weights, dense_parameter_count, model_shape,
                          read_config)
from .report import size, table

GiB = 2**30
MAX_RECOMMENDED_SEQS = 1024


def gpu_memory_from_nvml(index: int = 0) -> int:
    """Total memory of GPU `index`; a UsageError that names the flag when NVML is absent."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # NVMLError, ImportError, missing library
        raise UsageError(f"cannot read the GPU's memory size from NVML ({exc}); "
                         "pass --gpu-memory-gib (or --kv-cache-gib)") from None


def sequence_kv_bytes(context: int, full_per_token: int, windowed_per_token: int,
                      window: int | None, block_size: int) -> int:
    """KV bytes one sequence of `context` tokens holds, in whole blocks."""
    blocks = math.ceil(context / block_size)
    full = blocks * block_size * full_per_token
    windowed_tokens = min(context, window) if window else context
    windowed = math.ceil(windowed_tokens / block_size) * block_size * windowed_per_token
    return full + windowed


def make_plan(model_dir: str, *, gpu_memory_bytes: int | None = None,
              kv_cache_bytes: int | None = None, gpu_memory_utilization: float = 0.9,
              overhead_bytes: int = GiB, weights_bytes: int | None = None,
              dtype: str | None = None, kv_cache_dtype: str = "auto", block_size: int = 16,
              max_model_len: int | None = None, avg_context_len: int | None = None,
              speculative_method: str | None = None, num_speculative_tokens: int = 0,
              draft_model_dir: str | None = None, enable_prefix_caching: bool = True,
              shared_prefix_len: int | None = None) -> dict:
    if not 0 < gpu_memory_utilization <= 1:
        raise UsageError(f"--gpu-memory-utilization must be in (0, 1], got "
                         f"{gpu_memory_utilization}")
    if block_size < 1:
        raise UsageError(f"--block-size must be >= 1, got {block_size}")
    config = read_config(model_dir)
    shape = model_shape(config, str(Path(model_dir) / "config.json"))
    model_dtype = dtype or shape.dtype
    try:
        element = capacity.kv_cache_dtype_bytes(kv_cache_dtype, model_dtype)
    except ValueError as exc:
        raise UsageError(f"KV-cache dtype: {exc}") from None
    kv = _kv_costs(shape, element)

    weights = _weights(model_dir, shape, model_dtype, weights_bytes)
    if kv_cache_bytes is not None:
        budget = kv_cache_bytes
        memory = {"source": "--kv-cache-gib", "kv_cache_bytes": kv_cache_bytes}
    else:
        if gpu_memory_bytes is None:
            raise UsageError("give --gpu-memory-gib, --kv-cache-gib, or run where NVML works")
        usable = int(gpu_memory_bytes * gpu_memory_utilization)
        budget = usable - weights["bytes"] - overhead_bytes
        memory = {"source": "gpu memory", "gpu_memory_bytes": gpu_memory_bytes,
                  "gpu_memory_utilization": gpu_memory_utilization,
                  "usable_bytes": usable, "weights_bytes": weights["bytes"],
                  "overhead_bytes": overhead_bytes, "kv_cache_bytes": max(budget, 0)}

    limit = max_model_len or shape.max_position_embeddings or 4096
    if limit < 1:
        raise UsageError(f"--max-model-len must be >= 1, got {limit}")
    average = avg_context_len or max(1, limit // 2)
    if average < 1:
        raise UsageError(f"--avg-context-len must be >= 1, got {average}")

    def seq_bytes(context: int) -> int:
        return sequence_kv_bytes(context, kv["full_layers_bytes_per_token"],
                                 kv["windowed_layers_bytes_per_token"], shape.sliding_window,
                                 block_size)

    blocks = max(budget, 0) // (block_size * kv["bytes_per_token"])
    longest = _longest_sequence(max(budget, 0), seq_bytes, block_size, limit)
    at_average = max(budget, 0) // seq_bytes(average)
    at_limit = max(budget, 0) // seq_bytes(limit)
    notes = []
    fits = budget > 0 and longest >= min(limit, block_size)
    if budget <= 0:
        notes.append("the weights and overhead do not leave any memory for the KV cache")
    elif longest < limit:
        notes.append(f"one sequence of {limit} tokens does not fit: lower max_model_len to "
                     f"{longest} or give the KV cache more memory")
    recommended_seqs = _round_seqs(min(at_average, MAX_RECOMMENDED_SEQS))
    if at_average > MAX_RECOMMENDED_SEQS:
        notes.append(f"{at_average} sequences of {average} tokens fit; max_num_seqs above "
                     f"{MAX_RECOMMENDED_SEQS} rarely adds throughput")
    if shape.sliding_window and shape.sliding_layers:
        notes.append(f"{shape.sliding_layers} of {shape.num_layers} layers keep only "
                     f"{shape.sliding_window} tokens per sequence; the token capacity counts "
                     "every layer as full, the per-sequence figures do not")
    kv_budget = max(budget, 0)
    speculative = speculative_costs(
        config, shape, element, kv["bytes_per_token"], speculative_method,
        num_speculative_tokens, draft_model_dir, kv_budget, block_size, average, limit,
        seq_bytes, from_gpu_memory=kv_cache_bytes is None)
    notes += speculative.pop("notes")
    prefix_cache = prefix_cache_costs(config, shape, kv["bytes_per_token"], enable_prefix_caching,
                                      shared_prefix_len, kv_budget, block_size, average,
                                      seq_bytes)
    notes += prefix_cache.pop("notes")
    return {
        "model_dir": str(model_dir),
        "shape": asdict(shape),
        "kv": {"dtype": kv_cache_dtype if kv_cache_dtype != "auto" else model_dtype,
               "element_bytes": element, **kv},
        "weights": weights,
        "memory": memory,
        "capacity": {"block_size": block_size, "blocks": int(blocks),
                     "tokens": int(blocks * block_size),
                     "avg_context_len": average, "max_model_len": limit,
                     "max_seqs_at_avg_context": int(at_average),
                     "max_seqs_at_max_model_len": int(at_limit),
                     "longest_sequence_tokens": int(longest)},
        "recommendation": {"max_model_len": int(min(limit, longest)) if fits else None,
                           "max_num_seqs": int(recommended_seqs) if fits else None,
                           "gpu_memory_utilization": (gpu_memory_utilization
                                                      if kv_cache_bytes is None else None)},
        "fits": bool(fits),
        "speculative": speculative,
        "prefix_cache": prefix_cache,
        "notes": notes,
    }


# Config keys that give a checkpoint's multi-token-prediction (MTP) layers.
MTP_LAYER_KEYS = ("num_nextn_predict_layers", "mtp_num_hidden_layers", "num_mtp_layers")
# Methods that draft without layers of their own (no weights, no KV cache).
LAYERLESS_METHODS = ("ngram", "ngram_gpu", "suffix")


def _mtp_layers(config: dict) -> int:
    text = {**config, **config.get("text_config", {})}
    return int(next((text[k] for k in MTP_LAYER_KEYS if text.get(k)), 0) or 0)


def speculative_costs(config: dict, shape: ModelShape, element: int, bytes_per_token: int,
                      method: str | None, tokens: int, draft_dir: str | None, budget: int,
                      block_size: int, average: int, limit: int, seq_bytes,
                      from_gpu_memory: bool) -> dict:
    """What speculative decoding costs in KV cache and memory, and the concurrency left.

    `relevant` is set where the flags ask for speculation or the checkpoint carries MTP
    layers; the notes say what the operator should weigh.
    """
    mtp_layers = _mtp_layers(config)
    out: dict = {"method": method, "num_speculative_tokens": tokens,
                 "checkpoint_mtp_layers": mtp_layers, "relevant": False, "notes": []}
    if not method and not tokens:
        if mtp_layers:
            per_layer = capacity.kv_bytes_per_token(1, shape.num_kv_heads, shape.kv_head_dim,
                                                    element, mla=shape.mla)
            out["relevant"] = True
            out["notes"].append(
                f"this checkpoint carries {mtp_layers} multi-token-prediction layer(s): "
                f"speculative_config {{method: mtp, num_speculative_tokens: N}} drafts with "
                f"them for {mtp_layers * per_layer:,} more KV bytes per token and N lookahead "
                f"slots per running sequence (plan it with --speculative-method mtp "
                f"--num-speculative-tokens N)")
        return out
    if tokens < 1:
        raise UsageError("--num-speculative-tokens must be >= 1 with --speculative-method")
    method = method or ("draft_model" if draft_dir else "ngram")
    out["method"], out["relevant"] = method, True
    # draft_weights: bytes beyond the target's checkpoint; None where only files would tell.
    draft_weights: int | None = 0
    draft_per_token, source = 0, "none"
    if method in LAYERLESS_METHODS:
        source = "no draft layers (drafts are looked up in the prompt and output so far)"
    elif method == "mtp":
        layers = mtp_layers or 1
        draft_per_token = capacity.kv_bytes_per_token(layers, shape.num_kv_heads,
                                                      shape.kv_head_dim, element, mla=shape.mla)
        source = f"{layers} MTP layer(s) of the target's shape (weights in the checkpoint)"
    else:
        draft_shape = shape
        if draft_dir:
            draft_shape = model_shape(read_config(draft_dir),
                                      str(Path(draft_dir) / "config.json"))
            stored = checkpoint_weights(draft_dir)
            draft_weights = stored.total_bytes if stored is not None else (
                dense_parameter_count(draft_shape) * capacity.dtype_bytes(draft_shape.dtype))
            source = f"{draft_shape.num_layers} layer(s) of {draft_dir}"
        elif method == "draft_model":
            raise UsageError("--speculative-method draft_model needs --draft-model DIR")
        else:  # an EAGLE head: one decoder layer of the target's attention shape
            draft_shape = replace(shape, num_layers=1)
            draft_weights = None
            source = "one decoder layer of the target's shape (EAGLE head; --draft-model to " \
                     "size it from its files)"
        draft_per_token = capacity.kv_bytes_per_token(
            draft_shape.num_layers, draft_shape.num_kv_heads, draft_shape.kv_head_dim,
            element, mla=draft_shape.mla)
    spec_budget = max(budget - ((draft_weights or 0) if from_gpu_memory else 0), 0)

    def spec_seq_bytes(context: int) -> int:
        # The lookahead slots, within max_model_len (vLLM drafts no token beyond it).
        held = min(context + tokens, max(limit, context))
        return seq_bytes(held) + math.ceil(held / block_size) * block_size * draft_per_token

    per_token = bytes_per_token + draft_per_token
    blocks = spec_budget // (block_size * per_token)
    at_average = spec_budget // spec_seq_bytes(average)
    at_limit = spec_budget // spec_seq_bytes(limit)
    out.update({
        "lookahead_tokens_per_sequence": tokens,
        "draft_kv_bytes_per_token": draft_per_token, "draft_kv_source": source,
        "draft_weights_bytes": draft_weights,
        "kv_bytes_per_token_with_draft": per_token,
        "capacity_tokens": int(blocks * block_size),
        "max_seqs_at_avg_context": int(at_average),
        "max_seqs_at_max_model_len": int(at_limit),
    })
    without = budget // seq_bytes(average) if budget else 0
    notes = out["notes"]
    if draft_per_token or draft_weights:
        notes.append(f"speculative decoding ({method}, {tokens} tokens): the drafter's KV "
                     f"({draft_per_token:,} bytes/token) shares the block pool"
                     + (f" and its weights take {size(draft_weights)}" if draft_weights
                        else "") +
                     f"; {at_average:,} sequences of {average:,} tokens fit instead of "
                     f"{without:,}")
    else:
        notes.append(f"speculative decoding ({method}, {tokens} tokens): no draft weights or "
                     f"KV; each running sequence reserves {tokens} lookahead slots "
                     f"({at_average:,} sequences of {average:,} tokens fit instead of "
                     f"{without:,}); it pays off only where the output repeats the prompt "
                     f"(watch the acceptance rate: vllm_spec_decode_*)")
    if draft_weights and not from_gpu_memory:
        notes.append("the draft model's weights are not in --kv-cache-gib: give the engine "
                     f"{size(draft_weights)} more memory for them")
    return out


def _mamba_layers(config: dict) -> int:
    """Layers with a recurrent state instead of a KV cache (Mamba, linear attention)."""
    text = {**config, **config.get("text_config", {})}
    for key in ("layer_types", "layers_block_type"):
        types = text.get(key)
        if isinstance(types, list):
            return sum(1 for t in types if "mamba" in str(t) or "linear" in str(t))
    pattern = text.get("hybrid_override_pattern")
    if isinstance(pattern, str):
        return pattern.count("M")
    return 0


def prefix_cache_costs(config: dict, shape: ModelShape, bytes_per_token: int, enabled: bool,
                       shared_prefix_len: int | None, budget: int, block_size: int,
                       average: int, seq_bytes) -> dict:
    """What prefix caching saves and costs for this model and a shared prompt prefix."""
    mamba = _mamba_layers(config)
    out: dict = {"enabled": enabled, "shared_prefix_len": shared_prefix_len,
                 "recurrent_layers": mamba, "notes": []}
    notes = out["notes"]
    relevant = bool(shared_prefix_len) or not enabled or mamba or (
        shape.sliding_window and shape.sliding_layers)
    out["relevant"] = bool(relevant)
    if not enabled:
        notes.append("prefix caching is off: requests that share a prompt prefix prefill it "
                     "again each time (it costs no memory when on: cached blocks are free "
                     "blocks not yet reused)")
    if shared_prefix_len:
        cached = shared_prefix_len // block_size * block_size
        out["cached_tokens_per_request"] = cached if enabled else 0
        if enabled and cached:
            prefix_bytes = cached * bytes_per_token
            at_average = max(budget - prefix_bytes, 0) // seq_bytes(max(average - cached, 1))
            out["max_seqs_at_avg_context"] = int(at_average)
            notes.append(f"a shared prefix of {shared_prefix_len:,} tokens is cached in whole "
                         f"blocks: {cached:,} tokens per request are not prefilled again, and "
                         f"its {size(prefix_bytes)} of KV is held once for all sequences that "
                         f"share it ({at_average:,} sequences of {average:,} tokens fit)")
        elif enabled:
            notes.append(f"a shared prefix of {shared_prefix_len:,} tokens is shorter than one "
                         f"block ({block_size}): prefix caching never hits it")
    if enabled and shape.sliding_window and shape.sliding_layers:
        notes.append("sliding-window layers keep only the last window of a cached prefix: a "
                     "hit needs the prefix in every KV-cache group, so long prefixes hit at "
                     "the window's granularity")
    if enabled and mamba:
        notes.append(f"{mamba} recurrent (Mamba / linear-attention) layers keep one state per "
                     "sequence, not per token: caching their prefixes stores state copies at "
                     "block boundaries, memory that the KV figures here do not count")
    return out


def _kv_costs(shape: ModelShape, element: int) -> dict:
    per_layer = capacity.kv_bytes_per_token(1, shape.num_kv_heads, shape.kv_head_dim, element,
                                            mla=shape.mla)
    windowed_layers = shape.sliding_layers if shape.sliding_window else 0
    return {
        "bytes_per_token": capacity.kv_bytes_per_token(shape.num_layers, shape.num_kv_heads,
                                                       shape.kv_head_dim, element, mla=shape.mla),
        "bytes_per_token_per_layer": per_layer,
        "full_layers_bytes_per_token": per_layer * (shape.num_layers - windowed_layers),
        "windowed_layers_bytes_per_token": per_layer * windowed_layers,
        "sliding_window": shape.sliding_window,
        "windowed_layers": windowed_layers,
        "mla": shape.mla,
        "formula": ("layers x (kv_lora_rank + qk_rope_head_dim) x bytes" if shape.mla else
                    "2 x layers x kv_heads x head_dim x bytes"),
    }


def _weights(model_dir: str, shape: ModelShape, dtype: str, given: int | None) -> dict:
    if given is not None:
        return {"bytes": given, "source": "--weights-gib"}
    stored = checkpoint_weights(model_dir)
    if stored is not None:
        return {"bytes": stored.total_bytes, "source": "safetensors headers",
                "tensors": stored.tensors, "files": stored.files,
                "bytes_by_dtype": stored.bytes_by_dtype}
    params = dense_parameter_count(shape)
    return {"bytes": params * capacity.dtype_bytes(dtype), "source": "estimate from config.json",
            "parameters": params}


def _longest_sequence(budget: int, seq_bytes, block_size: int, limit: int) -> int:
    """The longest context (a whole number of blocks, at most `limit`) that fits in `budget`."""
    if seq_bytes(limit) <= budget:
        return limit
    low, high = 0, limit // block_size  # in blocks; low fits, high does not
    while high - low > 1:
        middle = (low + high) // 2
        if seq_bytes(middle * block_size) <= budget:
            low = middle
        else:
            high = middle
    return low * block_size


def _round_seqs(n: int) -> int:
    """A round max_num_seqs at or below n: a multiple of 8 from 8 upwards."""
    return n if n < 8 else n - n % 8


# --- comparison with a running daemon ---------------------------------------------------------

def daemon_engine(metrics_url: str) -> dict:
    """What the daemon exports about its engine's KV cache and configuration."""
    snapshot = daemon_view.scrape(metrics_url)
    if not snapshot.has("vllm_kv_cache_capacity_tokens"):
        raise UsageError(f"{metrics_url} exports no vllm_kv_cache_capacity_tokens: is it a "
                         "vllm-exporter daemon whose engine has started?")
    info = snapshot.labels_of("vllm_engine_config_info")
    return {
        "capacity_tokens": snapshot.value("vllm_kv_cache_capacity_tokens"),
        "bytes_per_token": snapshot.value("vllm_kv_cache_bytes_per_token"),
        "capacity_bytes": snapshot.value("vllm_kv_cache_capacity_bytes"),
        "block_size": snapshot.value("vllm_kv_cache_block_size_tokens"),
        "config": info[0] if info else {},
    }


def compare(plan: dict, engine: dict) -> dict:
    """How far the plan is from what the engine allocated (positive: the plan says more)."""
    planned_tokens = plan["capacity"]["tokens"]
    actual_tokens = engine["capacity_tokens"]
    planned_bytes = planned_tokens * plan["kv"]["bytes_per_token"]
    return {
        "engine": engine,
        "bytes_per_token": {"plan": plan["kv"]["bytes_per_token"],
                            "engine": engine["bytes_per_token"],
                            "equal": plan["kv"]["bytes_per_token"] == engine["bytes_per_token"]},
        "capacity_tokens": {"plan": planned_tokens, "engine": actual_tokens,
                            "difference": planned_tokens - actual_tokens,
                            "relative": ((planned_tokens - actual_tokens) / actual_tokens
                                         if actual_tokens else None)},
        "capacity_bytes": {"plan": planned_bytes, "engine": engine["capacity_bytes"],
                           "difference": planned_bytes - engine["capacity_bytes"]},
    }


def format_plan(plan: dict) -> str:
    shape, kv, capacity_, memory = plan["shape"], plan["kv"], plan["capacity"], plan["memory"]
    rows = [
        ["model", f"{shape['model_type']}: {shape['num_layers']} layers, "
                  f"{shape['num_attention_heads']} heads, {shape['num_kv_heads']} KV heads, "
                  f"head dim {shape['head_dim']}" + (" (MLA)" if shape["mla"] else "")],
        ["weights", f"{size(plan['weights']['bytes'])} ({plan['weights']['source']})"],
        ["KV dtype", f"{kv['dtype']} ({kv['element_bytes']} bytes)"],
        ["KV bytes per token", f"{kv['bytes_per_token']:,} ({kv['formula']})"],
    ]
    if kv["windowed_layers"]:
        rows.append(["sliding window", f"{kv['windowed_layers']} layers keep "
                                       f"{kv['sliding_window']:,} tokens"])
    if memory["source"] == "gpu memory":
        rows.append(["GPU memory", f"{size(memory['gpu_memory_bytes'])} x "
                                   f"{memory['gpu_memory_utilization']} = "
                                   f"{size(memory['usable_bytes'])}, minus weights and "
                                   f"{size(memory['overhead_bytes'])} overhead"])
    rows += [
        ["KV cache", f"{size(memory['kv_cache_bytes'])}"],
        ["KV capacity", f"{capacity_['tokens']:,} tokens ({capacity_['blocks']:,} blocks of "
                        f"{capacity_['block_size']})"],
        ["sequences at avg context", f"{capacity_['max_seqs_at_avg_context']:,} x "
                                     f"{capacity_['avg_context_len']:,} tokens"],
        ["sequences at max_model_len", f"{capacity_['max_seqs_at_max_model_len']:,} x "
                                       f"{capacity_['max_model_len']:,} tokens"],
        ["recommended max_model_len", plan["recommendation"]["max_model_len"]],
        ["recommended max_num_seqs", plan["recommendation"]["max_num_seqs"]],
    ]
    spec = plan.get("speculative") or {}
    if spec.get("lookahead_tokens_per_sequence"):
        rows += [
            ["speculative decoding", f"{spec['method']}, {spec['num_speculative_tokens']} "
                                     f"tokens: {spec['draft_kv_source']}"],
            ["  KV bytes per token", f"{spec['kv_bytes_per_token_with_draft']:,} (drafter "
                                     f"{spec['draft_kv_bytes_per_token']:,})"],
            ["  draft weights", "unknown (--draft-model DIR sizes them)"
             if spec["draft_weights_bytes"] is None else size(spec["draft_weights_bytes"])],
            ["  sequences at avg context", f"{spec['max_seqs_at_avg_context']:,}"],
            ["  sequences at max_model_len", f"{spec['max_seqs_at_max_model_len']:,}"],
        ]
    prefix = plan.get("prefix_cache") or {}
    if prefix.get("relevant"):
        rows.append(["prefix caching", "on" if prefix["enabled"] else "off"])
        if prefix.get("cached_tokens_per_request") is not None:
            rows.append(["  cached tokens per request",
                         f"{prefix['cached_tokens_per_request']:,} of "
                         f"{prefix['shared_prefix_len']:,} shared"])
        if prefix.get("max_seqs_at_avg_context") is not None:
            rows.append(["  sequences at avg context", f"{prefix['max_seqs_at_avg_context']:,}"])
    lines = [table(["plan", "value"], rows, left=2)]
    lines += [f"note: {n}" for n in plan["notes"]]
    if "daemon" in plan:
        d = plan["daemon"]
        rel = d["capacity_tokens"]["relative"]
        lines += ["", table(["compared with the daemon", "plan", "engine", "difference"], [
            ["KV bytes per token", d["bytes_per_token"]["plan"],
             int(d["bytes_per_token"]["engine"]),
             d["bytes_per_token"]["plan"] - int(d["bytes_per_token"]["engine"])],
            ["KV capacity (tokens)", d["capacity_tokens"]["plan"],
             int(d["capacity_tokens"]["engine"]),
             f"{d['capacity_tokens']['difference']:+,.0f}"
             + (f" ({rel:+.1%})" if rel is not None else "")],
        ] + [[f"{knob} (recommended / set)", plan["recommendation"][knob],
               d["engine"]["config"].get(knob) or None, None]
              for knob in ("max_model_len", "max_num_seqs")])]
    return "\n".join(lines)
