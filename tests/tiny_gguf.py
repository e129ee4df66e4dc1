"""A tiny Gemma 3 GGUF file written with the `gguf` package: a SentencePiece-style vocabulary with
byte fallback and a two-layer model, its embedding quantised to Q8_0 like the packaged file's."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np

from tests.conftest import NOTES

HIDDEN, HEADS, HEAD_DIM, FFN, LAYERS = 64, 2, 32, 128, 2


def vocabulary() -> tuple[list[str], list[int]]:
    words = sorted({w.strip(string.punctuation).lower() for text in NOTES.values() for w in text.split()} - {""})
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [3, 3, 3, 2] + [6] * 256
    pieces = ["\u2581"] + list(string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation)
    pieces += [f"\u2581{w}" for w in words[:300]]
    for p in dict.fromkeys(pieces):
        tokens.append(p)
        types.append(1)
    return tokens, types


def write_tiny_gemma3_gguf(path: Path, seed: int = 0, output_norm: float = 0.0) -> Path:
    """`output_norm`: the final norm's stored weight (llama.cpp reads it as is; 0 makes every logit
    equal, so the model says nothing: give 1 where its answers must depend on its weights)."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens, types = vocabulary()
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(1)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_sliding_window(64)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    embed = rand(len(tokens), HIDDEN)
    w.add_tensor("token_embd.weight", gguf.quants.quantize(embed, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("output_norm.weight", np.full(HIDDEN, output_norm, np.float32))
    for i in range(LAYERS):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_q.weight", rand(HEADS * HEAD_DIM, HIDDEN))
        w.add_tensor(b + "attn_k.weight", rand(HEAD_DIM, HIDDEN))
        w.add_tensor(b + "attn_v.weight", rand(HEAD_DIM, HIDDEN))
        w.add_tensor(b + "attn_output.weight", rand(HIDDEN, HEADS * HEAD_DIM))
        w.add_tensor(b + "ffn_gate.weight", rand(FFN, HIDDEN))
        w.add_tensor(b + "ffn_up.weight", rand(FFN, HIDDEN))
        w.add_tensor(b + "ffn_down.weight", rand(HIDDEN, FFN))
        for norm, size in (("attn_norm", HIDDEN), ("ffn_norm", HIDDEN), ("post_attention_norm", HIDDEN), ("post_ffw_norm", HIDDEN), ("attn_q_norm", HEAD_DIM), ("attn_k_norm", HEAD_DIM)):
            w.add_tensor(b + norm + ".weight", np.ones(size, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
