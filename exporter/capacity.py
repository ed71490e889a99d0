"""KV-cache sizing arithmetic, shared by the capacity gauges and the `plan` command.

A token's KV cache holds, for every attention layer, one key and one value vector per KV head:
    bytes/token = 2 x layers x kv_heads x head_dim x dtype_bytes
Grouped-query attention shrinks kv_heads below the attention heads (the common snippet that uses
hidden_size overstates it by heads/kv_heads). Multi-head latent attention (MLA) stores one
compressed latent per layer instead of K and V, so the factor 2 and the heads drop out.
"""

from __future__ import annotations

DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float": 4,
    "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_inc": 1, "fp8_ds_mla": 1, "int8": 1,
}


def dtype_bytes(name: str) -> int:
    """Bytes per element for a dtype name as vLLM spells it ('torch.bfloat16' works too)."""
    key = str(name).lower().removeprefix("torch.")
    if key in DTYPE_BYTES:
        return DTYPE_BYTES[key]
    if key.startswith("fp8"):
        return 1
    raise ValueError(f"unknown dtype {name!r}")


def kv_cache_dtype_bytes(kv_cache_dtype: str | None, model_dtype: str) -> int:
    """The KV cache's element size: 'auto' (or unset) means the model's dtype."""
    if not kv_cache_dtype or kv_cache_dtype == "auto":
        return dtype_bytes(model_dtype)
    return dtype_bytes(kv_cache_dtype)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, element_bytes: int,
                       *, mla: bool = False) -> int:
    """KV-cache bytes one token costs across all layers of the model."""
    if mla:
        return num_layers * head_dim * element_bytes
    return 2 * num_layers * num_kv_heads * head_dim * element_bytes


def capacity_tokens(num_blocks: int, block_size: int) -> int:
    return num_blocks * block_size
