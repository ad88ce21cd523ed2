"""The same service as fastapi_app.py, in aiohttp, also served by the continuous-batching engine.

Run:  MULLAMA_MODEL=path.gguf python examples/aiohttp_app.py [port]
"""

from __future__ import annotations

import json
import os
import sys

from aiohttp import web

import mullama
import mullama.aio

ENGINE = web.AppKey("engine", mullama.aio.AsyncEngine)
EMBEDDER = web.AppKey("embedder", mullama.aio.AsyncEmbeddingGenerator)


def _request_params(body: dict) -> tuple[str, int, mullama.SamplerParams]:
    prompt = body.get("prompt")
    max_tokens = body.get("max_tokens", 64)
    if not isinstance(prompt, str) or not prompt:
        raise web.HTTPBadRequest(text=json.dumps({"error": "prompt must be a non-empty string"}),
                                 content_type="application/json")
    if not isinstance(max_tokens, int) or not 0 <= max_tokens <= 4096:
        raise web.HTTPBadRequest(text=json.dumps({"error": "max_tokens must be an int in [0, 4096]"}),
                                 content_type="application/json")
    params = mullama.SamplerParams(temperature=float(body.get("temperature", 0.8)), seed=int(body.get("seed", 0)))
    return prompt, max_tokens, params


async def health(request: web.Request) -> web.Response:
    stats = request.app[ENGINE].stats()
    return web.json_response({"status": "ok", "busy": bool(stats["running"] or stats["waiting"]), **stats})


async def generate(request: web.Request) -> web.Response:
    prompt, max_tokens, params = _request_params(await request.json())
    try:
        async with request.app[ENGINE].stream(prompt, max_tokens, params, buffer=1 << 20) as s:
            text = await s.aread()
    except mullama.InvalidArgumentError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response({"text": text, "finish_reason": s.finish_reason})


async def generate_stream(request: web.Request) -> web.StreamResponse:
    prompt, max_tokens, params = _request_params(await request.json())
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    # aiohttp cancels this handler when the client disconnects; `async with` cancels the request.
    async with request.app[ENGINE].stream(prompt, max_tokens, params) as stream:
        async for piece in stream:
            await response.write(f"data: {json.dumps({'text': piece})}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def embed(request: web.Request) -> web.Response:
    body = await request.json()
    texts = body.get("texts")
    if not isinstance(texts, list):
        return web.json_response({"error": "texts must be a list of strings"}, status=400)
    try:
        vectors = await request.app[EMBEDDER].embed_batch(texts)
    except mullama.InvalidArgumentError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response({"embeddings": vectors.tolist()})


async def _lifespan(app: web.Application):
    path = os.environ.get("MULLAMA_MODEL") or mullama.models.fetch()
    model = await mullama.aio.load_model(path)
    embed_path = os.environ.get("MULLAMA_EMBED_MODEL")
    embed_model = await mullama.aio.load_model(embed_path) if embed_path else model
    n_parallel = int(os.environ.get("MULLAMA_PARALLEL", "4"))
    n_ctx = int(os.environ.get("MULLAMA_N_CTX", str(2048 * n_parallel)))
    app[ENGINE] = mullama.aio.AsyncEngine(model, n_parallel=n_parallel, n_ctx=n_ctx)
    app[EMBEDDER] = mullama.aio.AsyncEmbeddingGenerator(embed_model)
    yield
    await app[ENGINE].aclose()
    await app[EMBEDDER].aclose()


def make_app() -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(_lifespan)
    app.add_routes([
        web.get("/health", health),
        web.post("/generate", generate),
        web.post("/generate/stream", generate_stream),
        web.post("/embed", embed),
    ])
    return app


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=int(sys.argv[1]) if len(sys.argv) > 1 else 8080)
