"""The embedded default model: a tiny random-weight Llama and a byte-level BPE tokenizer.

It is built locally on first use (no download) and cached. It generates gibberish: it exists so
that the whole pipeline (engine, API, stats, metrics, alerts) runs on any machine with nothing
fetched. Shape: hidden 256, 4 attention heads, 2 KV heads (grouped-query attention, head dim
64), 2 layers, vocabulary 512, about 5 MB of weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

MODEL_VERSION = "v1"  # bump when the shape or tokenizer changes, so caches rebuild
SERVED_NAME = "vllm-exporter-default"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "vLLM serves large language models with paged attention and continuous batching.",
    "Prometheus scrapes metrics; Alertmanager routes alerts; Grafana draws dashboards.",
    "The quick brown fox jumps over the lazy dog while the engine decodes tokens.",
    "Latency, throughput and memory form the triangle that every operator tunes.",
    "Time to first token, inter-token latency and end-to-end latency matter to users.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}<>/-_+=*&%$#@",
]


def cache_dir() -> Path:
    root = os.environ.get("VLLM_EXPORTER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vllm-exporter")
    return Path(root) / f"default-model-{MODEL_VERSION}"


def ensure_default_model() -> Path:
    """The cached model directory, built first if missing."""
    return build_once(cache_dir(), _build)


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, made by `build(folder)` first if missing (atomic: built aside, then renamed,
    so concurrent callers never see half a model)."""
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first; theirs is as good as ours
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _build(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab_size = 512
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=2048, bos_token_id=0, eos_token_id=1,
        tie_word_embeddings=False, torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    (out / "vllm_exporter_model.json").write_text(json.dumps(
        {"what": "vllm-exporter embedded default model: random weights, generates gibberish",
         "version": MODEL_VERSION}, indent=2))
