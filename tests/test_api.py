"""Module-level functions, SamplerParams and its presets, the command line."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mullama


def test_sampler_params_defaults():
    p = mullama.SamplerParams()
    assert dataclasses.asdict(p) == dict(
        # The original documentation's sampling defaults.
        temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, typical_p=1.0, penalty_repeat=1.1,
        penalty_freq=0.0, penalty_present=0.0, penalty_last_n=64, seed=0,
        # Every generation control and extra sampler is off by default (llama.cpp's values).
        stop=(), grammar=None, json_schema=None, json=False, logit_bias=None, logprobs=False, n_probs=0,
        min_keep=1, mirostat=0, mirostat_tau=5.0, mirostat_eta=0.1, dry_multiplier=0.0, dry_base=1.75,
        dry_allowed_length=2, dry_penalty_last_n=-1, dry_sequence_breakers=("\n", ":", '"', "*"),
        xtc_probability=0.0, xtc_threshold=0.1, top_n_sigma=-1.0,
        # No lazy grammar: a grammar, if any, holds from the first token.
        grammar_lazy=False, grammar_triggers=(), grammar_trigger_tokens=(), grammar_prefill="", preserved_tokens=(),
    )
    assert p.grammar_text() is None and p.stop_strings() == []


def test_presets():
    g = mullama.sampler_params_greedy()
    assert (g.temperature, g.top_k, g.top_p, g.min_p, g.penalty_repeat) == (0.0, 1, 1.0, 0.0, 1.0)
    c = mullama.sampler_params_creative()
    assert (c.temperature, c.top_k, c.top_p, c.min_p, c.penalty_repeat) == (1.2, 100, 0.95, 0.0, 1.0)
    p = mullama.sampler_params_precise()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.penalty_repeat) == (0.3, 20, 0.8, 0.05, 1.1)
    assert mullama.sampler_params_creative().temperature > mullama.SamplerParams().temperature
    assert mullama.sampler_params_precise().temperature < mullama.SamplerParams().temperature
    for preset in (mullama.sampler_params_greedy, mullama.sampler_params_creative, mullama.sampler_params_precise):
        assert preset().validated()


def test_backend_functions():
    mullama.backend_init()
    assert isinstance(mullama.supports_gpu_offload(), bool)
    assert "CPU" in mullama.system_info()
    assert mullama.max_devices() >= 1
    assert mullama.version()


def test_public_names_are_exported():
    for name in mullama.__all__:
        assert hasattr(mullama, name), name


def test_models_fetch_unknown_name():
    with pytest.raises(mullama.ModelNotFoundError, match="unknown model"):
        mullama.models.fetch("no-such-model")


def test_models_fetch_is_cached(smollm_path):
    again = mullama.models.fetch("smollm2-135m-instruct")
    assert again == smollm_path and again.stat().st_size > 90_000_000


def test_cli_generate_streams_a_completion(smollm_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mullama", "generate", "The capital of France is", "-n", "8", "--temp", "0",
         "-m", str(smollm_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(" Paris")


def test_cli_reports_a_bad_model_path(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mullama", "generate", "hi", "-m", str(tmp_path / "x.gguf")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "not found" in proc.stderr


def _readme_pairs() -> list[tuple[str, str]]:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Sync and async, name for name", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([\w.]+)` \| `([\w.]+)` \|$", section, flags=re.M)


def _public(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")}


def test_readme_sync_async_table_matches_both_modules():
    import mullama.aio

    pairs = _readme_pairs()
    assert ("Model.load", "load_model") in pairs
    classes: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for sync, asyn in pairs:
        if "." in asyn:
            (sc, sn), (ac, an) = sync.split("."), asyn.split(".")
            classes.setdefault((sc, ac), []).append((sn, an))
    assert len(classes) == 6
    for (sc, ac), names in classes.items():
        sync_cls, async_cls = getattr(mullama, sc), getattr(mullama.aio, ac)
        assert {s for s, _ in names} == _public(sync_cls), f"{sc}: README and dir() differ"
        assert {a for _, a in names} == _public(async_cls), f"{ac}: README and dir() differ"
    assert set(mullama.aio.__all__) == {"load_model"} | {ac for _, ac in classes}
