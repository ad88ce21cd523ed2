"""mullama.aio on asyncio and trio: streaming, backpressure, cancellation, errors, fairness."""

from __future__ import annotations

import gc
import threading
import time

import anyio
import pytest

import mullama
import mullama.aio

pytestmark = pytest.mark.anyio

PROMPT = "Once upon a time"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


@pytest.fixture
async def actx(smollm):
    async with mullama.aio.AsyncContext(smollm, n_ctx=4096, n_batch=512) as c:
        yield c


async def _wait_free(actx, timeout=1.0):
    with anyio.fail_after(timeout):
        while actx.busy:
            await anyio.sleep(0.005)


def _mullama_threads():
    return [t for t in threading.enumerate() if t.name.startswith("mullama-")]


async def test_load_model_does_not_block(smollm_path):
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.sleep(0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.sleep(0)
        before = ticks
        model = await mullama.aio.load_model(smollm_path)
        during = ticks - before          # a load that blocked the loop would leave this at 0
        tg.cancel_scope.cancel()
    assert model.n_vocab == 49152 and during > 1


async def test_stream_joins_to_sync_generate(actx, smollm, greedy):
    with mullama.Context(smollm, n_ctx=512) as sync_ctx:
        expected = sync_ctx.generate(PROMPT, max_tokens=60, params=greedy)
    pieces = [p async for p in actx.stream(PROMPT, max_tokens=60, params=greedy)]
    assert len(pieces) > 10 and "".join(pieces) == expected
    assert await actx.generate(PROMPT, max_tokens=60, params=greedy) == expected


async def test_stream_pieces_arrive_before_the_end(actx, greedy):
    async with actx.stream(PROMPT, max_tokens=80, params=greedy, buffer=1) as stream:
        first = await stream.__anext__()
        seen_at_first = actx.context.n_past
        rest = [p async for p in stream]
    assert first and rest
    assert actx.context.n_past > seen_at_first + 40
    assert stream.finish_reason == "length"


async def test_slow_consumer_pauses_the_native_loop(actx, greedy):
    async with actx.stream(PROMPT, max_tokens=200, params=greedy, buffer=4) as stream:
        await stream.__anext__()
        # Wait until the worker has stood still for a second (on a slow machine, or under a
        # sanitizer, one token can take longer than a short pause); a loop that never paused
        # would stand still only at max_tokens, far past the bound below.
        seen = [actx.context.n_past]
        with anyio.fail_after(60):
            while len(seen) < 5 or len(set(seen[-5:])) > 1:
                await anyio.sleep(0.25)
                seen.append(actx.context.n_past)
        assert seen[-1] <= len(actx.model.tokenize(PROMPT)) + 4 + 3   # paused on the full buffer
        rest = [p async for p in stream]
    assert len(rest) > 100


async def test_break_then_garbage_collection_frees_the_context(actx, greedy):
    start = len(_mullama_threads())
    async for _ in actx.stream(PROMPT, max_tokens=2000, params=greedy):
        break
    gc.collect()
    await _wait_free(actx)
    assert len(_mullama_threads()) <= start
    assert (await actx.generate("The capital of France is", 3, greedy)).startswith(" Paris")


async def test_async_with_exit_stops_the_native_loop_at_once(actx, greedy):
    async with actx.stream(PROMPT, max_tokens=2000, params=greedy) as stream:
        async for _ in stream:
            break
    assert not actx.busy
    n = actx.context.n_past
    await anyio.sleep(0.2)
    assert actx.context.n_past == n


async def test_aclose(actx, greedy):
    stream = actx.stream(PROMPT, max_tokens=2000, params=greedy)
    await stream.__anext__()
    await stream.aclose()
    await stream.aclose()
    assert not actx.busy


async def test_task_cancellation_reaches_the_native_loop(actx, greedy):
    got = []

    async def consume():
        async with actx.stream(PROMPT, max_tokens=5000, params=mullama.SamplerParams(seed=1)) as s:
            async for piece in s:
                got.append(piece)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        while len(got) < 5:
            await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert not actx.busy
    with anyio.fail_after(1):   # the worker has handed the context back; let it return
        while _mullama_threads():
            await anyio.sleep(0.01)
    assert (await actx.generate("The capital of France is", 3, greedy)).startswith(" Paris")


async def test_timeout_stops_stream(actx):
    with anyio.move_on_after(0.3) as scope:
        async with actx.stream(PROMPT, max_tokens=5000, params=mullama.SamplerParams(seed=2)) as s:
            async for _ in s:
                pass
    assert scope.cancelled_caught
    assert not actx.busy


async def test_cancelling_generate_stops_native_loop(actx, greedy):
    with anyio.move_on_after(0.3) as scope:
        await actx.generate(PROMPT, max_tokens=5000, params=mullama.SamplerParams(seed=3))
    assert scope.cancelled_caught
    await _wait_free(actx, 0.5)
    assert actx.context.last_finish_reason == "cancelled"
    assert (await actx.generate("The capital of France is", 3, greedy)).startswith(" Paris")


async def test_long_prompt_can_be_interrupted(smollm, greedy):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 300   # ~3000 tokens
    async with mullama.aio.AsyncContext(smollm, n_ctx=4096, n_batch=4096) as actx:
        t0 = time.perf_counter()
        await actx.generate(long_prompt, max_tokens=0)
        full = time.perf_counter() - t0
        await actx.clear_cache()
        t0 = time.perf_counter()
        with anyio.move_on_after(full / 10):
            await actx.generate(long_prompt, max_tokens=0)
        stopped = time.perf_counter() - t0
        assert stopped < full / 2, (stopped, full)
        assert actx.context.n_past < len(smollm.tokenize(long_prompt))
        assert (await actx.generate("The capital of France is", 3, greedy)).startswith(" Paris")


async def test_errors_cross_with_their_class(actx):
    with pytest.raises(mullama.InvalidArgumentError, match="empty"):
        await actx.generate("")
    with pytest.raises(mullama.InvalidArgumentError, match="max_tokens"):
        async for _ in actx.stream("hi", max_tokens=-1):
            pass
    with pytest.raises(mullama.ContextOverflowError):
        async with actx.stream("word " * 5000) as s:
            async for _ in s:
                pass
    with pytest.raises(mullama.EmbeddingsDisabledError):
        await actx.get_embeddings()
    assert not actx.busy


async def test_concurrent_calls_wait_their_turn_in_arrival_order(actx, greedy):
    prompts = ["The capital of France is", "Water boils at", "def add(a, b):", "Once upon a time"]
    with mullama.Context(actx.model, n_ctx=512) as sync_ctx:
        expected = [sync_ctx.generate(p, 16, greedy) for p in prompts]
    order, results = [], {}

    async def call(i):
        results[i] = await actx.generate(prompts[i], 16, greedy)
        order.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            tg.start_soon(call, i)
            await anyio.sleep(0.01)
    assert order == list(range(len(prompts)))
    assert [results[i] for i in range(len(prompts))] == expected


async def test_the_event_loop_stays_free_while_streaming(actx, greedy):
    lags = []
    stop = anyio.Event()

    async def ticker():
        while not stop.is_set():
            t = time.perf_counter()
            await anyio.sleep(0.001)
            lags.append(time.perf_counter() - t - 0.001)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        n = 0
        async for _ in actx.stream(PROMPT, max_tokens=200, params=greedy):
            n += 1
        stop.set()
    assert n > 100
    assert max(lags) < 0.05, f"worst event-loop lag {max(lags) * 1000:.1f} ms"


async def test_many_streams_on_one_model(smollm, greedy):
    prompts = ["The capital of France is", "Water boils at", "def add(a, b):", "Once upon a time"]
    with mullama.Context(smollm, n_ctx=512) as sync_ctx:
        expected = [sync_ctx.generate(p, 24, greedy) for p in prompts]
    contexts = [mullama.aio.AsyncContext(smollm, n_ctx=512, n_threads=1) for _ in prompts]
    results = {}

    async def run(i):
        results[i] = "".join([p async for p in contexts[i].stream(prompts[i], 24, greedy)])

    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            tg.start_soon(run, i)
    for c in contexts:
        await c.aclose()
    assert [results[i] for i in range(len(prompts))] == expected


async def test_aread_on_a_small_buffer_reads_past_it(smollm, greedy):
    """aread() wakes the task only when the buffer fills or the generation ends; a buffer far
    smaller than the reply must still be drained, not leave the producer paused for good."""
    with mullama.Context(smollm, n_ctx=512) as sync_ctx:
        expected = sync_ctx.generate(PROMPT, 40, greedy)
    async with mullama.aio.AsyncContext(smollm, n_ctx=512) as actx:
        with anyio.fail_after(60):
            async with actx.stream(PROMPT, 40, greedy, buffer=2) as s:
                assert await s.aread() == expected
    async with mullama.aio.AsyncEngine(smollm, n_parallel=2, n_ctx=1024) as engine:
        with anyio.fail_after(60):
            async with engine.stream(PROMPT, 40, greedy, buffer=2) as s:
                assert await s.aread() == expected
            assert s.completion_tokens == 40


async def test_submitted_request_is_read_by_either_stream(smollm, greedy):
    async with mullama.aio.AsyncEngine(smollm, n_parallel=2, n_ctx=1024) as engine:
        request = engine.submit(PROMPT, 16, greedy)
        assert isinstance(request, mullama.EngineRequest)
        async with mullama.aio.AsyncEngineStream(request, engine) as s:
            text = "".join([piece async for piece in s])
        with mullama.EngineStream(engine.submit(engine.model.tokenize(PROMPT), 16, greedy), engine) as sync_s:
            assert await anyio.to_thread.run_sync(sync_s.read) == text
        assert s.finish_reason == "length" and s.usage.completion_tokens == 16
        with pytest.raises(mullama.InvalidArgumentError, match="prompt must be a str"):
            engine.stream(engine.model.tokenize(PROMPT), 4)
        with pytest.raises(mullama.InvalidArgumentError, match="tokens must be a sequence"):
            engine.stream_from_tokens(PROMPT, 4)
        with pytest.raises(mullama.InvalidArgumentError, match="buffer"):
            engine.submit(PROMPT, 4, buffer=0)


async def test_async_embeddings(minilm, minilm_reference):
    async with mullama.aio.AsyncEmbeddingGenerator(minilm) as gen:
        vecs = await gen.embed_batch(minilm_reference["sentences"])
        one = await gen.embed(minilm_reference["sentences"][0])
        assert gen.n_embd == 384
    for v, ref in zip(vecs, minilm_reference["embeddings"], strict=True):
        assert mullama.cosine_similarity(v, ref) >= 0.995
    assert mullama.cosine_similarity(one, minilm_reference["embeddings"][0]) >= 0.995
