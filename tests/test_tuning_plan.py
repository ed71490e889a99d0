"""`plan` against figures computed by hand from published model shapes, and bad input.

Hand arithmetic (bytes):
- Llama-2-7B (multi-head: 32 layers, 32 heads = 32 KV heads, head dim 4096/32 = 128, fp16):
  KV/token = 2 x 32 x 32 x 128 x 2 = 524,288 (the well-known 0.5 MiB per token).
  Parameters (published 6.74 B): embeddings + lm_head 2 x 32000 x 4096 = 262,144,000;
  per layer 4 x 4096^2 + 3 x 4096 x 11008 + 2 x 4096 = 202,383,360; x 32 = 6,476,267,520;
  final norm 4096; total 6,738,415,616 -> fp16 weights 13,476,831,232.
- Llama-3-8B (GQA: 8 KV heads of 32): KV/token = 2 x 32 x 8 x 128 x 2 = 131,072, a quarter of
  what the hidden_size formula (2 x 32 x 4096 x 2 = 524,288) claims.
  Parameters (published 8.03 B): 2 x 128256 x 4096 = 1,050,673,152; per layer
  4096 x 4096 x 2 (q, o) + 2 x 4096 x 1024 (k, v) + 3 x 4096 x 14336 + 2 x 4096 = 218,112,000;
  x 32 = 6,979,584,000; + 4096 = 8,030,261,248 -> bf16 16,060,522,496.
- Llama-2-7B AWQ (4-bit, group 128), as stored: a linear of in x out features keeps
  qweight in*out/2 + qzeros in*out/256 + scales in*out/64 bytes. Per layer the linears hold
  4 x 4096^2 + 3 x 4096 x 11008 = 202,375,168 weights -> 101,187,584 + 790,528 + 3,162,112 =
  105,140,224 bytes, + fp16 norms 16,384 = 105,156,608; x 32 = 3,365,011,456; fp16 embeddings
  and lm_head 524,288,000 + final norm 8,192 -> 3,889,307,648 (TheBloke's files: 3.89 GB).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.cli import main
from exporter.tuning.errors import UsageError
from exporter.tuning.model_files import checkpoint_weights, model_shape
from exporter.tuning.plan import make_plan

MODELS = Path(__file__).resolve().parent / "data" / "models"
GiB = 2**30


def _plan_json(capsys, *argv: str) -> tuple[int, dict]:
    code = main(["plan", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_multi_head_model_llama_2_7b(capsys):
    code, plan = _plan_json(capsys, str(MODELS / "llama-2-7b"), "--gpu-memory-gib", "80",
                            "--gpu-memory-utilization", "0.9", "--overhead-gib", "1",
                            "--avg-context-len", "1024")
    assert code == 0
    assert plan["kv"]["bytes_per_token"] == 524_288
    assert plan["weights"]["source"] == "estimate from config.json"
    assert plan["weights"]["parameters"] == 6_738_415_616
    assert plan["weights"]["bytes"] == 13_476_831_232
    # 80 GiB x 0.9 = 77,309,411,328; minus weights and 1 GiB: 62,758,838,272 for the cache.
    assert plan["memory"]["kv_cache_bytes"] == 62_758_838_272
    # Blocks of 16 tokens x 524,288 bytes = 8,388,608 bytes: 7,481 whole blocks.
    assert plan["capacity"]["blocks"] == 7_481
    assert plan["capacity"]["tokens"] == 119_696
    # 1024-token sequences cost 536,870,912 bytes: 116 fit; 4096-token ones: 29.
    assert plan["capacity"]["max_seqs_at_avg_context"] == 116
    assert plan["capacity"]["max_seqs_at_max_model_len"] == 29
    assert plan["recommendation"] == {"max_model_len": 4096, "max_num_seqs": 112,
                                      "gpu_memory_utilization": 0.9}


def test_gqa_model_llama_3_8b(capsys):
    code, plan = _plan_json(capsys, str(MODELS / "llama-3-8b"), "--gpu-memory-gib", "80",
                            "--max-model-len", "8192", "--avg-context-len", "2048")
    assert code == 0
    shape = plan["shape"]
    assert (shape["num_attention_heads"], shape["num_kv_heads"], shape["head_dim"]) == (32, 8, 128)
    assert plan["kv"]["bytes_per_token"] == 131_072
    assert plan["weights"]["parameters"] == 8_030_261_248
    # 77,309,411,328 - 16,060,522,496 - 1,073,741,824 = 60,175,147,008 bytes of cache;
    # 2048-token sequences cost 268,435,456 bytes: 224 fit (224.2). Blocks of 16 tokens cost
    # 2,097,152 bytes: 28,693 blocks = 459,088 tokens.
    assert plan["memory"]["kv_cache_bytes"] == 60_175_147_008
    assert plan["capacity"]["max_seqs_at_avg_context"] == 224
    assert plan["capacity"]["tokens"] == 459_088


def test_quantized_checkpoint_is_sized_from_its_safetensors_headers(capsys):
    code, plan = _plan_json(capsys, str(MODELS / "llama-2-7b-awq"), "--gpu-memory-gib", "24")
    assert code == 0
    weights = plan["weights"]
    assert weights["source"] == "safetensors headers"
    assert weights["bytes"] == 3_889_307_648
    assert weights["tensors"] == 32 * (7 * 3 + 2) + 3
    assert set(weights["bytes_by_dtype"]) == {"I32", "F16"}
    # The KV cache is fp16 whatever the weights are: same bytes/token as the fp16 model.
    assert plan["kv"]["bytes_per_token"] == 524_288
    # 24 GiB x 0.9 = 23,192,823,398 (rounded down) - 3,889,307,648 - 1 GiB.
    assert plan["memory"]["kv_cache_bytes"] == int(24 * GiB * 0.9) - 3_889_307_648 - GiB


def test_the_hidden_size_formula_would_overstate_gqa_fourfold():
    plan = make_plan(str(MODELS / "llama-3-8b"), kv_cache_bytes=GiB)
    naive = 2 * 32 * 4096 * 2
    assert naive / plan["kv"]["bytes_per_token"] == 4


def test_sliding_window_layers_hold_only_the_window(tmp_path):
    # Mistral-7B-v0.1 shape: every layer has a 4096-token window, 8 KV heads of 128.
    model = tmp_path / "mistral"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "sliding_window": 4096, "max_position_embeddings": 32768, "vocab_size": 32000,
        "torch_dtype": "bfloat16"}))
    plan = make_plan(str(model), kv_cache_bytes=64 * GiB, max_model_len=32768,
                     avg_context_len=16384)
    per_token = 2 * 32 * 8 * 128 * 2  # 131,072
    assert plan["kv"]["bytes_per_token"] == per_token
    assert plan["kv"]["windowed_layers"] == 32
    # A 16k-token sequence keeps only 4096 tokens in every layer.
    assert plan["capacity"]["max_seqs_at_avg_context"] == 64 * GiB // (4096 * per_token)
    assert plan["capacity"]["max_seqs_at_max_model_len"] == 64 * GiB // (4096 * per_token)
    # Half the layers windowed (Gemma-2 style layer_types): full layers pay per token.
    config = json.loads((model / "config.json").read_text())
    config["layer_types"] = ["sliding_attention", "full_attention"] * 16
    (model / "config.json").write_text(json.dumps(config))
    plan = make_plan(str(model), kv_cache_bytes=64 * GiB, max_model_len=32768,
                     avg_context_len=16384)
    half = per_token // 2
    assert plan["kv"]["windowed_layers"] == 16
    assert plan["capacity"]["max_seqs_at_avg_context"] == 64 * GiB // (16384 * half + 4096 * half)


def test_sliding_window_switched_off_is_ignored(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "sliding_window": 131072,
        "use_sliding_window": False, "max_window_layers": 28, "torch_dtype": "bfloat16"}))
    shape = model_shape(json.loads((tmp_path / "config.json").read_text()))
    assert (shape.sliding_window, shape.sliding_layers) == (None, 0)
    assert shape.head_dim == 128


def test_mla_stores_one_latent_per_token_and_layer(tmp_path):
    # DeepSeek-V2-Lite shape: 27 layers, kv_lora_rank 512, qk_rope_head_dim 64.
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "deepseek_v2", "hidden_size": 2048, "num_hidden_layers": 27,
        "num_attention_heads": 16, "num_key_value_heads": 16, "kv_lora_rank": 512,
        "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
        "n_routed_experts": 64, "torch_dtype": "bfloat16"}))
    plan = make_plan(str(tmp_path), kv_cache_bytes=GiB, weights_bytes=0, max_model_len=4096)
    assert plan["kv"]["mla"] is True
    assert plan["kv"]["bytes_per_token"] == 27 * (512 + 64) * 2
    # Without safetensors, an MoE/MLA model cannot be sized from config.json alone.
    with pytest.raises(UsageError, match="--weights-gib"):
        make_plan(str(tmp_path), kv_cache_bytes=GiB)


def test_fp8_kv_cache_halves_bytes_per_token():
    plan = make_plan(str(MODELS / "llama-3-8b"), kv_cache_bytes=GiB, kv_cache_dtype="fp8")
    assert plan["kv"]["bytes_per_token"] == 2 * 32 * 8 * 128 * 1


def test_a_model_that_does_not_fit_exits_1_and_says_why(capsys):
    code = main(["plan", str(MODELS / "llama-2-7b"), "--gpu-memory-gib", "12"])
    out = capsys.readouterr().out
    assert code == 1
    assert "do not leave any memory for the KV cache" in out


def test_a_cache_too_small_for_max_model_len_recommends_a_shorter_one():
    plan = make_plan(str(MODELS / "llama-2-7b"), kv_cache_bytes=GiB, block_size=16)
    # 1 GiB / 524,288 bytes = 2048 tokens: a 4096-token sequence does not fit.
    assert plan["fits"] is True
    assert plan["recommendation"]["max_model_len"] == 2048
    assert any("does not fit" in note for note in plan["notes"])


def test_readable_table(capsys):
    assert main(["plan", str(MODELS / "llama-3-8b"), "--gpu-memory-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "KV bytes per token" in out and "131,072" in out
    assert "recommended max_num_seqs" in out


@pytest.mark.parametrize("argv, message", [
    (["/no/such/model", "--gpu-memory-gib", "80"], "does not exist"),
    ([str(MODELS), "--gpu-memory-gib", "80"], "no config.json"),
    ([str(MODELS / "llama-2-7b")], "pass --gpu-memory-gib"),  # no NVML on this machine
    ([str(MODELS / "llama-2-7b"), "--gpu-memory-gib", "-3"], "must be > 0"),
    ([str(MODELS / "llama-2-7b"), "--gpu-memory-gib", "80", "--gpu-memory-utilization", "1.5"],
     "(0, 1]"),
    ([str(MODELS / "llama-2-7b"), "--kv-cache-gib", "1", "--kv-cache-dtype", "int3"],
     "unknown dtype"),
    ([str(MODELS / "llama-2-7b"), "--kv-cache-gib", "1", "--daemon", "http://127.0.0.1:9"],
     "not reachable"),
])
def test_bad_input_exits_2_with_a_clear_message(capsys, argv, message, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)  # NVML absent everywhere
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vllm-exporter plan: ") and message in err


def test_safetensors_header_reader_counts_every_file(tmp_path):
    import struct

    header = {"a": {"dtype": "F16", "shape": [3, 5], "data_offsets": [0, 30]},
              "b": {"dtype": "I32", "shape": [7], "data_offsets": [30, 58]},
              "__metadata__": {"format": "pt"}}
    raw = json.dumps(header).encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 58)
    weights = checkpoint_weights(tmp_path)
    assert (weights.total_bytes, weights.tensors) == (58, 2)
    assert weights.bytes_by_dtype == {"F16": 30, "I32": 28}
    (tmp_path / "broken.safetensors").write_bytes(b"\x05")
    with pytest.raises(UsageError, match="too short"):
        checkpoint_weights(tmp_path)
