"""Saved sessions: Context.save_state / load_state (and get_state / set_state) with the token
history; a state continues in another process as if never interrupted, and a state that does
not fit raises StateError without harming the context."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import mullama

PROMPT = "The three primary colours are"
N_CTX = 512


@pytest.fixture
def warm(smollm, greedy):
    """A context that has decoded PROMPT and generated 8 tokens after it."""
    with mullama.Context(smollm, n_ctx=N_CTX) as ctx:
        ctx.generate(PROMPT, 8, greedy)
        yield ctx


def test_state_continues_in_a_new_process_without_decoding_the_prompt_again(smollm, smollm_path, greedy, tmp_path):
    with mullama.Context(smollm, n_ctx=N_CTX) as fresh:
        expected = fresh.generate(PROMPT, 24, greedy)
    with mullama.Context(smollm, n_ctx=N_CTX) as ctx:
        ctx.generate(PROMPT, 0)
        ctx.save_state(tmp_path / "session.bin")
        saved_tokens = ctx.cached_tokens
    script = (
        "import json, sys, mullama\n"
        "m = mullama.Model.load(sys.argv[1])\n"
        f"c = mullama.Context(m, n_ctx={N_CTX})\n"
        "c.load_state(sys.argv[2])\n"
        "cached = c.cached_tokens\n"
        f"text = c.generate({PROMPT!r}, 24, mullama.sampler_params_greedy())\n"
        "print(json.dumps({'text': text, 'cached': cached, 'evaluated': c.last_evaluated_tokens}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(smollm_path), str(tmp_path / "session.bin")],
                         capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["cached"] == saved_tokens
    assert got["evaluated"] <= 1
    assert got["text"] == expected


def test_bytes_round_trip_keeps_the_conversation(warm, smollm, greedy):
    data = warm.get_state()
    history = smollm.detokenize(warm.cached_tokens)
    with mullama.Context(smollm, n_ctx=N_CTX) as other:
        other.set_state(data)
        assert other.cached_tokens == warm.cached_tokens
        more = other.generate(history + " and", 12, greedy)
        assert other.last_reused_tokens >= len(warm.cached_tokens) - 1
    assert more == warm.generate(history + " and", 12, greedy)


def test_a_state_of_another_model_raises_and_leaves_the_context_alone(warm, gemma):
    with mullama.Context(gemma, n_ctx=N_CTX) as ctx:
        ctx.generate("Hello", 0)
        before = ctx.cached_tokens
        with pytest.raises(mullama.StateError, match="saved with model"):
            ctx.set_state(warm.get_state())
        assert ctx.cached_tokens == before


def test_a_state_of_another_context_size_raises(warm, smollm):
    with mullama.Context(smollm, n_ctx=N_CTX * 2) as ctx:
        with pytest.raises(mullama.StateError, match=f"n_ctx={N_CTX}"):
            ctx.set_state(warm.get_state())


@pytest.mark.parametrize("damage", ["truncated", "garbled", "empty", "not_a_state", "appended"])
def test_damaged_states_raise_state_error_and_the_context_still_works(warm, smollm, greedy, tmp_path, damage):
    data = bytearray(warm.get_state())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbled":
        data[len(data) // 2] ^= 0x5A
    elif damage == "empty":
        data = bytearray()
    elif damage == "not_a_state":
        data = bytearray(b"GGUF" + bytes(100))
    else:
        data += b"\0"
    path = tmp_path / "bad.bin"
    path.write_bytes(data)
    with mullama.Context(smollm, n_ctx=N_CTX) as ctx:
        ctx.generate(PROMPT, 0)
        before = ctx.cached_tokens
        with pytest.raises(mullama.StateError):
            ctx.load_state(path)
        assert ctx.cached_tokens == before
        assert ctx.generate(PROMPT, 4, greedy) == warm.generate(PROMPT, 4, greedy)


def test_missing_file_and_bad_types_are_named(warm, tmp_path):
    with pytest.raises(mullama.StateError, match="does not exist"):
        warm.load_state(tmp_path / "nope.bin")
    with pytest.raises(mullama.InvalidArgumentError, match="bytes"):
        warm.set_state("not bytes")
    with pytest.raises(mullama.StateError, match="could not be written"):
        warm.save_state(tmp_path / "no-such-dir" / "s.bin")


def test_save_is_atomic_and_overwrites(warm, tmp_path):
    path = tmp_path / "s.bin"
    path.write_bytes(b"old")
    warm.save_state(path)
    assert path.read_bytes() == warm.get_state()
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"]


def test_an_encoder_model_has_no_state(minilm):
    with mullama.Context(minilm, n_ctx=128, embeddings=True) as ctx:
        with pytest.raises(mullama.InvalidArgumentError, match="no state"):
            ctx.get_state()


def test_state_on_a_closed_context_raises(smollm):
    ctx = mullama.Context(smollm, n_ctx=N_CTX)
    ctx.close()
    with pytest.raises(mullama.ClosedError):
        ctx.get_state()


@pytest.mark.asyncio
async def test_async_context_saves_and_loads_the_same_state(smollm, greedy, tmp_path):
    from mullama.aio import AsyncContext

    async with AsyncContext(smollm, n_ctx=N_CTX) as actx:
        await actx.generate(PROMPT, 0)
        await actx.save_state(tmp_path / "a.bin")
        data = await actx.get_state()
        expected = await actx.generate(PROMPT, 12, greedy)
    async with AsyncContext(smollm, n_ctx=N_CTX) as other:
        await other.load_state(tmp_path / "a.bin")
        assert other.cached_tokens == smollm.tokenize(PROMPT)
        assert await other.generate(PROMPT, 12, greedy) == expected
        await other.set_state(data)
        with pytest.raises(mullama.StateError):
            await other.set_state(data[:-1])
