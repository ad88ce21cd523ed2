"""Fixtures: the real models the tests run on. No mock of llama.cpp anywhere."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import mullama

ROOT = Path(__file__).resolve().parent.parent
SHARED_MODELS = ROOT.parent / "shared" / "models"
VENDOR = ROOT / "vendor" / "llama.cpp"


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    return mullama.models.fetch("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm(smollm_path) -> mullama.Model:
    model = mullama.Model.load(smollm_path)
    yield model


@pytest.fixture
def ctx(smollm) -> mullama.Context:
    with mullama.Context(smollm, n_ctx=1024, n_batch=512) as c:
        yield c


@pytest.fixture(scope="session")
def greedy() -> mullama.SamplerParams:
    return mullama.sampler_params_greedy()


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    path = SHARED_MODELS / "all-MiniLM-L6-v2-f16.gguf"
    if not path.is_file():
        pytest.skip(f"the embedding model is not there: {path} (../shared/models is absent)")
    return path


@pytest.fixture(scope="session")
def minilm(minilm_path) -> mullama.Model:
    return mullama.Model.load(minilm_path)


@pytest.fixture(scope="session")
def minilm_reference() -> dict:
    path = SHARED_MODELS / "all-MiniLM-L6-v2.reference.json"
    if not path.is_file():
        pytest.skip(f"the reference vectors are not there: {path}")
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def vendor_dir() -> Path:
    if not (VENDOR / "include" / "llama.h").is_file():
        pytest.skip("vendor/llama.cpp is not filled; run pip install . first")
    return VENDOR
