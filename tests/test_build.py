"""The build settings and the cache of llama.cpp builds (build_llama.py)."""

from __future__ import annotations

import time

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


def test_native_builds_leave_out_ggml_amx_kernels():
    # In the pinned release they crash the first batch of two or more tokens on some Xeons with
    # AMX, llama.cpp's own llama-bench included; -march=native would otherwise compile them in.
    # A compiler without the flags (not x86) has no AMX to leave out.
    args = Settings.from_env({}).cmake_args()
    assert any(a.startswith("-DCMAKE_CXX_FLAGS=") and "-mno-amx-int8" in a for a in args) == bool(build_llama.NO_AMX)
    assert not any("AMX" in a for a in Settings.from_env({"MULLAMA_NATIVE": "0"}).cmake_args())
    import mullama

    assert "AMX_INT8 = 1" not in mullama.system_info()   # the library this test process runs
