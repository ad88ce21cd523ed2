"""A FastAPI service over mullama.aio: JSON generation, Server-Sent Events streaming, embeddings.

Requests are served by the continuous-batching engine: MULLAMA_PARALLEL (default 4) at once,
more wait in arrival order.

Run:  MULLAMA_MODEL=path.gguf uvicorn examples.fastapi_app:app   (default model: SmolLM2, fetched once)
Set MULLAMA_EMBED_MODEL to a GGUF embedding model to serve /embed with it (default: the same model).
"""

from __future__ import annotations

import json
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

import mullama
import mullama.aio


class GenerateRequest(BaseModel):
    prompt: str
    max_tokens: int = Field(default=64, ge=0, le=4096)
    temperature: float = 0.8
    seed: int = 0


class EmbedRequest(BaseModel):
    texts: list[str]


def _params(req: GenerateRequest) -> mullama.SamplerParams:
    return mullama.SamplerParams(temperature=req.temperature, seed=req.seed)


@asynccontextmanager
async def lifespan(app: FastAPI):
    path = os.environ.get("MULLAMA_MODEL") or mullama.models.fetch()
    model = await mullama.aio.load_model(path)
    embed_path = os.environ.get("MULLAMA_EMBED_MODEL")
    embed_model = await mullama.aio.load_model(embed_path) if embed_path else model
    n_parallel = int(os.environ.get("MULLAMA_PARALLEL", "4"))
    n_ctx = int(os.environ.get("MULLAMA_N_CTX", str(2048 * n_parallel)))
    app.state.engine = mullama.aio.AsyncEngine(model, n_parallel=n_parallel, n_ctx=n_ctx)
    app.state.embedder = mullama.aio.AsyncEmbeddingGenerator(embed_model)
    yield
    await app.state.engine.aclose()
    await app.state.embedder.aclose()


app = FastAPI(title="mullama", lifespan=lifespan)


@app.exception_handler(mullama.InvalidArgumentError)
async def _bad_input(request: Request, exc: mullama.InvalidArgumentError):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=400, content={"error": str(exc)})


@app.get("/health")
async def health(request: Request):
    stats = request.app.state.engine.stats()
    return {"status": "ok", "busy": bool(stats["running"] or stats["waiting"]), **stats}


@app.post("/generate")
async def generate(req: GenerateRequest, request: Request):
    async with request.app.state.engine.stream(req.prompt, req.max_tokens, _params(req), buffer=1 << 20) as s:
        text = await s.aread()
    return {"text": text, "finish_reason": s.finish_reason}


@app.post("/generate/stream")
async def generate_stream(req: GenerateRequest, request: Request):
    # Made here, before the response starts: a bad request raises now and becomes a 400.
    stream = request.app.state.engine.stream(req.prompt, req.max_tokens, _params(req))

    async def events():
        # Starlette cancels this generator when the client disconnects; `async with` then
        # cancels the request, and the engine frees its slot at the next step.
        async with stream:
            async for piece in stream:
                yield f"data: {json.dumps({'text': piece})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@app.post("/embed")
async def embed(req: EmbedRequest, request: Request):
    vectors = await request.app.state.embedder.embed_batch(req.texts)
    return {"embeddings": vectors.tolist()}
