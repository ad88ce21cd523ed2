"""The build settings and the cache of llama.cpp builds (build_llama.py)."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import time
from pathlib import Path

import pytest

import build_llama
from build_llama import BuildConfigError, Settings


def test_defaults_build_pinned_native_cpu():
    s = Settings.from_env({})
    assert s.pinned and not s.cuda and s.native and s.source_dir == build_llama.VENDOR_DIR
    args = s.cmake_args()
    assert "-DBUILD_SHARED_LIBS=OFF" in args and "-DCMAKE_POSITION_INDEPENDENT_CODE=ON" in args
    assert "-DLLAMA_CURL=OFF" in args and "-DGGML_NATIVE=ON" in args
    # common (schema -> grammar, chat) and the RPC backend are linked in; the web UI never is.
    assert "-DLLAMA_BUILD_COMMON=ON" in args and "-DGGML_RPC=ON" in args and "-DLLAMA_BUILD_UI=OFF" in args


@pytest.mark.parametrize("name", ["GGML_CUDA", "LLAMA_CUDA"])
def test_cuda_switch(name):
    assert Settings.from_env({name: "1"}).cuda
    assert "-DGGML_CUDA=ON" in Settings.from_env({name: "1"}).cmake_args()


def test_native_off():
    assert "-DGGML_NATIVE=OFF" in Settings.from_env({"MULLAMA_NATIVE": "0"}).cmake_args()


@pytest.mark.parametrize(
    "env, match",
    [
        ({"MULLAMA_NATIVE": "maybe"}, "not a switch"),
        ({"GGML_CUDA": "1", "LLAMA_CUDA": "0"}, "disagree"),
        ({"MULLAMA_TYPO": "1"}, "unknown setting"),
        ({"MULLAMA_LLAMA_CPP_DIR": "/nonexistent"}, "not a llama.cpp checkout"),
        ({"MULLAMA_SANITIZE": "memory"}, "unknown"),
        ({"MULLAMA_SANITIZE": "address", "GGML_CUDA": "1"}, "cannot be combined"),
    ],
)
def test_bad_settings_fail_with_a_message(env, match):
    with pytest.raises(BuildConfigError, match=match):
        Settings.from_env(env)


def test_user_checkout_is_used(vendor_dir):
    s = Settings.from_env({"MULLAMA_LLAMA_CPP_DIR": str(vendor_dir)})
    assert not s.pinned and s.source_dir == vendor_dir.resolve()


def test_cached_build_is_reused_quickly(vendor_dir):
    t0 = time.perf_counter()
    built = build_llama.ensure_built(Settings.from_env({}))
    elapsed = time.perf_counter() - t0
    assert all(p.is_file() for p in built.libraries)
    assert (built.include_dirs[0] / "llama.h").is_file()
    assert elapsed < 30, f"a cached build took {elapsed:.1f} s"


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _cmake_flags(args: list[str], name: str) -> list[str]:
    """The words of the one -D<name>= among CMake arguments; none where it is absent."""
    found = [a.removeprefix(f"-D{name}=") for a in args if a.startswith(f"-D{name}=")]
    assert len(found) <= 1, args
    return shlex.split(found[0]) if found else []


def test_native_builds_force_include_the_amx_tile_fix():
    words = _cmake_flags(Settings.from_env({}).cmake_args(), "CMAKE_CXX_FLAGS")
    header = Path(words[words.index("-include") + 1])
    assert header.read_text() == build_llama.AMX_TILE_FIX
    assert not any("CMAKE_CXX_FLAGS" in a for a in Settings.from_env({"MULLAMA_NATIVE": "0"}).cmake_args())


def test_this_build_has_ggml_amx_kernels_where_the_cpu_has_amx():
    import mullama

    assert ("AMX_INT8 = 1" in mullama.system_info()) == ("amx_int8" in _cpu_flags())


# Builds a tile configuration on the stack as ggml's ggml_tile_config_init does, loads it, and
# prints what the CPU holds. With GCC 12's own _tile_loadconfig the stores that fill it are
# optimised away and the CPU holds palette 0, on which ggml's AMX kernels crash.
TILE_CONFIG_PROGRAM = r"""
#include <immintrin.h>
#include <cstdio>
#include <unistd.h>
#include <sys/syscall.h>
struct alignas(64) config { unsigned char palette, start_row, reserved[14]; unsigned short colsb[16]; unsigned char rows[16]; };
__attribute__((noinline)) static void load() {
    config c = {};
    c.palette = 1;
    c.rows[0] = 8;
    c.colsb[0] = 64;
    _tile_loadconfig(&c);
}
int main() {
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */)) return 2;
    load();
    alignas(64) unsigned char held[64] = {};
    // Not _tile_storeconfig: GCC 12 declares its output as one pointer, too.
    __asm__ volatile("sttilecfg %0" : "=m"(held));
    std::printf("%d %d %d\n", held[0], held[48], held[16]);
    return 0;
}
"""


def test_the_amx_tile_fix_makes_the_cpu_hold_the_configuration_built(tmp_path):
    cxx = os.environ.get("CXX") or "c++"
    src = tmp_path / "tile.cpp"
    src.write_text(TILE_CONFIG_PROGRAM)
    header = build_llama.amx_fix_header(tmp_path)
    exe = tmp_path / "tile"
    build = subprocess.run([cxx, "-O2", "-mamx-tile", "-include", str(header), str(src), "-o", str(exe)],
                           capture_output=True, text=True)
    if build.returncode and "amx" in build.stderr and platform.machine() not in ("x86_64", "AMD64"):
        return   # not x86: no AMX, and no kernels to fix
    assert build.returncode == 0, build.stderr
    if "amx_tile" not in _cpu_flags():
        return   # compiled; this CPU cannot run it
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run
    assert run.stdout.split() == ["1", "8", "64"]


# What ggml's F16 vector code (simd-mappings.h) compiles to under a native build's flags: the
# number of elements its SIMD loop takes per step, 0 where it has none. Valid C and C++: ggml
# has files of both.
F16_STEP_PROGRAM = r"""
#include "simd-mappings.h"
#include <stdio.h>
int main(void) {
#if defined(GGML_SIMD) && defined(GGML_F16_STEP)
    printf("%d\n", (int) GGML_F16_STEP);
#else
    printf("0\n");
#endif
    return 0;
}
"""


@pytest.mark.parametrize("language", ["c", "c++"])
def test_native_builds_run_64_wide_f16_rows_in_simd_code(tmp_path, language):
    # With AVX512-FP16 the step is 128, and the 64-wide attention heads of small models (SmolLM2)
    # fall wholly into ggml's scalar loop in flash attention's per-row kernel.
    settings = Settings.from_env({})
    name, compiler = ("CMAKE_C_FLAGS", os.environ.get("CC") or "cc") if language == "c" else \
        ("CMAKE_CXX_FLAGS", os.environ.get("CXX") or "c++")
    flags = _cmake_flags(settings.cmake_args(), name)
    ggml = settings.source_dir / "ggml"
    src = tmp_path / "step.txt"
    src.write_text(F16_STEP_PROGRAM)
    exe = tmp_path / "step"
    subprocess.run([compiler, "-O2", "-march=native", *flags, f"-I{ggml / 'include'}", f"-I{ggml / 'src'}",
                    f"-I{ggml / 'src' / 'ggml-cpu'}", "-x", language, str(src), "-o", str(exe)], check=True)
    step = int(subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout)
    assert step == 0 or 64 % step == 0, f"ggml's F16 loop takes {step} elements per step"
