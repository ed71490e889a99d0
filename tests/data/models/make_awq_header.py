"""Writes llama-2-7b-awq/model-0000{1,2}-of-00002.safetensors: safetensors HEADERS ONLY.

The tensors an AWQ (4-bit, group 128, GEMM layout) checkpoint of the Llama-2-7B shape stores:
per linear layer of in x out features, qweight int32 [in, out/8] (eight 4-bit weights per
int32), qzeros int32 [in/128, out/8] and scales float16 [in/128, out]; norms and embeddings in
float16. Each file holds the 8-byte header length and the JSON header, and no tensor data:
`plan` reads only headers. Split in two files like real sharded checkpoints.

Run from this directory: python make_awq_header.py
"""

import json
import struct
from pathlib import Path

HIDDEN, INTERMEDIATE, LAYERS, VOCAB, GROUP = 4096, 11008, 32, 32000, 128
DTYPE_BYTES = {"I32": 4, "F16": 2}


def tensors(first_layer: int, last_layer: int, embed: bool, head: bool):
    if embed:
        yield "model.embed_tokens.weight", "F16", [VOCAB, HIDDEN]
    linears = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
               "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
               "mlp.gate_proj": (HIDDEN, INTERMEDIATE), "mlp.up_proj": (HIDDEN, INTERMEDIATE),
               "mlp.down_proj": (INTERMEDIATE, HIDDEN)}
    for layer in range(first_layer, last_layer):
        prefix = f"model.layers.{layer}."
        for name, (fan_in, fan_out) in linears.items():
            yield prefix + name + ".qweight", "I32", [fan_in, fan_out // 8]
            yield prefix + name + ".qzeros", "I32", [fan_in // GROUP, fan_out // 8]
            yield prefix + name + ".scales", "F16", [fan_in // GROUP, fan_out]
        yield prefix + "input_layernorm.weight", "F16", [HIDDEN]
        yield prefix + "post_attention_layernorm.weight", "F16", [HIDDEN]
    if head:
        yield "model.norm.weight", "F16", [HIDDEN]
        yield "lm_head.weight", "F16", [VOCAB, HIDDEN]


def write_header(path: Path, entries) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in entries:
        size = DTYPE_BYTES[dtype]
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads headers to 8 bytes
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "llama-2-7b-awq"
    write_header(out / "model-00001-of-00002.safetensors", tensors(0, 16, True, False))
    write_header(out / "model-00002-of-00002.safetensors", tensors(16, LAYERS, False, True))
