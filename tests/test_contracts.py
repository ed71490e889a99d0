"""Names are contracts: metric families follow the conventions, match what the code registers,
and every metric, config key and flag is documented."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from exporter.catalog import all_families
from exporter.cli import build_parser
from exporter.config import Config, load_config
from exporter.daemon import vllm_argv
from exporter.docs import metrics_markdown
from exporter.engine_settings import ENGINE_SETTINGS
from exporter.metrics import FAMILIES
from exporter.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FORBIDDEN_LABELS = {"request_id", "prompt", "user", "text", "id", "trace_id"}


@pytest.mark.parametrize("family", all_families(), ids=lambda f: f.name)
def test_family_follows_prometheus_conventions(family):
    assert re.fullmatch(r"[a-z][a-z0-9_]*", family.name), "lower-case, no colons"
    assert family.name.startswith("vllm_"), "our namespace (GPU families: vllm_gpu_)"
    assert family.kind in ("counter", "gauge", "histogram", "info")
    if family.kind == "counter":
        assert family.name.endswith("_total")
    else:
        assert not family.name.endswith("_total")
    assert (family.kind == "info") == family.name.endswith("_info")
    assert not re.search(r"_(ms|milliseconds|kb|mb|gb|percent|mhz)(_|$)", family.name), \
        "base units only (seconds, bytes, ratio, hertz)"
    assert not FORBIDDEN_LABELS & set(family.labels), "labels must be bounded"
    assert family.help and (family.help[0].isupper() or family.help[0].isdigit())


def test_names_are_unique():
    names = [f.name for f in all_families()]
    assert len(names) == len(set(names))


def test_registered_engine_families_match_the_specs():
    rt = Runtime(load_config(None, {"gpu.enabled": False}), mode="daemon")
    rt.attach_stat_logger("m", [0])
    try:
        exposed = {family.name: family for family in rt.registry.collect()}
        for spec in FAMILIES:
            base = spec.client_name if spec.kind in ("counter",) else spec.name
            assert base in exposed, f"{spec.name} is specified but not registered"
            assert exposed[base].type == {"info": "gauge"}.get(spec.kind, spec.kind)
            assert exposed[base].documentation == spec.help
            for sample in exposed[base].samples:
                labels = set(sample.labels) - {"le"}
                assert labels == set(spec.labels), (spec.name, labels)
        text = generate_latest(rt.registry).decode()
        assert ":" not in "".join(line.split("{")[0] for line in text.splitlines()
                                  if not line.startswith("#"))
    finally:
        rt.stop()


ENGINE_KEYS = (
    "model", "served_model_name", "quantization", "dtype", "kv_cache_dtype",
    "gpu_memory_utilization", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
    "block_size", "enable_prefix_caching", "enable_chunked_prefill", "tensor_parallel_size",
    "pipeline_parallel_size", "data_parallel_size", "api_server_count", "seed",
    "kv_cache_metrics", "kv_cache_metrics_sample", "enable_mfu_metrics",
)
ENGINE_CONFIG_INFO_LABELS = (
    "model", "served_model_name", "vllm_version", "quantization", "dtype", "kv_cache_dtype",
    "gpu_memory_utilization", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
    "block_size", "enable_prefix_caching", "enable_chunked_prefill", "tensor_parallel_size",
    "pipeline_parallel_size", "data_parallel_size", "seed", "device",
    "kv_cache_metrics", "enable_mfu_metrics", "speculative_method", "num_speculative_tokens",
)


def test_engine_settings_keep_their_public_names():
    """Everything derived from engine_settings.ENGINE_SETTINGS: config keys, flags, the
    config-info labels (in order) and the flags passed to vLLM."""
    assert tuple(f.name for f in dataclasses.fields(Config().engine)) == \
        ENGINE_KEYS + ("extra_args",)
    parser = build_parser()
    for key in ENGINE_KEYS:
        flag = "--" + key.replace("_", "-")
        boolean = key.startswith("enable_") or key == "kv_cache_metrics"
        args = vars(parser.parse_args(["serve", flag] if boolean else ["serve", flag, "1"]))
        assert args[f"engine.{key}"] in (True, 1, 1.0, "1"), flag
    args = vars(parser.parse_args(["serve", "--no-enable-prefix-caching"]))
    assert args["engine.enable_prefix_caching"] is False
    assert next(f for f in FAMILIES if f.name == "vllm_engine_config_info").labels == \
        ENGINE_CONFIG_INFO_LABELS
    config = load_config(None, {f"engine.{key}": value for key, value in (
        ("max_num_seqs", 8), ("enable_chunked_prefill", False), ("api_server_count", 1),
        ("gpu_memory_utilization", 0.5))})
    assert vllm_argv(config, "/m", "m") == [
        "--model", "/m", "--served-model-name", "m", "--host", "127.0.0.1", "--port", "8000",
        "--gpu-memory-utilization", "0.5", "--max-num-seqs", "8", "--no-enable-chunked-prefill",
        "--api-server-count", "1"]
    assert [s.name for s in ENGINE_SETTINGS if s.type is not None] == list(ENGINE_KEYS)


def test_metrics_reference_is_generated_from_the_code():
    committed = (DOCS / "metrics.md").read_text()
    assert committed == metrics_markdown(), \
        "docs/metrics.md is stale: run vllm-exporter docs metrics --out docs/metrics.md"


def _config_paths(cls: type, prefix: str = "") -> list[str]:
    paths = []
    for field in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[field.name]
        path = prefix + field.name
        if dataclasses.is_dataclass(hint):
            paths += _config_paths(hint, path + ".")
        else:
            paths.append(path)
    return paths


def test_every_config_key_is_documented():
    docs = {"gpu": (DOCS / "gpu.md").read_text(), "alerts": (DOCS / "alerts.md").read_text()}
    general = (DOCS / "configuration.md").read_text()
    missing = []
    for path in _config_paths(Config):
        section, _, rest = path.partition(".")
        if section in docs:
            leaf = rest.split(".")[-1]
            if f"`{leaf}`" not in docs[section] and f"`{rest}`" not in docs[section]:
                missing.append(path)
        elif f"`{path}`" not in general and f"`{path.split('.')[-1]}`" not in general:
            missing.append(path)
    assert not missing, f"undocumented config keys: {missing}"


def test_every_serve_flag_is_documented():
    general = (DOCS / "configuration.md").read_text()
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = [option for action in serve._actions for option in action.option_strings
             if option.startswith("--") and option != "--help"]
    missing = [flag for flag in flags if flag not in general]
    assert not missing, f"undocumented flags: {missing}"
