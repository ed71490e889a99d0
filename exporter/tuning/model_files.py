"""What a model directory says about memory, read without loading a weight.

config.json gives the attention shape (layers, heads, KV heads, head dim, sliding windows,
MLA ranks); the safetensors headers give every tensor's dtype and byte range, so a quantized
checkpoint (AWQ/GPTQ int32-packed weights, fp16 scales) is sized as it is stored, not as its
parameter count times a dtype would suggest.

A safetensors file starts with an 8-byte little-endian header length, then that many bytes of
JSON: {"tensor name": {"dtype": "F16", "shape": [...], "data_offsets": [begin, end]}, ...,
"__metadata__": {...}}. Only that header is read.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format itself caps headers at 100 MB


@dataclass(frozen=True)
class ModelShape:
    """The part of config.json the KV-cache and weight arithmetic needs."""

    model_type: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int | None
    vocab_size: int | None
    max_position_embeddings: int | None
    dtype: str
    tie_word_embeddings: bool
    sliding_window: int | None  # tokens a windowed layer keeps per sequence
    sliding_layers: int  # how many layers use the window (the rest hold the whole context)
    mla: bool  # multi-head latent attention: one latent vector per token and layer
    kv_lora_rank: int | None
    qk_rope_head_dim: int | None
    quantization: dict | None
    num_experts: int | None

    @property
    def kv_head_dim(self) -> int:
        """The per-head (or, for MLA, per-token latent) width the KV cache stores."""
        if self.mla:
            return (self.kv_lora_rank or 0) + (self.qk_rope_head_dim or 0)
        return self.head_dim


@dataclass
class Weights:
    total_bytes: int
    source: str  # "safetensors" or "estimate"
    files: list[str] = field(default_factory=list)
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    tensors: int = 0


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise UsageError(f"model directory {model_dir} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UsageError(f"{model_dir} has no config.json: not a model directory")
    try:
        return json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{config_file}: cannot read it as JSON: {exc}") from None


def _first(config: dict, *names: str, default=None):
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return default


def model_shape(config: dict, where: str = "config.json") -> ModelShape:
    """The attention shape; multimodal configs keep the language model under text_config."""
    text = {**config, **config.get("text_config", {})} if "text_config" in config else config
    layers = _first(text, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(text, "num_attention_heads", "n_head")
    hidden = _first(text, "hidden_size", "n_embd", "d_model")
    if not (layers and heads and hidden):
        raise UsageError(f"{where}: needs num_hidden_layers, num_attention_heads and "
                         "hidden_size (or their GPT-2 names)")
    kv_heads = _first(text, "num_key_value_heads", "num_kv_heads", "n_head_kv")
    if kv_heads is None:
        kv_heads = 1 if text.get("multi_query") else heads
    head_dim = _first(text, "head_dim") or hidden // heads
    mla = text.get("kv_lora_rank") is not None
    window, windowed = _sliding_window(text, int(layers))
    dtype = str(_first(text, "torch_dtype", "dtype", default="float16"))
    return ModelShape(
        model_type=str(text.get("model_type", "unknown")),
        num_layers=int(layers), num_attention_heads=int(heads),
        num_kv_heads=1 if mla else int(kv_heads), head_dim=int(head_dim),
        hidden_size=int(hidden), intermediate_size=_first(text, "intermediate_size", "n_inner"),
        vocab_size=_first(text, "vocab_size"),
        max_position_embeddings=_first(text, "max_position_embeddings", "n_positions",
                                       "max_seq_len"),
        dtype=dtype.removeprefix("torch."),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
        sliding_window=window, sliding_layers=windowed, mla=mla,
        kv_lora_rank=text.get("kv_lora_rank"), qk_rope_head_dim=text.get("qk_rope_head_dim"),
        quantization=config.get("quantization_config") or text.get("quantization_config"),
        num_experts=_first(text, "num_local_experts", "num_experts", "n_routed_experts"),
    )


def _sliding_window(config: dict, layers: int) -> tuple[int | None, int]:
    """(window, number of windowed layers), from the conventions configs use."""
    window = config.get("sliding_window")
    if not window:
        return None, 0
    if config.get("use_sliding_window") is False:  # Qwen2: declared but switched off
        return None, 0
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list) and layer_types:  # Gemma 2/3, newer configs
        return int(window), sum(1 for t in layer_types[:layers] if "sliding" in str(t))
    if config.get("max_window_layers") is not None and config.get("use_sliding_window"):
        # Qwen2: layers from max_window_layers upwards use the window.
        return int(window), max(0, layers - int(config["max_window_layers"]))
    pattern = config.get("sliding_window_pattern")
    if isinstance(pattern, int) and pattern > 1:  # every pattern-th layer is global
        return int(window), layers - layers // pattern
    return int(window), layers  # Mistral 7B v0.1: every layer


def read_safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        raw_length = f.read(8)
        if len(raw_length) != 8:
            raise UsageError(f"{path}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", raw_length)
        if length > MAX_HEADER_BYTES:
            raise UsageError(f"{path}: header length {length} is not plausible")
        try:
            return json.loads(f.read(length))
        except ValueError as exc:
            raise UsageError(f"{path}: the safetensors header is not JSON: {exc}") from None


def checkpoint_weights(model_dir: str | Path) -> Weights | None:
    """Bytes of every tensor in the directory's *.safetensors files; None when there are none."""
    files = sorted(Path(model_dir).expanduser().glob("*.safetensors"))
    if not files:
        return None
    weights = Weights(0, "safetensors", [f.name for f in files])
    for path in files:
        for name, entry in read_safetensors_header(path).items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            weights.total_bytes += end - begin
            weights.bytes_by_dtype[entry["dtype"]] = (
                weights.bytes_by_dtype.get(entry["dtype"], 0) + end - begin)
            weights.tensors += 1
    return weights


def dense_parameter_count(shape: ModelShape) -> int:
    """Parameters of a dense Llama-style decoder (gated MLP, two norms per layer).

    Only for checkpoints without safetensors files; MoE and MLA models are refused because
    their projections do not follow this layout.
    """
    if shape.num_experts or shape.mla or not shape.intermediate_size or not shape.vocab_size:
        raise UsageError("no *.safetensors files, and this architecture cannot be sized from "
                         "config.json alone: pass --weights-gib")
    h, q_width = shape.hidden_size, shape.num_attention_heads * shape.head_dim
    kv_width = shape.num_kv_heads * shape.head_dim
    attention = h * q_width + 2 * h * kv_width + q_width * h
    mlp = 3 * h * shape.intermediate_size
    per_layer = attention + mlp + 2 * h
    embeddings = shape.vocab_size * h * (1 if shape.tie_word_embeddings else 2)
    return embeddings + shape.num_layers * per_layer + h
