"""Saved sessions: Context.save_state / load_state (and get_state / set_state) with the token
history; a state continues in another process as if never interrupted, and a state that does
not fit raises StateError without harming the context."""

from __future__ import annotations

import hashlib
import json
import struct
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


def _crafted(data: bytes, positions: dict[int, int] | None = None, break_data: bool = False,
             nan_keys: bool = False) -> bytes:
    """The state changed behind a valid checksum, as a state made on purpose can be: cells moved
    to ``positions``, its data unreadable (``break_data``), or the first layer's keys all NaN.
    llama.cpp's sequence state (pinned release, plain KV cache): magic, seq_id, n_stream, then
    per stream cell_count (u32 each), per cell pos (i32), n_seq_id (u32) and seq_id (i32), then
    the stream's data: v_trans and n_layer (u32), then per layer the keys' type (i32), row size
    (u64) and rows. The sequence's cells are in the first stream."""
    tokens, blob = _parts(data)
    n_tokens = len(tokens)
    n_stream, n_cells = struct.unpack_from("<II", data, blob + 8)
    cells = blob + 16
    # The layout this helper knows: a test of nothing if llama.cpp's format moved.
    assert n_stream >= 1 and n_cells == n_tokens
    assert [struct.unpack_from("<iIi", data, cells + 12 * i) for i in range(n_cells)] == \
        [(i, 1, 0) for i in range(n_cells)]
    out = bytearray(data[:-32])
    for i, pos in (positions or {}).items():
        struct.pack_into("<i", out, cells + 12 * i, pos)
    keys = cells + 12 * n_cells + 8
    if break_data:
        struct.pack_into("<I", out, keys - 8, 0xDD0000)
    if nan_keys:
        key_type, row = struct.unpack_from("<iQ", out, keys)
        assert key_type in (0, 1)   # f32 or f16: bytes of all ones are NaN in both
        out[keys + 12:keys + 12 + row * n_cells] = b"\xff" * (row * n_cells)
    return bytes(out) + hashlib.sha256(out).digest()


def _parts(data: bytes) -> tuple[list[int], int]:
    """A state's tokens, and where llama.cpp's bytes begin in it (see mullama._state)."""
    (head_len,) = struct.unpack_from("<I", data, 8)
    n_tokens = json.loads(data[12:12 + head_len])["n_tokens"]
    return list(struct.unpack_from(f"<{n_tokens}i", data, 12 + head_len)), 12 + head_len + 4 * n_tokens


@pytest.mark.parametrize("refused_by", ["llama.cpp", "positions"])
def test_a_state_made_past_the_checksum_leaves_no_cell_behind(warm, smollm, greedy, refused_by):
    # Cells at negative positions are out of llama_memory_seq_rm's reach: llama.cpp refusing
    # the data after placing them used to leave them in the sequence, changing every later reply.
    data = warm.get_state()
    bad = _crafted(data, {3: -1000, 5: -1}, break_data=refused_by == "llama.cpp")
    expected = warm.generate(PROMPT, 6, greedy)
    with mullama.Context(smollm, n_ctx=N_CTX) as ctx:
        ctx.set_state(data)
        with pytest.raises(mullama.StateError, match="could not be loaded"):
            ctx.set_state(bad)
        assert ctx.cached_tokens == []
        assert ctx.generate(PROMPT, 6, greedy) == expected
        ctx.set_state(data)
        assert ctx.generate(PROMPT, 6, greedy) == expected


def test_a_state_whose_cache_is_nan_raises_decode_error_naming_nan(warm, smollm, greedy):
    # NaN logits used to read as a row the model never computed: "an embedding model?".
    data = warm.get_state()
    expected = warm.generate(PROMPT, 6, greedy)
    with mullama.Context(smollm, n_ctx=N_CTX) as ctx:
        ctx.set_state(_crafted(data, nan_keys=True))
        for params in (greedy, mullama.SamplerParams(temperature=0.8, seed=3, logprobs=True, n_probs=2)):
            with pytest.raises(mullama.DecodeError, match="NaN logits"):
                ctx.generate(PROMPT, 6, params)
        ctx.clear_cache()
        assert ctx.generate(PROMPT, 6, greedy) == expected


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


# -- Engine sequences ---------------------------------------------------------------------------

