"""Fetch the pinned llama.cpp release and build its static libraries, cached outside the clone.

Used by ``setup.py``; also runnable by hand (``python build_llama.py``) and by the tests and
benchmarks, which build llama.cpp's own C programs against the same libraries.

Settings (environment variables):

- ``MULLAMA_LLAMA_CPP_DIR``: build from this llama.cpp checkout instead of the pinned release.
- ``GGML_CUDA`` / ``LLAMA_CUDA``: ``1`` turns on the CUDA backend.
- ``MULLAMA_NATIVE``: ``0`` builds for any x86-64 instead of this CPU (default ``1``).
- ``MULLAMA_SANITIZE``: ``address,undefined`` builds llama.cpp with those sanitizers (by hand only).
- ``MULLAMA_BUILD_CACHE``: where built libraries are kept (default ``~/.cache/mullama/build``).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENDOR_DIR = ROOT / "vendor" / "llama.cpp"

PIN_PACKAGE = "llama-cpp-python"
PIN_VERSION = "0.3.36"
PIN_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PIN_PREFIX = f"llama_cpp_python-{PIN_VERSION}/vendor/llama.cpp/"

# The source that matters for the libraries; models/, docs and tests do not change them. tools/
# is there for the programs built on demand from the same build (llama-server, rpc-server).
HASHED_SOURCES = ("CMakeLists.txt", "cmake", "ggml", "src", "include", "common", "vendor", "tools")

KNOWN_SETTINGS = {
    "MULLAMA_LLAMA_CPP_DIR",
    "MULLAMA_NATIVE",
    "MULLAMA_SANITIZE",
    "MULLAMA_BUILD_CACHE",
    "MULLAMA_CACHE",  # the model cache, read at run time, not by the build
    "MULLAMA_EXAMPLE_THREADS",  # threads of the llama.cpp example programs (tests, benchmarks)
    "MULLAMA_GPU_MODEL",  # the model tests/test_gpu.py runs on (default: the fetched one)
}
SANITIZERS = {"address": "LLAMA_SANITIZE_ADDRESS", "undefined": "LLAMA_SANITIZE_UNDEFINED"}

_TRUE = {"1", "on", "true", "yes"}
_FALSE = {"0", "off", "false", "no", ""}


class BuildConfigError(SystemExit):
    """A build setting is unknown, malformed or in conflict; the message says what to set."""

    def __init__(self, message: str) -> None:
        super().__init__(f"mullama build: {message}")


def _flag(env: dict[str, str], name: str, default: bool) -> bool:
    if name not in env:
        return default
    value = env[name].strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise BuildConfigError(f"{name}={env[name]!r} is not a switch; set it to 1 or 0")


@dataclass(frozen=True)
class Settings:
    source_dir: Path
    pinned: bool
    cuda: bool
    native: bool
    sanitize: tuple[str, ...]
    cache_dir: Path

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        unknown = sorted(k for k in env if k.startswith("MULLAMA_") and k not in KNOWN_SETTINGS)
        if unknown:
            raise BuildConfigError(
                f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(KNOWN_SETTINGS))}"
            )
        cuda_flags = {n: _flag(env, n, False) for n in ("GGML_CUDA", "LLAMA_CUDA") if n in env}
        if len(set(cuda_flags.values())) > 1:
            raise BuildConfigError(
                "GGML_CUDA and LLAMA_CUDA disagree "
                f"({', '.join(f'{k}={env[k]}' for k in cuda_flags)}); set only one of them"
            )
        cuda = any(cuda_flags.values())
        native = _flag(env, "MULLAMA_NATIVE", True)
        sanitize = tuple(s for s in env.get("MULLAMA_SANITIZE", "").replace(" ", "").split(",") if s)
        bad = [s for s in sanitize if s not in SANITIZERS]
        if bad:
            raise BuildConfigError(
                f"MULLAMA_SANITIZE={env['MULLAMA_SANITIZE']!r}: unknown {bad}; use {','.join(SANITIZERS)}"
            )
        if sanitize and cuda:
            raise BuildConfigError("MULLAMA_SANITIZE cannot be combined with GGML_CUDA; unset one")
        user_dir = env.get("MULLAMA_LLAMA_CPP_DIR")
        if user_dir:
            source = Path(user_dir).expanduser().resolve()
            if not (source / "include" / "llama.h").is_file():
                raise BuildConfigError(
                    f"MULLAMA_LLAMA_CPP_DIR={user_dir!r} is not a llama.cpp checkout "
                    "(no include/llama.h there); point it at the top of one or unset it"
                )
        else:
            source = VENDOR_DIR
        cache = Path(
            env.get("MULLAMA_BUILD_CACHE")
            or Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mullama" / "build"
        ).expanduser()
        return cls(source, not user_dir, cuda, native, sanitize, cache)

    def cmake_args(self) -> list[str]:
        def onoff(b: bool) -> str:
            return "ON" if b else "OFF"

        args = [
            "-DCMAKE_BUILD_TYPE=Release",
            "-DBUILD_SHARED_LIBS=OFF",
            "-DCMAKE_POSITION_INDEPENDENT_CODE=ON",
            # common: JSON schema -> grammar and chat templates. Tools and server are configured
            # so that llama-server and rpc-server can be built from this same tree on demand
            # (build_tool); the libraries alone are built by default.
            "-DLLAMA_BUILD_COMMON=ON",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_TOOLS=ON",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=ON",
            "-DLLAMA_BUILD_UI=OFF",
            "-DLLAMA_USE_PREBUILT_UI=OFF",
            "-DLLAMA_BUILD_APP=OFF",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_OPENSSL=OFF",
            # ggml's own thread pool: no libgomp at run time, and no worker threads left
            # behind in the user's process after a context closes.
            "-DGGML_OPENMP=OFF",
            # The RPC backend: layers on other machines' rpc-server processes.
            "-DGGML_RPC=ON",
            f"-DGGML_NATIVE={onoff(self.native)}",
            f"-DGGML_CUDA={onoff(self.cuda)}",
        ]
        for name, option in SANITIZERS.items():
            args.append(f"-D{option}={onoff(name in self.sanitize)}")
        if self.native:
            args.append(f"-DCMAKE_CXX_FLAGS={native_cxx_flags(self.cache_dir)}")
            c_flags = native_c_flags()
            if c_flags:
                args.append(f"-DCMAKE_C_FLAGS={c_flags}")
        return args


# GCC (12, at least) declares _tile_loadconfig's memory operand as one pointer, not the 64-byte
# tile configuration it reads, so the optimiser drops the stores that fill a configuration built
# on the stack: ggml's AMX kernels (amx/mmq.cpp, ggml_tile_config_init) then run with a garbage
# configuration and crash the first batch of two or more tokens (SIGILL or SIGSEGV; upstream
# issue 20824). Force-included into every C++ file of a native build, this header redefines
# the intrinsic with the whole configuration as its operand; it does nothing where the compiler
# targets no AMX, or is clang, whose intrinsic is a builtin.
AMX_TILE_FIX = """\
#if defined(__cplusplus) && defined(__AMX_TILE__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#undef _tile_loadconfig
#define _tile_loadconfig(config) \\
    __asm__ volatile("ldtilecfg\\t%X0" :: "m"(*(const unsigned char (*)[64])(config)))
