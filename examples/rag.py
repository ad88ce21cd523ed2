"""Retrieval-augmented generation over a small bundled text (data/solar_system.txt).

The embedding model (all-MiniLM-L6-v2) embeds each paragraph once; a question is embedded the
same way, the closest paragraphs are put in the prompt, and the chat model answers from them.

Run:  python examples/rag.py ["a question"]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import mullama

TEXT = Path(__file__).resolve().parent / "data" / "solar_system.txt"


def retrieve(gen: mullama.EmbeddingGenerator, chunks: list[str], question: str, k: int = 2) -> list[str]:
    vectors = gen.embed_batch(chunks)         # one row per chunk, unit length (normalize=True)
    query = gen.embed(question)
    scores = vectors @ query                  # cosine similarity, as both sides are normalized
    return [chunks[i] for i in np.argsort(-scores)[:k]]


def main(question: str) -> None:
    chunks = [p.strip() for p in TEXT.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    with mullama.Model.load(mullama.models.fetch(mullama.models.EMBEDDING_MODEL)) as embedder, \
            mullama.EmbeddingGenerator(embedder) as gen:
        found = retrieve(gen, chunks, question)
    for chunk in found:
        print(f"retrieved: {chunk}")
    model = mullama.Model.load(mullama.models.fetch())
    context = "\n".join(found)
    prompt = model.apply_chat_template([
        {"role": "system", "content": "Answer the question using only this information:\n" + context},
        {"role": "user", "content": question},
    ])
    with mullama.Context(model, n_ctx=1024) as ctx:
        answer = ctx.generate(prompt, max_tokens=48, params=mullama.sampler_params_greedy())
    print(f"answer: {answer.strip()}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "Which planet has a giant storm called the Great Red Spot?")
