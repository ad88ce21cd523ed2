"""EmbeddingGenerator and Context.get_embeddings against sentence-transformers' vectors."""

from __future__ import annotations

import numpy as np
import pytest

import mullama


@pytest.fixture(scope="module")
def gen(minilm):
    with mullama.EmbeddingGenerator(minilm) as g:
        yield g


def test_embed_matches_sentence_transformers(gen, minilm_reference):
    for text, ref in zip(minilm_reference["sentences"], minilm_reference["embeddings"], strict=True):
        vec = gen.embed(text)
        assert vec.dtype == np.float32 and vec.shape == (gen.n_embd,) == (384,)
        assert mullama.cosine_similarity(vec, ref) >= 0.995


def test_embed_batch_matches_sentence_transformers(gen, minilm_reference):
    out = gen.embed_batch(minilm_reference["sentences"])
    assert out.shape == (len(minilm_reference["sentences"]), 384) and out.dtype == np.float32
    for row, ref in zip(out, minilm_reference["embeddings"], strict=True):
        assert mullama.cosine_similarity(row, ref) >= 0.995


def test_embed_batch_keeps_order_and_equals_single(gen):
    texts = ["short", "a much longer sentence about cats and dogs living together", "mid length text"] * 5
    batch = gen.embed_batch(texts)
    # Equal up to rounding: a decode of 64 tokens or more takes flash attention's tiled kernel,
    # whose last-digit differences can move a q8_0 activation by one step (cosine 0.99976 seen
    # with q8_0 weights, 0.9999998 with f16). Two different texts are far apart (below 0.9).
    for text, row in zip(texts, batch, strict=True):
        assert mullama.cosine_similarity(row, gen.embed(text)) >= 0.9995


def test_normalized_vectors_have_unit_length(gen):
    assert abs(np.linalg.norm(gen.embed("hello")) - 1.0) < 1e-5


def test_unnormalized(minilm):
    with mullama.EmbeddingGenerator(minilm, normalize=False) as g:
        assert np.linalg.norm(g.embed("hello")) > 1.5


def test_search_ranks_related_text_first(gen):
    docs = ["The cat sat on the mat.", "Stock markets fell sharply today.", "Python is a programming language."]
    vecs = gen.embed_batch(docs)
    q = gen.embed("Which language do programmers use?")
    scores = [mullama.cosine_similarity(q, v) for v in vecs]
    assert int(np.argmax(scores)) == 2


def test_generative_model_embeddings_use_mean_pooling(smollm):
    with mullama.EmbeddingGenerator(smollm, n_ctx=256) as g:
        a, b, c = g.embed_batch(["I like cats", "I love kittens", "Quarterly revenue grew"])
        assert g.n_embd == 576
        assert mullama.cosine_similarity(a, b) > mullama.cosine_similarity(a, c)


def test_empty_batch(gen):
    assert gen.embed_batch([]).shape == (0, 384)


@pytest.mark.parametrize("bad, exc", [("just a string", mullama.InvalidArgumentError),
                                      ([1, 2], mullama.InvalidArgumentError),
                                      (["word " * 1000], mullama.ContextOverflowError)])
def test_embed_batch_bad_input(gen, bad, exc):
    with pytest.raises(exc):
        gen.embed_batch(bad)
    assert gen.embed("still works").shape == (384,)


def test_embed_names_its_one_text_and_embed_batch_the_index(gen):
    with pytest.raises(mullama.InvalidArgumentError, match=r"^text is int, not str"):
        gen.embed(5)
    with pytest.raises(mullama.ContextOverflowError, match=r"^text is \d+ tokens"):
        gen.embed("word " * 1000)
    with pytest.raises(mullama.InvalidArgumentError, match=r"^texts\[1\] is bytes"):
        gen.embed_batch(["fine", b"bytes"])


def test_context_get_embeddings(minilm, minilm_reference):
    with mullama.Context(minilm, n_ctx=512, embeddings=True) as ctx:
        with pytest.raises(mullama.InvalidArgumentError, match="nothing has been decoded"):
            ctx.get_embeddings()
        ctx.generate(minilm_reference["sentences"][0], max_tokens=0)
        vec = ctx.get_embeddings()
    assert mullama.cosine_similarity(vec, minilm_reference["embeddings"][0]) >= 0.995


def test_cosine_similarity():
    assert mullama.cosine_similarity([1, 0], [0, 1]) == 0.0
    assert abs(mullama.cosine_similarity([1, 2, 3], [2, 4, 6]) - 1.0) < 1e-12
    with pytest.raises(ValueError, match="different lengths"):
        mullama.cosine_similarity([1, 2], [1, 2, 3])


def test_an_embedding_model_refuses_to_generate(minilm, smollm):
    """An encoder-only model computes no logits: sampling would read stale memory and return
    noise. Every way of generating says so instead, and the objects stay usable."""
    with mullama.Context(minilm, n_ctx=128) as ctx:
        for attempt in range(2):
            with pytest.raises(mullama.InvalidArgumentError, match="computed no logits"):
                ctx.generate("Hello world", 4)
        with pytest.raises(mullama.InvalidArgumentError, match="computed no logits"):
            list(ctx.generate_stream("Hello world", 4))
    with pytest.raises(mullama.InvalidArgumentError, match="computed no logits"):
        mullama.Engine(minilm, n_parallel=2, n_ctx=256)
    with mullama.Engine(smollm, n_parallel=2, n_ctx=512) as engine:   # a real one is unaffected
        assert engine.generate("The capital of France is", 3, mullama.sampler_params_greedy()).startswith(" Paris")
