"""A tiny llama-architecture GGUF whose greedy choice is always a 300-byte token, written with
llama.cpp's own gguf-py (from the vendored tree). All its weights are zero, so every logit is
zero and greedy sampling takes token 0: the long one."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

LONG_PIECE = "ab" * 150          # 300 bytes: longer than any fixed piece buffer of 256
N_EMBD, N_HEAD, N_FF = 32, 4, 64


def write(path: Path, vendor: Path) -> Path:
    sys.path.insert(0, str(vendor / "gguf-py"))
    try:
        import gguf
    finally:
        sys.path.pop(0)
    tokens = [LONG_PIECE, "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["\u0120", "ab"]
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("long-token test model")
    w.add_context_length(256)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(1)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] + [gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * (n_vocab - 3))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)

    def zeros(*shape: int) -> np.ndarray:
        return np.zeros(shape, dtype=np.float32)

    w.add_tensor("token_embd.weight", zeros(n_vocab, N_EMBD))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    w.add_tensor("output.weight", zeros(n_vocab, N_EMBD))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor(f"blk.0.{name}.weight", zeros(N_EMBD, N_EMBD))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    w.add_tensor("blk.0.ffn_gate.weight", zeros(N_FF, N_EMBD))
    w.add_tensor("blk.0.ffn_up.weight", zeros(N_FF, N_EMBD))
    w.add_tensor("blk.0.ffn_down.weight", zeros(N_EMBD, N_FF))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
