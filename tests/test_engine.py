"""Engine: continuous batching of many requests over one model (sync and async fronts)."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time

import anyio
import pytest

import mullama
import mullama.aio

PROMPTS = ["The capital of France is", "Water boils at", "def add(a, b):", "Once upon a time",
           "The largest planet is", "My favourite colour is"]


# solo and engine run on SmolLM2: on Gemma 3, concurrent greedy text differs from solo text by
# llama.cpp's batch-shape arithmetic (see BATCH_SHAPE_SENSITIVE below), so the Engine's behaviour
# on both architectures is checked by test_concurrent_greedy_equals_served_alone_on_each_architecture.
@pytest.fixture(scope="module")
def solo(smollm):
    """What each prompt gives when served alone (greedy, 24 tokens)."""
    g = mullama.sampler_params_greedy()
    out = {}
    with mullama.Context(smollm, n_ctx=512) as ctx:
        for p in PROMPTS:
            ctx.clear_cache()
            out[p] = ctx.generate(p, 24, g)
    return out


@pytest.fixture(scope="module")
def engine(smollm):
    with mullama.Engine(smollm, n_parallel=4, n_ctx=4096, n_batch=256) as e:
        yield e


def _parallel(fn, args):
    results, errors = {}, {}

    def run(i, a):
        try:
            results[i] = fn(a)
        except Exception as exc:
            errors[i] = exc

    threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(args)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results, errors


def test_concurrent_greedy_equals_served_alone(engine, solo, greedy):
    results, errors = _parallel(lambda p: engine.generate(p, 24, greedy), PROMPTS)
    assert not errors
    assert [results[i] for i in range(len(PROMPTS))] == [solo[p] for p in PROMPTS]


def test_more_requests_than_slots_wait_and_all_complete(engine, solo, greedy):
    prompts = PROMPTS * 2          # 12 requests, 4 slots
    results, errors = _parallel(lambda p: engine.generate(p, 24, greedy), prompts)
    assert not errors
    assert [results[i] for i in range(len(prompts))] == [solo[p] for p in prompts]
    s = engine.stats()
    assert s["running"] == 0 and s["waiting"] == 0 and s["slots"] == 4 and s["generated_tokens"] > 0


def test_stream_pieces_join_to_generate(engine, solo, greedy):
    with engine.stream(PROMPTS[0], 24, greedy) as s:
        pieces = list(s)
    assert "".join(pieces) == solo[PROMPTS[0]] and len(pieces) > 5
    assert s.finish_reason == "length"


def test_cancelling_any_request_does_not_disturb_the_others(engine, solo, greedy):
    long = mullama.SamplerParams(temperature=0.8, seed=9)
    victims = []

    def victim_mid_generation(_):
        with engine.stream("Tell me a long story.", 2000, long) as s:
            for i, _piece in enumerate(s):
                if i == 5:
                    break
        victims.append("mid")
        return None

    def victim_waiting(_):
        s = engine.stream("Another long story.", 2000, long)
        time.sleep(0.05)
        s.close()
        victims.append("waiting")
        return None

    def victim_in_prompt(_):
        s = engine.stream("word " * 900, 10, long)
        time.sleep(0.02)
        s.close()
        victims.append("prompt")
        return None

    def good(p):
        return engine.generate(p, 24, greedy)

    jobs = [victim_mid_generation, victim_waiting, victim_in_prompt] + [good] * 4
    args = [None, None, None] + PROMPTS[:4]
    results, errors = _parallel(lambda ja: ja[0](ja[1]), list(zip(jobs, args)))
    assert not errors
    assert sorted(victims) == ["mid", "prompt", "waiting"]
    assert [results[i] for i in range(3, 7)] == [solo[p] for p in PROMPTS[:4]]
    deadline = time.monotonic() + 5
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.stats()["running"] == 0


def test_bad_input_fails_only_that_request(engine, solo, greedy):
    def job(kind):
        if kind == "empty":
            return engine.generate("", 5)
        if kind == "tokens":
            return engine.generate_from_tokens([1, -4], 5)
        if kind == "params":
            return engine.generate("hi", 5, {"top_p": 7})
        if kind == "long":
            return engine.generate("word " * 5000, 5)
        return engine.generate(kind, 24, greedy)

    kinds = ["empty", "tokens", "params", "long"] + PROMPTS[:3]
    results, errors = _parallel(job, kinds)
    assert isinstance(errors[0], mullama.InvalidArgumentError)
    assert isinstance(errors[1], mullama.InvalidArgumentError)
    assert isinstance(errors[2], mullama.InvalidArgumentError)
    assert isinstance(errors[3], mullama.ContextOverflowError)
    assert [results[i] for i in range(4, 7)] == [solo[p] for p in PROMPTS[:3]]


def test_full_sequence_ends_with_length_not_the_engine(smollm, greedy):
    with mullama.Engine(smollm, n_parallel=2, n_ctx=512, n_batch=128) as e:   # 256 per sequence
        with e.stream("1, 2, 3, 4, 5,", 10_000, greedy) as s:
            text = "".join(s)
        assert s.finish_reason == "context"   # greedy, the model counts on past 256 tokens
        assert text
        assert e.generate("The capital of France is", 4, greedy).startswith(" Paris")


def test_close_ends_running_requests(smollm):
    before = set(_engine_threads())
    e = mullama.Engine(smollm, n_parallel=2, n_ctx=1024)
    mine = set(_engine_threads()) - before
    assert len(mine) == 1
    s = e.stream("Once upon a time", 5000, mullama.SamplerParams(seed=1))
    next(s)
    e.close()
    e.close()
    with pytest.raises(mullama.ClosedError):
        list(s)
    with pytest.raises(mullama.ClosedError):
        e.generate("hi")
    assert not any(t.is_alive() for t in mine)   # close() joined it


def _engine_threads():
    return [t for t in threading.enumerate() if t.name == "mullama-engine" and t.is_alive()]


def test_dropped_engine_frees_its_thread_and_streams_keep_it_alive(smollm, greedy):
    import gc
    import weakref
    before = len(_engine_threads())
    e = mullama.Engine(smollm, n_parallel=2, n_ctx=1024)
    expected = e.generate("The capital of France is", 6, greedy)
    s = e.stream("The capital of France is", 6, greedy)
    ref = weakref.ref(e)
    del e
    gc.collect()
    assert ref() is not None                       # the open stream holds the engine
    assert "".join(s) == expected
    del s
    gc.collect()
    deadline = time.monotonic() + 10
    while (ref() is not None or len(_engine_threads()) > before) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ref() is None, "an Engine nobody holds was not freed"
    assert len(_engine_threads()) == before, "the engine thread outlived its Engine"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_engine_streams_and_cancels(smollm, solo, greedy, backend):
    async def main():
        async with mullama.aio.AsyncEngine(smollm, n_parallel=4, n_ctx=4096, n_batch=256) as engine:
            results = {}

            async def one(i, p):
                async with engine.stream(p, 24, greedy) as s:
                    results[i] = "".join([piece async for piece in s])

            async def cancelled():
                with anyio.move_on_after(0.3):
                    async with engine.stream("A long story:", 5000, mullama.SamplerParams(seed=4)) as s:
                        async for _ in s:
                            pass

            async with anyio.create_task_group() as tg:
                tg.start_soon(cancelled)
                for i, p in enumerate(PROMPTS[:4]):
                    tg.start_soon(one, i, p)
            assert [results[i] for i in range(4)] == [solo[p] for p in PROMPTS[:4]]
            assert (await engine.generate(PROMPTS[0], 24, greedy)) == solo[PROMPTS[0]]
            assert engine.stats()["running"] == 0

    anyio.run(main, backend=backend)


# Measured on Gemma 3 270M Q4_K_M (CPU): greedy text depends on how a prompt's tokens are split
# into decodes. A Context that decodes the prompt one token at a time (n_batch=1) gives exactly
# the text the Engine gives for "The capital of France is" among concurrent requests, and four
# identical concurrent requests give the solo text: llama.cpp's arithmetic differs between those
# batch shapes, and this small model's greedy choice is close enough to flip. SmolLM2 (Q4_1) does
# not flip on these prompts. Which shapes concurrent prompts get depends on when each arrives, and
# on an AVX-512 machine the four texts also came out equal to the solo ones, so on Gemma the test
# asks only that each text is its own prompt's: it begins as that prompt's solo text does, longer
# than it agrees with any other prompt's.
BATCH_SHAPE_SENSITIVE = {"gemma-3-270m"}


def test_concurrent_greedy_equals_served_alone_on_each_architecture(generator, generator_name, greedy):
    alone = {}
    with mullama.Context(generator, n_ctx=512) as ctx:
        for p in PROMPTS[:4]:
            ctx.clear_cache()
            alone[p] = ctx.generate(p, 24, greedy)
    with mullama.Engine(generator, n_parallel=4, n_ctx=4096, n_batch=256) as e:
        one_by_one = [e.generate(p, 24, greedy) for p in PROMPTS[:4]]
        results, errors = _parallel(lambda p: e.generate(p, 24, greedy), PROMPTS[:4])
    assert not errors
    assert one_by_one == [alone[p] for p in PROMPTS[:4]]   # the Engine alone is the Context
    together = [results[i] for i in range(4)]
    if generator_name in BATCH_SHAPE_SENSITIVE:
        for text, p in zip(together, PROMPTS[:4]):
            agree = {q: len(os.path.commonprefix([text, alone[q]])) for q in PROMPTS[:4]}
            assert text.strip() and all(agree[p] > n for q, n in agree.items() if q != p), (p, text)
    else:
        assert together == [alone[p] for p in PROMPTS[:4]]


SYSTEM = ("You are a careful assistant. Answer in one short sentence, name your sources when you "
          "can, say so when you do not know, and never invent numbers. ") * 6


def _alone(model, prompts, n, greedy):
    with mullama.Context(model, n_ctx=1024) as ctx:
        out = []
        for p in prompts:
            ctx.clear_cache()
            out.append(ctx.generate(p, n, greedy))
    return out


def test_a_slot_keeps_its_cache_for_the_next_request_that_begins_the_same(smollm, greedy):
    first = SYSTEM + "Question: what is the capital of France?"
    second = first + " And of Italy?"
    with mullama.Engine(smollm, n_parallel=2, n_ctx=2048) as e:
        assert e.cached_prefix(first) == 0
        a = e.complete(first, 16, greedy)
        held = e.cached_prefix(second)
        b = e.complete(second, 16, greedy)
        unrelated_held = e.cached_prefix("Water boils at")
        unrelated = e.complete("Water boils at", 16, greedy)
        stats = e.stats()
    n_first = len(smollm.tokenize(first))
    assert held == b.usage.reused_tokens   # what the slot held is what the second did not decode
    assert unrelated_held == 0
    assert a.usage.reused_tokens == 0
    assert b.usage.reused_tokens >= n_first - 1        # the first prompt was not decoded again
    assert b.usage.evaluated_tokens == b.usage.prompt_tokens - b.usage.reused_tokens
    assert unrelated.usage.reused_tokens == 0           # a BOS in common is not worth reusing
    assert [a.text, b.text, unrelated.text] == _alone(smollm, [first, second, "Water boils at"], 16, greedy)
    assert stats["reused_tokens"] == b.usage.reused_tokens
    assert stats["prompt_tokens_decoded"] == sum(c.usage.evaluated_tokens for c in (a, b, unrelated))


def _first_top(logprobs):
    return {t.token: t.logprob for t in logprobs[0].top}


def _like_alone(model, prompt, top, params):
    """True when the first token's five best alternatives, with their log-probabilities, are
    what the prompt gives decoded alone, up to the differences llama.cpp's sums show between
    batch shapes (measured up to 0.3 on these prompts with no sharing at all). A sequence
    copied wrong, or not at all, gives another distribution."""
    with mullama.Context(model, n_ctx=1024) as ctx:
        ref = _first_top(ctx.complete(prompt, 1, params).logprobs)
    common = set(ref) & set(top)
    return len(common) >= 4 and max(abs(ref[k] - top[k]) for k in common) < 0.6


LOGPROBS = mullama.SamplerParams(temperature=0.0, top_k=1, logprobs=True, n_probs=5)


def test_running_requests_with_a_shared_prefix_decode_it_once(smollm):
    questions = ["What is the capital of France?", "Why is the sky blue?", "Name a prime number.",
                 "What is two plus two?"]
    prompts = [SYSTEM + "Question: " + q for q in questions]
    n_system = len(smollm.tokenize(SYSTEM + "Question:"))
    with mullama.Engine(smollm, n_parallel=4, n_ctx=4096, n_batch=256) as e:
        requests = [e.submit(p, 4, LOGPROBS, buffer=1 << 20) for p in prompts]   # queued at once
        streams = [mullama.EngineStream(r, e) for r in requests]
        for s in streams:
            s.read()
        decoded = e.stats()["prompt_tokens_decoded"]
    one = len(smollm.tokenize(prompts[0]))
    assert decoded <= 1.5 * one, f"{decoded} prompt tokens decoded for 4 requests; one alone is {one}"
    assert sum(s.usage.reused_tokens >= n_system - 1 for s in streams) == 3
    assert [_like_alone(smollm, p, _first_top(s.logprobs), LOGPROBS) for p, s in zip(prompts, streams)] == [True] * 4
    # the check can fail: another prompt's distribution is not "like" this one's
    assert not _like_alone(smollm, prompts[1], _first_top(streams[0].logprobs), LOGPROBS)


def test_a_follower_whose_leader_is_cancelled_still_completes(smollm):
    prompts = [SYSTEM + "Question: What is the capital of France?", SYSTEM + "Question: Why is the sky blue?"]
    with mullama.Engine(smollm, n_parallel=2, n_ctx=4096, n_batch=64, prompt_chunk=16) as e:
        leader = e.submit(prompts[0], 4, LOGPROBS)
        follower = e.submit(prompts[1], 4, LOGPROBS, buffer=1 << 20)
        leader.cancel()
        stream = mullama.EngineStream(follower, e)
        stream.read()
    assert stream.finish_reason in ("length", "stop") and stream.logprobs
    assert _like_alone(smollm, prompts[1], _first_top(stream.logprobs), LOGPROBS)


def _first_piece_steps(model, prompts, greedy, **engine_args):
    """The engine step (counted from 1) at which each prompt's first piece came, for prompts
    (token ids) that all reach the engine in one round, and their texts. The GIL stays with this
    thread while it submits them, so the idle engine thread, woken by the first, looks at the
    queue only after the last."""
    with mullama.Engine(model, n_parallel=len(prompts), n_ctx=1024 * len(prompts), **engine_args) as e:
        e.generate("Hello", 1, greedy)
        before = e.stats()["steps"]
        firsts = [0] * len(prompts)

        def waker(k):
            def wake():   # on the engine thread, as it hands out the piece
                firsts[k] = e.stats()["steps"] - before
            return wake

        interval = sys.getswitchinterval()
        sys.setswitchinterval(60.0)
        try:
            requests = [e.submit(p, 1, greedy) for p in prompts]
            for k, r in enumerate(requests):
                r.waker = waker(k)
        finally:
            sys.setswitchinterval(interval)
        texts = [mullama.EngineStream(r, e).read() for r in requests]
        return firsts, texts


def test_prompts_arriving_together_share_a_step_only_within_prompt_group(smollm, greedy):
    prompts = [smollm.tokenize(f"{i}. The river runs past the old mill and the stone bridge.") for i in range(4)]
    assert len({len(p) for p in prompts}) == 1 and 20 > len(prompts[0]) > 8
    together, texts = _first_piece_steps(smollm, prompts, greedy, prompt_group=1024)
    assert together == [1, 1, 1, 1]
    apart, texts_apart = _first_piece_steps(smollm, prompts, greedy, prompt_group=8)
    assert apart == [1, 2, 3, 4]   # one prompt per step, the oldest first among equals
    assert texts_apart == texts
    pairs, _ = _first_piece_steps(smollm, prompts, greedy, prompt_group=2 * len(prompts[0]))
    assert pairs == [1, 1, 2, 2]
    with pytest.raises(mullama.InvalidArgumentError, match="prompt_group"):
        mullama.Engine(smollm, n_parallel=2, prompt_group=0)


def test_a_short_prompt_goes_before_a_long_one_that_came_first(smollm, greedy):
    long = smollm.tokenize("The river runs past the old mill and the stone bridge. " * 12)
    short = smollm.tokenize("Water boils at")
    assert 3 * 64 >= len(long) > 2 * 64
    firsts, _ = _first_piece_steps(smollm, [long, short], greedy, prompt_chunk=64, prompt_group=16)
    assert firsts == [4, 1]   # the long prompt takes three chunks of 64 after the short one


def test_requests_take_consecutive_slots_and_bring_their_cached_prefix(smollm, greedy):
    # One cache stream per sequence: llama.cpp decodes a batch in one pass per run of consecutive
    # sequence ids, so requests go where the busy slots stay consecutive, and a cached prefix held
    # by another free slot is copied there instead of pulling the request away from the others.
    filler = " The river runs past the old mill, where the miller keeps bees beside the stone bridge."
    bases = [smollm.tokenize(f"Story {k}." + filler * 3) for k in range(6)]
    with mullama.Engine(smollm, n_parallel=6, n_ctx=6 * 512) as e:
        primed = [e.submit(b, 1, greedy) for b in bases]
        for r in primed:
            mullama.EngineStream(r, e).read()
        slot_of = {r.slot: k for k, r in enumerate(primed)}
        assert sorted(slot_of) == list(range(6))
        apart = [slot_of[i] for i in (0, 2, 4)]   # the prompts cached in three slots, none next to another
        prompts = [bases[k] + smollm.tokenize(" Then what?", add_bos=False) for k in apart]
        interval = sys.getswitchinterval()
        sys.setswitchinterval(60.0)   # all three queued before the engine thread looks
        try:
            requests = [e.submit(p, 16, greedy) for p in prompts]
        finally:
            sys.setswitchinterval(interval)
        streams = [mullama.EngineStream(r, e) for r in requests]
        texts = [s.read() for s in streams]
    slots = sorted(r.slot for r in requests)
    assert slots == list(range(slots[0], slots[0] + 3)), f"requests in slots {slots}"
    assert all(s.usage.reused_tokens >= len(bases[0]) - 1 for s in streams)
    with mullama.Context(smollm, n_ctx=1024) as ctx:
        for p, text in zip(prompts, texts):
            ctx.clear_cache()
            assert text == ctx.generate_from_tokens(p, 16, greedy)


@pytest.mark.parametrize("flash_attn, word", [(False, "disabled"), (True, "enabled")])
def test_flash_attn_reaches_the_engines_context(smollm, greedy, caplog, flash_attn, word):
    """llama.cpp logs the setting it got; the text is what a Context with the same setting gives."""
    caplog.set_level(logging.INFO, logger="mullama")
    with mullama.Engine(smollm, n_parallel=2, n_ctx=512, flash_attn=flash_attn) as e:
        got = e.generate(PROMPTS[0], 12, greedy)
    lines = [r.getMessage() for r in caplog.records if "flash_attn" in r.getMessage()]
    assert any(re.search(rf"flash_attn\s*=\s*{word}", line) for line in lines), lines
    with mullama.Context(smollm, n_ctx=512, flash_attn=flash_attn) as ctx:
        assert got == ctx.generate(PROMPTS[0], 12, greedy)


@pytest.mark.parametrize("value", ["off", 0, 1.0])
def test_flash_attn_must_be_none_or_a_bool(smollm, value):
    with pytest.raises(mullama.InvalidArgumentError, match="flash_attn"):
        mullama.Engine(smollm, n_parallel=2, n_ctx=512, flash_attn=value)
    with pytest.raises(mullama.InvalidArgumentError, match="flash_attn"):
        mullama.Context(smollm, n_ctx=512, flash_attn=value)
