"""A BERT-family sentence-transformers folder to GGUF, without PyTorch.

What llama.cpp's ``convert_hf_to_gguf.py`` does for ``BertModel`` (conversion/bert.py and
base.py in the vendored tree), written over llama.cpp's own ``gguf`` package (its writer, its
tensor-name map, its special-token reader and its q8_0 quantizer) and ``safetensors``' numpy
reader. The differences are named where they are: the vocabulary comes from the folder's
``tokenizer.json`` (or ``vocab.txt``) instead of ``transformers.AutoTokenizer``.

Used by :func:`mullama.models.convert`, which owns caching and atomic writes; this module only
reads a folder and writes one file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import InvalidArgumentError, InvalidModelError, ModelNotFoundError

__all__ = ["OUTTYPES", "DEFAULT_OUTTYPE", "check_outtype", "convert_bert_folder", "read_config"]

# Weight types of the converted file. f16 is the default: its vectors are as close to
# sentence-transformers' as f32's (least cosine 0.999999 over the reference sentences) at half the
# size; q8_0 is smaller again but drifts (0.99923); bf16 keeps f16's size at a least cosine of
# 0.99998. None was clearly faster than f16 on both of this project's CPUs (benchmarks/NOTES.md,
# "The embedding model's weight type").
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_OUTTYPE = "f16"

# The architectures of config.json that are BERT as llama.cpp's BERT graph computes it. Other
# BERT relatives (RoBERTa, XLM-R, NomicBERT, JinaBERT, ModernBERT) need their own graphs,
# vocabularies or position handling, so they are refused rather than converted wrongly.
BERT_ARCHITECTURES = ("BertModel", "BertForMaskedLM")


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:  # a dependency of mullama; only a broken install lacks it
        raise ModelNotFoundError(
            f"converting a model needs llama.cpp's gguf package ({exc}); pip install 'gguf==0.19.0'"
        ) from None
    return gguf


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a BERT folder, checked; raises a MullamaError naming the file otherwise."""
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder}: no such folder; give the folder of a sentence-transformers model")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"{config_path}: missing; a Hugging Face model folder has a config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidModelError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidModelError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    architectures = config.get("architectures") or ["BertModel"]
    if model_type != "bert" or not all(a in BERT_ARCHITECTURES for a in architectures):
        raise InvalidModelError(
            f"{config_path}: model_type {model_type!r}, architectures {architectures}: not a BERT model; "
            f"mullama converts BERT-family sentence-transformers models (model_type 'bert', "
            f"architectures {', '.join(BERT_ARCHITECTURES)}). For other models use a GGUF file"
        )
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise InvalidModelError(
            f"{config_path}: position_embedding_type {config['position_embedding_type']!r} is not supported "
            "by llama.cpp's BERT graph (only 'absolute')"
        )
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise InvalidModelError(f"{config_path}: {key} is {value!r}, expected a positive integer")
    return config


