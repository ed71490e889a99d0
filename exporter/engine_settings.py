"""The engine's settings, declared once.

Each row of `ENGINE_SETTINGS` is one thing the operator sets or sees about the engine. The rest
of the package derives from this table, so a new setting is one new row:

- config.EngineConfig has a field per setting (`engine.<name>` in the config file), with the
  row's default and validity check;
- cli.py has a flag per setting (`--<name-with-dashes>`; booleans also get `--no-...`);
- daemon.vllm_argv passes the settings marked `to_vllm` to vLLM as the same flag;
- vllm_engine_config_info has a label per row marked `info_label`, in table order, and
  vllm_compat.engine_config_labels reads its value from the `vllm` path of vLLM's VllmConfig.

Rows without a `type` are info labels only (not settable: vLLM's version, the device).
Flag, config key and label names are public contracts (tests/test_contracts.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

# A setting's check: a problem with the value, or None when it is fine (None values are vLLM's
# default and are never checked).
Check = Callable[[Any], "str | None"]


def positive(value: Any) -> str | None:
    return None if value > 0 else f"must be a positive integer, got {value}"


def fraction(value: Any) -> str | None:
    return None if 0 < value <= 1 else f"must be in (0, 1], got {value}"


@dataclass(frozen=True)
class EngineSetting:
    name: str  # config field and key (engine.<name>), flag (--<name-with-dashes>), label
    type: type | None  # str | int | float | bool; None: an info label only, not a setting
    vllm: str = ""  # attribute path in vLLM's VllmConfig the label reads ("": set otherwise)
    info_label: bool = True  # a label of vllm_engine_config_info
    to_vllm: bool = True  # passed to vLLM as its flag of the same name (when not None)
    check: Check | None = None
    default: Any = None  # None: vLLM's own default
    unset: str = ""  # the label's value when vLLM's config has none

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def config_key(self) -> str:
        return "engine." + self.name


ENGINE_SETTINGS: tuple[EngineSetting, ...] = (
    # None: the embedded default model (default_model.py). The daemon passes the resolved model
    # and served name to vLLM itself; the `model` label is the served model name.
    EngineSetting("model", str, to_vllm=False),
    EngineSetting("served_model_name", str, "model_config.served_model_name", to_vllm=False),
    EngineSetting("vllm_version", None),
    EngineSetting("quantization", str, "model_config.quantization", unset="none"),
    EngineSetting("dtype", str, "model_config.dtype"),
    EngineSetting("kv_cache_dtype", str, "cache_config.cache_dtype"),
    EngineSetting("gpu_memory_utilization", float, "cache_config.gpu_memory_utilization",
                  check=fraction),
    EngineSetting("max_model_len", int, "model_config.max_model_len", check=positive),
    EngineSetting("max_num_seqs", int, "scheduler_config.max_num_seqs", check=positive),
    EngineSetting("max_num_batched_tokens", int, "scheduler_config.max_num_batched_tokens",
                  check=positive),
    EngineSetting("block_size", int, "cache_config.block_size", check=positive),
    EngineSetting("enable_prefix_caching", bool, "cache_config.enable_prefix_caching"),
    EngineSetting("enable_chunked_prefill", bool, "scheduler_config.enable_chunked_prefill"),
    EngineSetting("tensor_parallel_size", int, "parallel_config.tensor_parallel_size",
                  check=positive),
    EngineSetting("pipeline_parallel_size", int, "parallel_config.pipeline_parallel_size",
                  check=positive),
    # Data-parallel engine ranks, and API-server processes in front of them (vLLM's default:
    # one per data-parallel rank). Several API servers run as vLLM's own launcher runs them,
    # one shared metrics endpoint for all (docs/topologies.md).
    EngineSetting("data_parallel_size", int, "parallel_config.data_parallel_size",
                  check=positive, unset="1"),
    EngineSetting("api_server_count", int, info_label=False, check=positive),
    EngineSetting("seed", int, "model_config.seed"),
    EngineSetting("device", None, "device_config.device_type"),
    # vLLM's opt-in statistics (off unless set): KV-cache block residency, sampled over a
    # fraction of the blocks, and estimated FLOPs / memory traffic per GPU (MFU). Each costs
    # the engine some bookkeeping per step, which is why vLLM leaves them off.
    EngineSetting("kv_cache_metrics", bool, "observability_config.kv_cache_metrics"),
    EngineSetting("kv_cache_metrics_sample", float,
                  "observability_config.kv_cache_metrics_sample", info_label=False,
                  check=fraction),
    EngineSetting("enable_mfu_metrics", bool, "observability_config.enable_mfu_metrics"),
    # Speculative decoding, as configured through extra_args.speculative_config.
    EngineSetting("speculative_method", None, "speculative_config.method", unset="none"),
    EngineSetting("num_speculative_tokens", None,
                  "speculative_config.num_speculative_tokens", unset="0"),
)

# The settings the operator can set (config keys and flags), in table order.
SETTABLE: tuple[EngineSetting, ...] = tuple(s for s in ENGINE_SETTINGS if s.type is not None)
# The labels of vllm_engine_config_info, in table order.
ENGINE_CONFIG_LABELS: tuple[str, ...] = tuple(s.name for s in ENGINE_SETTINGS if s.info_label)
