"""A tiny mixture-of-experts model, built locally, for the topologies that vLLM allows only for
MoE models (external load balancing with --data-parallel-size above 1).

Mixtral's shape, scaled down: hidden 256, 2 layers, 4 attention heads and 2 KV heads (head
dim 64), 4 experts of which 2 are used per token, vocabulary 512; random weights (about 4.5 MB).
It borrows the embedded default model's tokenizer. Built once per cache directory.

vLLM's CPU build cannot run an MoE model with data parallelism as shipped (its CPU communicator
lacks two collectives): `moe_data_parallel_env` puts testsupport/moe_dp/ (a sitecustomize that
adds them) on the PYTHONPATH of the vLLM processes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from exporter.default_model import build_once, cache_dir, ensure_default_model

MODEL_VERSION = "v1"  # bump when the shape changes, so caches rebuild
SHIM_DIR = Path(__file__).resolve().parent / "moe_dp"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def ensure_moe_model() -> Path:
    """The cached model directory, built first if missing."""
    return build_once(cache_dir().parent / f"moe-model-{MODEL_VERSION}", build_moe_model)


def moe_data_parallel_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with testsupport/moe_dp/ first on PYTHONPATH (see that directory's
    sitecustomize.py): for vLLM CPU-build processes that run an MoE model with
    --data-parallel-size above 1."""
    paths = [str(SHIM_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}


def build_moe_model(out: Path) -> Path:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    tokenizer_dir = ensure_default_model()
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=512, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=2048, bos_token_id=0, eos_token_id=1,
        tie_word_embeddings=False, torch_dtype="bfloat16",
    )
    model = MixtralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    return out
