"""Reranker: relevance scores from a model that declares rank pooling.

No reranking GGUF is on the package registry, so the test makes one: the MiniLM model with a
linear classification head (``cls.output``) and rank pooling, as llama.cpp's BERT graph reads
a cross-encoder. Its score for a pair is then ``w . h + b``, where h is the pair's [CLS] hidden
state, which the same weights with CLS pooling give independently."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mullama
import mullama.aio

RANK, CLS = 4, 2   # llama_pooling_type
QUERY = "Which animal purrs?"
DOCS = ["Cats purr when they are content.", "The stock market fell sharply on Monday.",
        "A kitten is a young cat.", "Python is a programming language used for data science and the web."]


def _rewrite(src: Path, dst: Path, pooling: int, head: tuple[np.ndarray, np.ndarray] | None) -> Path:
    """src's metadata and tensors with another pooling type, and head's (weight, bias) as cls.output."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = pooling if field.name == f"{arch}.pooling_type" else field.contents()
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    if head is not None:
        writer.add_tensor("cls.output.weight", head[0])
        writer.add_tensor("cls.output.bias", head[1])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.fixture(scope="module")
def head() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return rng.standard_normal((1, 384)).astype(np.float32), np.array([0.25], dtype=np.float32)


@pytest.fixture(scope="module")
def reranker_model(minilm_f16_path, head, tmp_path_factory) -> mullama.Model:
    return mullama.Model.load(_rewrite(minilm_f16_path, tmp_path_factory.mktemp("rr") / "rerank.gguf", RANK, head))


@pytest.fixture(scope="module")
def cls_model(minilm_f16_path, tmp_path_factory) -> mullama.Model:
    return mullama.Model.load(_rewrite(minilm_f16_path, tmp_path_factory.mktemp("cls") / "cls.gguf", CLS, None))


def _pair_tokens(model: mullama.Model, query: str, doc: str) -> list[int]:
    """[CLS] query [SEP] doc [SEP]: a cross-encoder's pair, as llama.cpp's server builds it from
    this vocabulary's flags (BOS, the query, EOS, the document, EOS; no extra SEP)."""
    meta = model.metadata()
    assert (meta["tokenizer.ggml.add_eos_token"], meta["tokenizer.ggml.add_sep_token"]) == ("true", "false")
    q = model.tokenize(query)                      # [CLS] ... [SEP]
    assert q[0] == 101 and q[-1] == 102
    return q + model.tokenize(doc, add_bos=False) + [102]


def test_scores_are_the_head_applied_to_the_pairs_cls_state(reranker_model, cls_model, head):
    with mullama.Reranker(reranker_model, n_seq_max=1) as rr:   # one pair per decode, as the Context
        scores = rr.rank(QUERY, DOCS)
    expected = []
    with mullama.Context(cls_model, n_ctx=512, embeddings=True) as ctx:
        for doc in DOCS:
            ctx.clear_cache()
            ctx.generate_from_tokens(_pair_tokens(cls_model, QUERY, doc), max_tokens=0)
            hidden = ctx.get_embeddings()
            expected.append(float(head[0][0] @ hidden + head[1][0]))
    assert len(scores) == len(DOCS) and len(set(scores)) == len(DOCS)
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-3)


def test_batched_scores_equal_one_at_a_time(reranker_model):
    """Pairs packed into one decode attend only to themselves: the scores are those of one pair
    per decode, up to the rounding of another batch shape (0.007 seen here)."""
    with mullama.Reranker(reranker_model, n_seq_max=8) as rr:
        together = rr.rank(QUERY, DOCS * 3)
    with mullama.Reranker(reranker_model, n_seq_max=1) as rr:
        alone = rr.rank(QUERY, DOCS)
    np.testing.assert_allclose(together, alone * 3, atol=0.05)
    assert np.argsort(together[:4]).tolist() == np.argsort(alone).tolist()


@pytest.mark.anyio
async def test_async_reranker(reranker_model):
    async with mullama.aio.AsyncReranker(reranker_model) as rr:
        scores = await rr.rank(QUERY, DOCS)
    with mullama.Reranker(reranker_model) as sync:
        assert scores == sync.rank(QUERY, DOCS)


@pytest.fixture
def anyio_backend():
    return "asyncio"


def test_bad_input_and_wrong_models(reranker_model, minilm, smollm):
    with mullama.Reranker(reranker_model, n_ctx=64) as rr:
        assert rr.rank(QUERY, []) == []
        with pytest.raises(mullama.InvalidArgumentError, match="documents must be a list"):
            rr.rank(QUERY, "one doc")
        with pytest.raises(mullama.InvalidArgumentError, match=r"documents\[1\]"):
            rr.rank(QUERY, ["fine", 3])
        with pytest.raises(mullama.InvalidArgumentError, match="query must be a str"):
            rr.rank(None, DOCS)
        with pytest.raises(mullama.ContextOverflowError, match=r"documents\[0\]"):
            rr.rank(QUERY, ["word " * 200])
    for not_a_ranker in (minilm, smollm):
        with pytest.raises(mullama.InvalidArgumentError, match="not a reranking model"):
            mullama.Reranker(not_a_ranker)
    with pytest.raises(mullama.InvalidArgumentError, match="use Reranker"):
        mullama.EmbeddingGenerator(reranker_model)