#endif
"""
AMX_TILE_FIX_DIGEST = hashlib.sha256(AMX_TILE_FIX.encode()).hexdigest()


def amx_fix_header(cache_dir: Path) -> Path:
    """Where the build cache keeps AMX_TILE_FIX, named by its content (so a changed fix changes
    the build's cache key); written once, atomically."""
    path = cache_dir / f"ggml-amx-tile-fix-{AMX_TILE_FIX_DIGEST[:12]}.h"
    if not path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(AMX_TILE_FIX)
        os.replace(tmp, path)
    return path


# ggml's F16 vector code (simd-mappings.h) computes in half precision where the compiler targets
# AVX512-FP16, in steps of 128 elements, and leaves shorter rows wholly to its scalar loop (a
# table lookup per element): the 64-wide attention heads of many small models, which flash
# attention's per-row kernel walks one cached token at a time. Without that ISA the same code
# converts to F32 in steps of 64 and accumulates in F32: on this project's Xeon, generation
# 400 tokens into a chat ran 1.7x faster and the next 18 prompt tokens 2.7x (SmolLM2), with
# 256-wide heads (Gemma 3) and embeddings unchanged (benchmarks/NOTES.md).
NO_FP16_ARITH = "-mno-avx512fp16"


@functools.lru_cache(maxsize=None)
def _compiler_accepts(compiler: str, flag: str) -> bool:
    try:
        probe = subprocess.run([compiler, flag, "-x", "c", "-fsyntax-only", "-"], input="", capture_output=True,
                               text=True)
    except OSError:
        return False   # no such compiler: the build will say so
    return probe.returncode == 0


def _native_isa_flags() -> list[str]:
    """The ISA options added to -march=native: NO_FP16_ARITH where the compilers know it (x86)."""
    compilers = [os.environ.get("CC") or "cc", os.environ.get("CXX") or "c++"]
    return [NO_FP16_ARITH] if all(_compiler_accepts(c, NO_FP16_ARITH) for c in compilers) else []


def native_cxx_flags(cache_dir: Path) -> str:
    """The C++ flags of llama.cpp's native builds, mullama's and its benchmark peers' alike:
    environment variable CXXFLAGS, the ISA options and the force-included AMX_TILE_FIX."""
    include = ["-include", shlex.quote(str(amx_fix_header(cache_dir)))]
    return " ".join([os.environ.get("CXXFLAGS", ""), *_native_isa_flags(), *include]).strip()


def native_c_flags() -> str:
    """The C flags of llama.cpp's native builds: environment variable CFLAGS and the ISA options."""
    return " ".join([os.environ.get("CFLAGS", ""), *_native_isa_flags()]).strip()


def native_flags_digest() -> str:
    """Names what native builds are compiled with beyond CFLAGS and CXXFLAGS, for the folders of
    peers built with it."""
    return hashlib.sha256(" ".join([AMX_TILE_FIX_DIGEST, *_native_isa_flags()]).encode()).hexdigest()


def _run(cmd: list[str], **kw) -> None:
    print("mullama build:", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def fetch_pinned_source(dest: Path = VENDOR_DIR) -> Path:
    """Fill ``vendor/llama.cpp`` from the pinned registry sdist, once; verify its hash."""
    marker = dest / ".mullama-source"
    if marker.is_file() and marker.read_text().strip() == PIN_SHA256:
        return dest
    with tempfile.TemporaryDirectory(prefix="mullama-fetch-") as tmp:
        # --no-build-isolation: pip still prepares the sdist's metadata, and building its build
        # dependencies from source (cmake among them) would take longer than llama.cpp itself.
        _run([
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--no-build-isolation", "--disable-pip-version-check", "-q",
            "-d", tmp, f"{PIN_PACKAGE}=={PIN_VERSION}",
        ])
        archives = list(Path(tmp).glob("*.tar.gz"))
        if len(archives) != 1:
            raise RuntimeError(f"expected one sdist from pip download, got {archives}")
        digest = hashlib.sha256(archives[0].read_bytes()).hexdigest()
        if digest != PIN_SHA256:
            raise RuntimeError(
                f"{archives[0].name}: sha256 {digest} does not match the pinned {PIN_SHA256}; "
                "refusing to build from it"
            )
        staging = dest.parent / (dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                if not member.name.startswith(PIN_PREFIX) or member.name == PIN_PREFIX:
                    continue
                rel = member.name[len(PIN_PREFIX):]
                if rel.startswith("/") or ".." in Path(rel).parts or not (member.isfile() or member.isdir()):
                    continue
                target = staging / rel
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
                os.chmod(target, 0o755 if member.mode & 0o111 else 0o644)
        (staging / ".mullama-source").write_text(PIN_SHA256 + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    return dest


def source_hash(source: Path) -> str:
    h = hashlib.sha256()
    for top in HASHED_SOURCES:
        path = source / top
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            h.update(str(f.relative_to(source)).encode() + b"\0")
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _compiler_id() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        out = cxx
    return out.splitlines()[0] if out else cxx


@dataclass
class BuiltLlama:
    """Where the static libraries and headers of one cached build are."""

    build_dir: Path
    source_dir: Path
    libraries: list[Path]
    include_dirs: list[Path]
    link_args: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({
            "build_dir": str(self.build_dir),
            "source_dir": str(self.source_dir),
            "libraries": [str(p) for p in self.libraries],
            "include_dirs": [str(p) for p in self.include_dirs],
            "link_args": self.link_args,
        }, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "BuiltLlama":
        d = json.loads(text)
        return cls(Path(d["build_dir"]), Path(d["source_dir"]), [Path(p) for p in d["libraries"]],
                   [Path(p) for p in d["include_dirs"]], d["link_args"])


def _library_names(settings: Settings) -> list[str]:
    # Link order: users before what they use.
    names = ["common/libllama-common.a", "common/libllama-common-base.a", "vendor/cpp-httplib/libcpp-httplib.a",
             "src/libllama.a", "ggml/src/libggml.a", "ggml/src/libggml-cpu.a", "ggml/src/ggml-rpc/libggml-rpc.a"]
    if settings.cuda:
        names.append("ggml/src/ggml-cuda/libggml-cuda.a")
    names.append("ggml/src/libggml-base.a")
    return names


def _link_args(settings: Settings) -> list[str]:
    args = ["-lpthread", "-ldl", "-lm"]
    if settings.cuda:
        cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        for sub in ("lib64", "lib64/stubs", "targets/x86_64-linux/lib", "targets/x86_64-linux/lib/stubs"):
            if (Path(cuda_home) / sub).is_dir():
                args.append(f"-L{Path(cuda_home) / sub}")
        args += ["-lcudart_static", "-lcublas_static", "-lcublasLt_static", "-lculibos", "-lcuda", "-lrt"]
    if settings.sanitize:
        args.append("-fsanitize=" + ",".join(settings.sanitize))
    return args


def transport_link_args(build_dir: Path) -> list[str]:
    """Shared libraries the static ggml code needs where CMake found them on the build machine:
    libibverbs for the RPC backend's RDMA transport, NCCL for multi-GPU CUDA. Read from the
    CMake cache, so a machine without them links nothing more."""
    cache = build_dir / "CMakeCache.txt"
    text = cache.read_text(errors="replace") if cache.is_file() else ""
    args = []
    if "GGML_RPC_RDMA:BOOL=ON" in text:
        args.append("-libverbs")
    for line in text.splitlines():
        if line.startswith("NCCL_LIBRARY:FILEPATH=") and "GGML_CUDA_NCCL:BOOL=ON" in text:
            lib = Path(line.split("=", 1)[1])
            if lib.is_file():
                args += [str(lib), f"-Wl,-rpath,{lib.parent}"]
    return args


def _include_dirs(source: Path) -> list[Path]:
    # src/ for llama-grammar.h: the grammar parser, run on its own to report parse errors;
    # ggml/src/ for ggml-backend-impl.h: a device that reports a memory size of the user's.
    return [source / "include", source / "ggml" / "include", source / "common", source / "src",
            source / "ggml" / "src"]


def ensure_built(settings: Settings | None = None) -> BuiltLlama:
    """Return the cached build for these settings, building it first if there is none."""
    settings = settings or Settings.from_env()
    if settings.pinned:
        fetch_pinned_source(settings.source_dir)
    args = settings.cmake_args()
    key_src = json.dumps({
        "source": source_hash(settings.source_dir),
        "cmake_args": args,
        "compiler": _compiler_id(),
        "cc": os.environ.get("CC", ""),
        "cxx": os.environ.get("CXX", ""),
        "cflags": os.environ.get("CFLAGS", ""),
        "cxxflags": os.environ.get("CXXFLAGS", ""),
    }, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    build_dir = settings.cache_dir / f"llama-{key}"
    stamp = build_dir / "mullama-build.json"
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.cache_dir / f"llama-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two concurrent installs share one build
        source_link = _link_source(build_dir, settings.source_dir)
        if stamp.is_file():
            built = BuiltLlama.from_json(stamp.read_text())
            if all(p.is_file() for p in built.libraries):
                # Same source hash, so the headers of this checkout are the ones it was built with.
                built.source_dir = settings.source_dir
                built.include_dirs = _include_dirs(settings.source_dir)
                return built
        (build_dir / "mullama-key.json").write_text(key_src)
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        launcher = []
        if shutil.which("ccache"):
            launcher = ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
            if settings.cuda:
                launcher.append("-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache")
        t0 = time.monotonic()
        cmake_dir = build_dir / "cmake"
        cmake = _cmake()
        _run([cmake, "-S", str(source_link), "-B", str(cmake_dir), *generator, *launcher, *args])
        jobs = str(os.cpu_count() or 2)
        targets = ["llama", "ggml", "llama-common", "ggml-rpc"] + (["ggml-cuda"] if settings.cuda else [])
        _run([cmake, "--build", str(cmake_dir), "--config", "Release", "-j", jobs, "--target", *targets])
        built = BuiltLlama(
            build_dir=cmake_dir,
            source_dir=settings.source_dir,
            libraries=[cmake_dir / n for n in _library_names(settings)],
            include_dirs=_include_dirs(settings.source_dir),
            link_args=_link_args(settings),
        )
        missing = [str(p) for p in built.libraries if not p.is_file()]
        if missing:
            raise RuntimeError(f"llama.cpp build finished without {missing}")
        stamp.write_text(built.to_json())
        print(f"mullama build: llama.cpp built in {time.monotonic() - t0:.0f} s into {cmake_dir}", flush=True)
        return built


def _cmake() -> str:
    """cmake on PATH, else the one of the ``cmake`` package installed beside this Python."""
    found = shutil.which("cmake")
    if found:
        return found
    try:
        import cmake as cmake_package   # the PyPI package: its binary is not always on PATH
    except ImportError:
        raise BuildConfigError("cmake is not on PATH; install it (pip install cmake) and retry") from None
    return str(Path(cmake_package.CMAKE_BIN_DIR) / "cmake")


def _link_source(build_dir: Path, source: Path) -> Path:
    """The path CMake is given for the source tree: a link in the cached build, pointed at this
    checkout's tree when the one it names is gone, so that the build outlives the checkout
    that configured it (all checkouts with this source hash hold the same files)."""
    link = build_dir / "source"
    if not (link / "CMakeLists.txt").is_file():
        tmp = build_dir / f"source.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(source.resolve(), target_is_directory=True)
        os.replace(tmp, link)
    return link


def _cache_entry(cmake_dir: Path, name: str) -> str:
    for line in (cmake_dir / "CMakeCache.txt").read_text(errors="replace").splitlines():
        if line.startswith(name + ":"):
            return line.split("=", 1)[1]
    return ""


def _reconfigure_if_stale(cmake_dir: Path) -> None:
    """A build configured inside pip's temporary build environment names a cmake that is gone
    once the install is over, and ninja needs it to build further targets: configure the same
    build again with the cmake at hand (the cache keeps every option; nothing is compiled again)."""
    home = _cache_entry(cmake_dir, "CMAKE_HOME_DIRECTORY")
    if not Path(home, "CMakeLists.txt").is_file():
        raise BuildConfigError(
            f"the cached llama.cpp build in {cmake_dir} was configured from {home}, which is gone; "
            f"delete {cmake_dir.parent} and build again"
        )
    if not Path(_cache_entry(cmake_dir, "CMAKE_COMMAND")).is_file():
        _run([_cmake(), "-S", home, "-B", str(cmake_dir)])


def build_tool(*names: str, built: BuiltLlama | None = None) -> dict[str, Path]:
    """Build llama.cpp's own programs (llama-server, rpc-server, llama-bench, ...) in the cached
    build of the libraries, so they share its flags and objects; returns name -> executable."""
    built = built or ensure_built()
    bins = {n: built.build_dir / "bin" / n for n in names}
    if all(p.is_file() for p in bins.values()):
        return bins
    lock_path = built.build_dir.parent.parent / (built.build_dir.parent.name + ".lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _reconfigure_if_stale(built.build_dir)
        _run([_cmake(), "--build", str(built.build_dir), "-j", str(os.cpu_count() or 2), "--target", *names])
    missing = [n for n, p in bins.items() if not p.is_file()]
    if missing:
        raise RuntimeError(f"llama.cpp build finished without {missing}")
    return bins


# llama.cpp's examples take llama.cpp's default thread count (4), which oversubscribes a small
# machine badly (spinning barriers on 2 cores make a token take seconds). The shim lets the
# reference loop run unchanged with the thread count from MULLAMA_EXAMPLE_THREADS.
_THREADS_SHIM = r"""
#include <cstdlib>
#include <thread>
#include "llama.h"
extern "C" struct llama_context * mullama_example_init_from_model(struct llama_model * model,
                                                                  struct llama_context_params params) {
    const char * env = std::getenv("MULLAMA_EXAMPLE_THREADS");
    int n = env ? std::atoi(env) : (int) std::thread::hardware_concurrency();
    if (n > 0) { params.n_threads = n; params.n_threads_batch = n; }
    return llama_init_from_model(model, params);
}
"""


def build_example(name: str, source: str, built: BuiltLlama | None = None) -> Path:
    """Compile one of llama.cpp's own C++ programs (e.g. examples/simple/simple.cpp) against
    the cached static libraries; used by tests and benchmarks as the reference C loop.
    The program runs with MULLAMA_EXAMPLE_THREADS threads (default: all cores)."""
    built = built or ensure_built()
    out = built.build_dir.parent / "bin" / name
    src = built.source_dir / source
    if out.is_file() and out.stat().st_mtime >= src.stat().st_mtime and out.stat().st_mtime >= Path(__file__).stat().st_mtime:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    shim = out.parent / "threads_shim.cpp"
    shim.write_text(_THREADS_SHIM)
    cxx = os.environ.get("CXX") or "c++"
    includes = [f"-I{d}" for d in built.include_dirs]
    _run([cxx, "-O2", "-std=c++17", *includes, "-c", str(shim), "-o", str(shim.with_suffix(".o"))])
    _run([cxx, "-O2", "-std=c++17", *includes, "-Dllama_init_from_model=mullama_example_init_from_model",
          str(src), str(shim.with_suffix(".o")), "-o", str(out),
          *[str(p) for p in built.libraries], *built.link_args, *transport_link_args(built.build_dir)])
    return out


if __name__ == "__main__":
    print(ensure_built().to_json())
