"""The FastAPI and aiohttp examples (served by the batching engine), for real on 127.0.0.1,
driven by real clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest

import mullama
from conftest import free_port, wait_until_healthy

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module", params=["fastapi", "aiohttp"])
def server(request, smollm_path, minilm_path):
    port = free_port()
    env = dict(os.environ, MULLAMA_MODEL=str(smollm_path), MULLAMA_EMBED_MODEL=str(minilm_path),
               MULLAMA_PARALLEL="4", PYTHONPATH=str(ROOT))
    if request.param == "fastapi":
        cmd = [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning"]
    else:
        cmd = [sys.executable, str(ROOT / "examples" / "aiohttp_app.py"), str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_until_healthy(proc, base, f"the {request.param} example", 60)
    yield base
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _greedy(prompt, n):
    return {"prompt": prompt, "max_tokens": n, "temperature": 0.0}


# What the servers use for {"temperature": 0}: the other SamplerParams defaults stay.
SERVER_GREEDY = mullama.SamplerParams(temperature=0.0)


async def _wait_idle(client, timeout=1.0):
    t0 = time.perf_counter()
    while (await client.get("/health")).json()["busy"]:
        if time.perf_counter() - t0 > timeout:
            raise AssertionError(f"context still busy after {timeout} s")
        await anyio.sleep(0.02)
    return time.perf_counter() - t0


async def test_generate_json(server, smollm):
    async with httpx.AsyncClient(base_url=server, timeout=60) as client:
        r = await client.post("/generate", json=_greedy("The capital of France is", 8))
        assert r.status_code == 200
        assert r.json()["text"].startswith(" Paris") and r.json()["finish_reason"] == "length"
        bad = await client.post("/generate", json={"prompt": "", "max_tokens": 5})
        assert bad.status_code in (400, 422)


async def test_stream_arrives_incrementally_and_ends_with_done(server, smollm):
    with mullama.Context(smollm, n_ctx=512) as ctx:
        expected = ctx.generate("Once upon a time", 80, SERVER_GREEDY)
    pieces, stamps = [], []
    async with httpx.AsyncClient(base_url=server, timeout=60) as client:
        async with client.stream("POST", "/generate/stream", json=_greedy("Once upon a time", 80)) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                stamps.append(time.perf_counter())
                if line == "data: [DONE]":
                    break
                pieces.append(json.loads(line[6:])["text"])
    assert "".join(pieces) == expected
    assert len(pieces) > 20
    # Arrival spread over the generation, not one burst at the end.
    assert stamps[len(stamps) // 2] - stamps[0] > 0.25 * (stamps[-1] - stamps[0]) > 0


async def test_client_disconnect_frees_the_context_within_a_second(server):
    async with httpx.AsyncClient(base_url=server, timeout=60) as client:
        async with client.stream("POST", "/generate/stream",
                                 json={"prompt": "Once upon a time", "max_tokens": 4000, "seed": 5}) as r:
            n = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    n += 1
                    if n == 3:
                        break
        took = await _wait_idle(client, timeout=1.0)
        assert took < 1.0
        r = await client.post("/generate", json=_greedy("The capital of France is", 4))
        assert r.json()["text"].startswith(" Paris")


async def test_aiohttp_client_streams_and_disconnects(server):
    import aiohttp

    async with aiohttp.ClientSession(base_url=server) as session:
        async with session.post("/generate/stream", json=_greedy("Water boils at", 30)) as r:
            body = (await r.read()).decode()
        assert body.rstrip().endswith("data: [DONE]") and body.count("data: ") > 5
        async with session.post("/generate/stream", json={"prompt": "Hi", "max_tokens": 4000, "seed": 1}) as r:
            await r.content.readline()
        async with httpx.AsyncClient(base_url=server, timeout=10) as client:
            await _wait_idle(client, timeout=1.0)


async def test_twenty_concurrent_clients_get_complete_answers(server, smollm):
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(20)]
    with mullama.Context(smollm, n_ctx=512) as ctx:
        expected = []
        for p in prompts:
            ctx.clear_cache()
            expected.append(ctx.generate(p, 12, SERVER_GREEDY))

    async with httpx.AsyncClient(base_url=server, timeout=120) as client:
        results = [None] * len(prompts)

        async def one(i):
            if i % 2:
                r = await client.post("/generate", json=_greedy(prompts[i], 12))
                results[i] = r.json()["text"]
            else:
                text = []
                async with client.stream("POST", "/generate/stream", json=_greedy(prompts[i], 12)) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            text.append(json.loads(line[6:])["text"])
                results[i] = "".join(text)

        async with anyio.create_task_group() as tg:
            for i in range(len(prompts)):
                tg.start_soon(one, i)
    assert results == expected


async def test_embed_endpoint(server, minilm_reference):
    async with httpx.AsyncClient(base_url=server, timeout=60) as client:
        r = await client.post("/embed", json={"texts": minilm_reference["sentences"][:3]})
        vecs = r.json()["embeddings"]
    for v, ref in zip(vecs, minilm_reference["embeddings"][:3], strict=True):
        assert mullama.cosine_similarity(v, ref) >= 0.995
