"""The worker pattern, async: a queue of prompts served by a few tasks, each with its own
AsyncContext over one shared model. The decoding runs in worker threads; the event loop stays free.

Run:  python examples/async_workers.py
"""

from __future__ import annotations

import asyncio

import mullama
import mullama.aio

PROMPTS = ["The capital of France is", "The capital of Italy is", "The capital of Spain is",
           "The capital of Germany is", "The capital of Japan is"]
WORKERS = 2


async def worker(model: mullama.Model, queue: asyncio.Queue[str], results: dict[str, str]) -> None:
    async with mullama.aio.AsyncContext(model, n_ctx=256, n_threads=1) as actx:
        while True:
            prompt = await queue.get()
            try:
                results[prompt] = await actx.generate(prompt, max_tokens=8, params=mullama.sampler_params_greedy())
            finally:
                queue.task_done()


async def main() -> None:
    model = await mullama.aio.load_model(mullama.models.fetch())
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in PROMPTS:
        queue.put_nowait(prompt)
    results: dict[str, str] = {}
    tasks = [asyncio.create_task(worker(model, queue, results)) for _ in range(WORKERS)]
    await queue.join()          # every prompt answered
    for task in tasks:          # the workers wait forever for more: stop them
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for prompt in PROMPTS:
        print(f"{prompt}{results[prompt]}")


if __name__ == "__main__":
    asyncio.run(main())
