"""llama.cpp's own tokenizer test vectors (vendor/llama.cpp/models/ggml-vocab-*.gguf.inp/.out)."""

from __future__ import annotations

from pathlib import Path

import pytest

import mullama

VOCAB_DIR = Path(__file__).resolve().parent.parent / "vendor" / "llama.cpp" / "models"
SEP = "\n__ggml_vocab_test__\n"


def _cases(inp: Path, out: Path):
    raw = inp.read_text(encoding="utf-8")
    inputs, pos = [], 0
    while pos < len(raw):  # the same split as llama.cpp's tests/test-tokenizer-0.cpp
        nxt = raw.find(SEP, pos)
        if nxt < 0:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(SEP)
    expected = [[int(t) for t in line.split()] for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(inputs) == len(expected), f"{inp.name}: {len(inputs)} inputs, {len(expected)} outputs"
    return list(zip(inputs, expected))


VOCABS = sorted(p for p in VOCAB_DIR.glob("ggml-vocab-*.gguf") if Path(str(p) + ".inp").is_file())


@pytest.mark.skipif(not VOCABS, reason="vendor/llama.cpp/models is not there; run pip install . first")
@pytest.mark.parametrize("vocab", VOCABS, ids=lambda p: p.name.removeprefix("ggml-vocab-").removesuffix(".gguf"))
def test_tokenizer_matches_llama_cpp_vectors(vocab):
    cases = _cases(Path(str(vocab) + ".inp"), Path(str(vocab) + ".out"))
    model = mullama.Model.load(vocab, vocab_only=True)
    failures = []
    for text, expected in cases:
        got = model.tokenize(text, add_bos=False, special=False)
        if got != expected:
            failures.append((text, expected, got))
    model.close()
    assert not failures, f"{len(failures)}/{len(cases)} cases differ, first: {failures[0]!r}"
