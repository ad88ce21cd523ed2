"""Streaming: print a completion piece by piece as the model writes it.

Run:  python examples/streaming.py ["a prompt"]      (default model: SmolLM2, fetched once)
"""

from __future__ import annotations

import sys

import mullama


def main(prompt: str) -> None:
    model = mullama.Model.load(mullama.models.fetch())
    with mullama.Context(model, n_ctx=512) as ctx:
        # The stream owns the context until it ends; `with` releases it even if we stop early.
        with ctx.generate_stream(prompt, max_tokens=32, params=mullama.sampler_params_greedy()) as stream:
            for piece in stream:
                print(piece, end="", flush=True)
        print()
        print(f"[{stream.completion_tokens} tokens, finish: {stream.finish_reason}]", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "The three primary colors are")
