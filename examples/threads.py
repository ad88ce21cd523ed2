"""Threads sharing one model: the weights are loaded once, each thread has its own Context.

A Model is safe to share; a Context is one conversation and belongs to one thread at a time.
The native loop runs without the GIL, so the threads really decode in parallel.

Run:  python examples/threads.py
"""

from __future__ import annotations

import threading

import mullama

PROMPTS = ["The capital of France is", "The capital of Italy is", "The capital of Spain is",
           "The capital of Germany is"]


def worker(model: mullama.Model, prompt: str, results: dict[str, str]) -> None:
    with mullama.Context(model, n_ctx=256, n_threads=1) as ctx:
        results[prompt] = ctx.generate(prompt, max_tokens=8, params=mullama.sampler_params_greedy())


def main() -> None:
    model = mullama.Model.load(mullama.models.fetch())
    results: dict[str, str] = {}
    threads = [threading.Thread(target=worker, args=(model, p, results)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for prompt in PROMPTS:
        print(f"{prompt}{results[prompt]}")


if __name__ == "__main__":
    main()
