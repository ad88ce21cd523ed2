"""Checks on a GGUF file's hyperparameters that llama.cpp makes with GGML_ASSERT (which aborts
the process) instead of an error: done first, so a bad file is an InvalidModelError.

They mirror llama.cpp's load_hparams (src/llama-model.cpp) and the eps asserts of its norm
kernels (ggml-cpu/ops.cpp) at the pinned release; the GGUF fuzz run (tests/gguf_fuzz.py)
is how they were found. Pure Python: the values come from ggml's own GGUF reader.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

MAX_LAYERS = 512      # LLAMA_MAX_LAYERS (src/llama-hparams.h)
MAX_EXPERTS = 1024    # LLAMA_MAX_EXPERTS
POOLING_TYPES = range(0, 5)   # enum llama_pooling_type: none, mean, cls, last, rank
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")   # LLAMA_ROPE_SCALING_TYPES


def vocab_problems(kv: Mapping[str, object]) -> list[str]:
    """What llama.cpp's vocabulary loader would abort on (it maps each token string to one id)."""
    tokens = kv.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        return []
    if len(set(tokens)) == len(tokens) and b"" not in tokens:   # the common case, at C speed
        return []
    seen: dict[bytes, int] = {}
    for i, tok in enumerate(tokens):
        tok = tok or f"[EMPTY_{i}]".encode()   # what llama.cpp names an empty token
        if tok in seen:
            return [f"tokenizer.ggml.tokens has {tok!r} twice (ids {seen[tok]} and {i}); "
                    "every token string must be unique"]
        seen[tok] = i
    return []


def problems(kv: Mapping[str, object], arch: str) -> list[str]:
    """What llama.cpp would abort on, as messages naming the key; empty if nothing."""
    out: list[str] = []

    def num(name: str, default: int = 0) -> int:
        v = kv.get(f"{arch}.{name}", default)
        return v if isinstance(v, int) else default

    n_layer = kv.get(f"{arch}.block_count")
    if isinstance(n_layer, int) and not 0 < n_layer <= MAX_LAYERS:
        out.append(f"{arch}.block_count is {n_layer}; it must be 1..{MAX_LAYERS}")
        return out   # the checks below count layers
    layers = n_layer if isinstance(n_layer, int) else 0
    if num("nextn_predict_layers") > layers:
        out.append(f"{arch}.nextn_predict_layers is {num('nextn_predict_layers')}; more than block_count {layers}")
    for sub in ("posnet", "convnext"):
        if arch == "wavtokenizer-dec" and num(f"{sub}.block_count") > layers:
            out.append(f"{arch}.{sub}.block_count is {num(f'{sub}.block_count')}; more than block_count {layers}")

    n_expert = num("expert_count")
    used = kv.get(f"{arch}.expert_used_count", 0)
    used_max = max(used[:layers], default=0) if isinstance(used, list) else used if isinstance(used, int) else 0
    groups, group_used = num("expert_group_count"), num("expert_group_used_count")
    if arch in ("hunyuan-vl", "hunyuan-dense") and n_expert <= 1:
        n_expert = used_max = 0
    if n_expert > MAX_EXPERTS:
        out.append(f"{arch}.expert_count is {n_expert}; at most {MAX_EXPERTS}")
    elif used_max > n_expert:
        out.append(f"{arch}.expert_used_count is {used_max}; more than expert_count {n_expert}")
    elif n_expert > 0:
        if used_max <= 0:
            out.append(f"{arch}.expert_used_count is {used_max}; a model with experts must use some")
        elif groups >= n_expert:
            out.append(f"{arch}.expert_group_count is {groups}; it must be below expert_count {n_expert}")
        elif groups > 1 and (n_expert % groups or not 0 < group_used < groups):
            out.append(f"{arch}.expert_group_count {groups} / expert_group_used_count {group_used} "
                       f"do not divide expert_count {n_expert}")
    elif groups != 0:
        out.append(f"{arch}.expert_group_count is {groups} in a model without experts")

    pooling = kv.get(f"{arch}.pooling_type")
    if isinstance(pooling, int) and pooling not in POOLING_TYPES:
        out.append(f"{arch}.pooling_type is {pooling}; llama.cpp knows 0..{POOLING_TYPES[-1]}")
    rope = kv.get(f"{arch}.rope.scaling.type")
    if isinstance(rope, str) and rope not in ROPE_SCALING_TYPES:
        out.append(f"{arch}.rope.scaling.type is {rope!r}; llama.cpp knows {', '.join(ROPE_SCALING_TYPES)}")
    for key, value in kv.items():
        if key.endswith(("epsilon", ".eps")) and isinstance(value, float) \
                and not (math.isfinite(value) and value >= 0):
            out.append(f"{key} is {value}; it must be a finite number >= 0")
    return out