def _read_vocab(folder: Path) -> tuple[list[str], list[int], dict[str, Any]]:
    """(tokens, token types, the tokenizer.json normalizer) in id order, as BertModel.set_vocab
    gets them from AutoTokenizer: added special tokens are CONTROL, the rest NORMAL."""
    gguf = _gguf()
    tokenizer_path = folder / "tokenizer.json"
    vocab: dict[str, int]
    special: set[str] = set()
    normalizer: dict[str, Any] = {}
    if tokenizer_path.is_file():
        try:
            tokenizer = json.loads(tokenizer_path.read_text(encoding="utf-8"))
            model = tokenizer["model"]
            if model.get("type") != "WordPiece":
                raise InvalidModelError(
                    f"{tokenizer_path}: tokenizer model {model.get('type')!r}; a BERT model has a WordPiece one"
                )
            vocab = dict(model["vocab"])
            special = {t["content"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
            normalizer = tokenizer.get("normalizer") or {}
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise InvalidModelError(f"{tokenizer_path}: not a tokenizers JSON file ({exc!r})") from None
    else:
        vocab_path = folder / "vocab.txt"
        if not vocab_path.is_file():
            raise ModelNotFoundError(f"{folder}: neither tokenizer.json nor vocab.txt; the vocabulary is needed")
        lines = vocab_path.read_text(encoding="utf-8").splitlines()
        vocab = {tok: i for i, tok in enumerate(lines)}
        special = {t for t in vocab if t.startswith("[") and t.endswith("]") and t[1:-1].isupper()}
    n_vocab = max(vocab.values()) + 1 if vocab else 0
    if n_vocab == 0 or len(set(vocab.values())) != len(vocab):
        raise InvalidModelError(f"{folder}: the vocabulary is empty or gives two tokens one id")
    reverse = {i: tok for tok, i in vocab.items()}
    tokens: list[str] = []
    toktypes: list[int] = []
    for i in range(n_vocab):
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            toktypes.append(gguf.TokenType.UNUSED)
        elif tok in special:
            tokens.append(tok)
            toktypes.append(gguf.TokenType.CONTROL)
        else:
            # llama.cpp's WPM tokenizer reads a phantom-space vocabulary: word starts carry
            # U+2581, continuations lose their "##" (as BertModel.set_vocab writes it).
            tokens.append(tok[2:] if tok.startswith("##") else "\u2581" + tok)
            toktypes.append(gguf.TokenType.NORMAL)
    return tokens, toktypes, normalizer


def _normalizer_flags(normalizer: dict[str, Any]) -> tuple[bool | None, bool | None]:
    """(lowercase, strip_accents) of a BertNormalizer, as the newer gguf-py's SpecialVocab reads them."""
    kind = normalizer.get("type")
    if kind == "BertNormalizer":
        return normalizer.get("lowercase"), normalizer.get("strip_accents")
    if kind == "Sequence":
        lower = strip = None
        for sub in normalizer.get("normalizers", []):
            sub_lower, sub_strip = _normalizer_flags(sub)
            lower = sub_lower if sub_lower is not None else lower
            strip = sub_strip if sub_strip is not None else strip
        return lower, strip
    if kind == "Lowercase":
        return True, None
    if kind == "StripAccents":
        return None, True
    return None, None


def _pooling_type(folder: Path) -> Any:
    """The pooling of modules.json's Pooling module, as TextModel._try_set_pooling_type reads it."""
    gguf = _gguf()
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return None
    try:
        modules = json.loads(modules_path.read_text(encoding="utf-8"))
        path = next((m["path"] for m in modules if str(m["type"]).endswith("Pooling")), None)
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidModelError(f"{modules_path}: not a sentence-transformers modules.json ({exc!r})") from None
    if path is None:
        return None
    pooling_path = folder / path / "config.json"
    try:
        pooling = json.loads(pooling_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidModelError(f"{pooling_path}: the pooling config named by modules.json cannot be read ({exc})") from None
    if pooling.get("pooling_mode_mean_tokens"):
        return gguf.PoolingType.MEAN
    if pooling.get("pooling_mode_cls_token"):
        return gguf.PoolingType.CLS
    if pooling.get("pooling_mode_lasttoken"):
        return gguf.PoolingType.LAST
    raise InvalidModelError(f"{pooling_path}: only mean, CLS and last-token pooling are supported by llama.cpp")


def _check_safetensors(path: Path) -> None:
    """Refuse a truncated or malformed file before any tensor is read: the header's offsets must
    fit the file (safetensors' own check says less about which file and why)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as exc:
        raise InvalidModelError(f"{path}: not a safetensors file ({exc})") from None
    if 8 + n + end > size:
        raise InvalidModelError(
            f"{path}: truncated: its header places tensor data up to byte {8 + n + end}, "
            f"but the file has {size} bytes; download it again"
        )


def check_outtype(outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise InvalidArgumentError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")


def convert_bert_folder(folder: Path, out: Path, outtype: str = DEFAULT_OUTTYPE, name: str | None = None) -> None:
    """Write ``folder`` (a BERT sentence-transformers model) to ``out`` as GGUF of ``outtype``.

    ``out`` is written in place; the caller writes to a temporary name and renames."""
    check_outtype(outtype)
    gguf = _gguf()
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as exc:
        raise ModelNotFoundError(f"converting a model needs the safetensors package ({exc})") from None

    config = read_config(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ModelNotFoundError(f"{weights}: missing; mullama converts safetensors weights (no PyTorch .bin)")
    _check_safetensors(weights)
    tokens, toktypes, normalizer = _read_vocab(folder)
    if config.get("vocab_size", len(tokens)) != len(tokens):
        raise InvalidModelError(
            f"{folder / 'config.json'}: vocab_size {config['vocab_size']} but the tokenizer has {len(tokens)} tokens"
        )

    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    n_layer = config["num_hidden_layers"]
    arch = gguf.MODEL_ARCH.BERT
    tensor_map = gguf.get_tensor_name_map(arch, n_layer)
    keep_f32 = {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD] + ".weight",
                gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_TYPES] + ".weight"}

    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or folder.name)
        writer.add_block_count(n_layer)
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_embedding_length(config["hidden_size"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(config["num_attention_heads"])
        writer.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-12)))
        writer.add_causal_attention(False)
        writer.add_file_type(ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if (pooling := _pooling_type(folder)) is not None:
            writer.add_pooling_type(pooling)

        writer.add_token_type_count(config.get("type_vocab_size", 1))
        writer.add_tokenizer_model("bert")
        # llama.cpp reads no pre-tokenizer for a WordPiece vocabulary (its WPM tokenizer splits
        # by its own rules); convert_hf_to_gguf writes a hash-derived name that changes nothing.
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(toktypes)
        # No "cls": gguf has no key for it (llama.cpp takes [CLS] as BOS, which SpecialVocab
        # reads from the tokenizer's post-processor).
        special = gguf.SpecialVocab(folder, n_vocab=len(tokens),
                                    special_token_types=("bos", "eos", "unk", "sep", "pad", "mask"))
        special.add_to_gguf(writer, quiet=True)
        lowercase, strip_accents = _normalizer_flags(normalizer)
        # gguf 0.19.0 has no helper for these keys yet; the names are llama-arch.cpp's.
        if lowercase is not None:
            writer.add_bool("tokenizer.ggml.normalizer.lowercase", bool(lowercase))
        if strip_accents is not None:
            writer.add_bool("tokenizer.ggml.normalizer.strip_accents", bool(strip_accents))

        try:
            with safe_open(str(weights), framework="numpy") as st:
                for hf_name in st.keys():
                    add_tensor(writer, gguf, tensor_map, keep_f32, qtype, weights, hf_name, st)
        except SafetensorError as exc:
            raise InvalidModelError(f"{weights}: cannot be read ({exc})") from None
        mapped = {n for split in writer.tensors for n in split}
        for key in (gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.POS_EMBD):
            if gguf.TENSOR_NAMES[key] + ".weight" not in mapped:
                raise InvalidModelError(f"{weights}: no tensor maps to {gguf.TENSOR_NAMES[key]}; not a complete BERT model")

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def add_tensor(writer: Any, gguf: Any, tensor_map: Any, keep_f32: set[str], qtype: Any,
               weights: Path, hf_name: str, st: Any) -> None:
    """One safetensors tensor into the writer, renamed and typed as BertModel.prepare_tensors does."""
    name = hf_name.removeprefix("bert.")
    if name.endswith(".gamma"):
        name = name[: -len(".gamma")] + ".weight"
    elif name.endswith(".beta"):
        name = name[: -len(".beta")] + ".bias"
    # Not part of the embedding graph: position ids, the pooler and the pretraining heads.
    if name in ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias") or name.startswith("cls."):
        return
    new_name = tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
    if new_name is None:
        raise InvalidModelError(f"{weights}: tensor {hf_name!r} has no place in llama.cpp's BERT model")
    try:
        data = st.get_tensor(hf_name)
    except Exception as exc:  # safetensors raises its own error types, and TypeError for bf16 under numpy
        raise InvalidModelError(f"{weights}: tensor {hf_name!r} cannot be read ({exc})") from None
    if data.dtype not in (np.float32, np.float16):
        raise InvalidModelError(f"{weights}: tensor {hf_name!r} is {data.dtype}; only F32 and F16 weights are converted")
    data = data.astype(np.float32, copy=False)
    want = qtype
    # Norms, biases, position and token-type embeddings stay f32, as in llama.cpp's converter.
    if data.ndim <= 1 or new_name.endswith("_norm.weight") or new_name in keep_f32:
        want = gguf.GGMLQuantizationType.F32
    try:
        out = gguf.quants.quantize(data, want)
    except gguf.QuantError:
        want = gguf.GGMLQuantizationType.F16  # a row length q8_0 cannot split; the converter does the same
        out = gguf.quants.quantize(data, want)
    writer.add_tensor(new_name, out, raw_dtype=want)