def test_an_engine_request_keeps_its_state_and_a_later_one_continues_from_it(smollm, greedy):
    turn1 = "User: name a colour.\nAssistant:"
    with mullama.Engine(smollm, n_parallel=2, n_ctx=2 * N_CTX) as engine:
        first = engine.complete(turn1, 8, greedy, keep_state=True)
        assert first.state is not None
        follow = turn1 + first.text + "\nUser: and another?\nAssistant:"
        resumed = engine.complete(follow, 8, greedy, state=first.state)
        plain = engine.complete(follow, 8, greedy)
    assert resumed.text == plain.text
    assert resumed.usage.reused_tokens >= len(smollm.tokenize(turn1))
    assert resumed.usage.evaluated_tokens == resumed.usage.prompt_tokens - resumed.usage.reused_tokens
    assert plain.usage.reused_tokens == 0


def test_engine_and_context_states_are_interchangeable(smollm, greedy):
    with mullama.Engine(smollm, n_parallel=2, n_ctx=2 * N_CTX) as engine:
        with mullama.Context(smollm, n_ctx=2 * N_CTX, n_seq_max=2) as ctx:
            ctx.generate(PROMPT, 0)
            from_ctx = engine.complete(PROMPT + " red,", 8, greedy, state=ctx.get_state())
            assert from_ctx.usage.reused_tokens == len(ctx.cached_tokens)
            kept = engine.complete(PROMPT, 6, greedy, keep_state=True)
            ctx.set_state(kept.state)
            assert ctx.cached_tokens[: len(smollm.tokenize(PROMPT))] == smollm.tokenize(PROMPT)


def test_engine_refuses_a_state_that_does_not_begin_the_prompt(smollm, greedy):
    with mullama.Engine(smollm, n_parallel=2, n_ctx=2 * N_CTX) as engine:
        kept = engine.complete(PROMPT, 4, greedy, keep_state=True)
        with pytest.raises(mullama.InvalidArgumentError, match="not the beginning"):
            engine.complete("Something else entirely", 4, greedy, state=kept.state)
        with pytest.raises(mullama.StateError):
            engine.complete(PROMPT, 4, greedy, state=kept.state[:-3])
        with mullama.Engine(smollm, n_parallel=1, n_ctx=N_CTX // 2) as small:
            with pytest.raises(mullama.StateError, match="n_ctx"):
                small.complete(PROMPT, 4, greedy, state=kept.state)
        with mullama.Engine(smollm, n_parallel=4, n_ctx=4 * N_CTX) as wider:
            with pytest.raises(mullama.StateError, match="2 sequences"):
                wider.complete(PROMPT, 4, greedy, state=kept.state)


def test_an_engine_slot_a_bad_state_left_cells_in_waits_until_the_engine_is_idle(smollm, greedy):
    long = PROMPT + (" red, yellow and blue. Mixing two of them gives a secondary colour: green, orange or "
                     "purple. Mixing all three gives a dark brown, close to black.")
    other = "Write a short poem about the sea."
    with mullama.Engine(smollm, n_parallel=2, n_ctx=2 * N_CTX) as source:   # no cache holds it
        kept = source.complete(long, 4, greedy, keep_state=True)
    assert len(smollm.tokenize(long)) >= 32   # long enough for an engine to restore it
    with mullama.Engine(smollm, n_parallel=2, n_ctx=2 * N_CTX) as engine:
        expected = engine.generate(other, 12, greedy)
        bad = _crafted(kept.state, {3: -1000, 5: -1}, break_data=True)
        with engine.stream(PROMPT + " and", 64, greedy, buffer=1) as running:
            next(iter(running))   # one slot busy (then paused: nothing reads it)
            with pytest.raises(mullama.StateError, match="could not be loaded"):
                engine.complete(_parts(kept.state)[0] + smollm.tokenize(" So"), 4, greedy, state=bad)
            # The other slot holds what llama.cpp left: this request waits for the engine to be
            # idle, when the whole cache is cleared, instead of attending to those cells.
            late = engine.submit(other, 12, greedy, buffer=1 << 30)
        with mullama.EngineStream(late, engine) as s:
            assert "".join(s) == expected
        with pytest.raises(mullama.DecodeError, match="NaN logits"):
            engine.complete(_parts(kept.state)[0] + smollm.tokenize(" So"), 4, greedy,
                            state=_crafted(kept.state, nan_keys=True))
        assert engine.generate(other, 12, greedy) == expected


@pytest.mark.asyncio
async def test_async_engine_mirrors_keep_state(smollm, greedy):
    from mullama.aio import AsyncEngine

    async with AsyncEngine(smollm, n_parallel=2, n_ctx=2 * N_CTX) as engine:
        first = await engine.complete(PROMPT, 6, greedy, keep_state=True)
        async with engine.stream(PROMPT + first.text, 6, greedy, state=first.state, keep_state=True) as s:
            text = await s.aread()
        assert s.state is not None and s.usage.reused_tokens > 0
        assert text == await engine.generate(PROMPT + first.text, 6, greedy)
