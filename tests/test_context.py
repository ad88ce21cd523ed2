"""Context: generation, streaming, prefix reuse, threads, interrupts and bad input."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import build_llama
import mullama

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Water boils at"]


@pytest.fixture(scope="module")
def llama_simple():
    # No skip: if the reference tool cannot be built, the parity tests fail, loudly.
    return build_llama.build_example("llama-simple", "examples/simple/simple.cpp")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_llama_cpp_simple(llama_simple, generator, generator_name, greedy, prompt):
    n = 40
    path = mullama.models.fetch(generator_name)
    ref = subprocess.run([str(llama_simple), "-m", str(path), "-n", str(n), prompt],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert ref.endswith("\n")
    with mullama.Context(generator, n_ctx=512) as ctx:
        out = ctx.generate(prompt, max_tokens=n, params=greedy)
    # llama-simple prints the prompt's tokens with special ones rendered (Gemma's <bos>).
    echoed = generator.detokenize(generator.tokenize(prompt), unparse_special=True)
    assert echoed.endswith(prompt)
    assert echoed + out == ref[:-1]


def test_generate_returns_completion_only(ctx, greedy):
    out = ctx.generate("The capital of France is", max_tokens=5, params=greedy)
    assert out.startswith(" Paris")
    assert ctx.last_finish_reason == "length"


def test_generation_stops_at_end_of_generation_token(smollm, ctx, greedy):
    prompt = smollm.apply_chat_template([("user", "Say hi.")])
    out = ctx.generate(prompt, max_tokens=200, params=greedy)
    assert ctx.last_finish_reason == "stop"
    assert "<|im_end|>" not in out and out.strip()


def test_generation_stops_when_context_is_full(smollm, greedy):
    with mullama.Context(smollm, n_ctx=256) as ctx:
        prompt_tokens = len(smollm.tokenize("1, 2, 3, 4, 5,"))
        # Greedy, the model counts on without an end token for longer than 256 tokens.
        ctx.generate("1, 2, 3, 4, 5,", max_tokens=10_000, params=greedy)
        assert ctx.last_finish_reason == "context"
        assert ctx.n_past == ctx.n_ctx > prompt_tokens


def test_max_tokens_zero_decodes_prompt_only(ctx, greedy):
    assert ctx.generate("Hello there", max_tokens=0, params=greedy) == ""
    assert ctx.n_past == len(ctx.model.tokenize("Hello there"))


def test_stream_joins_to_generate(smollm, greedy):
    with mullama.Context(smollm, n_ctx=512) as a, mullama.Context(smollm, n_ctx=512) as b:
        whole = a.generate("Once upon a time", max_tokens=60, params=greedy)
        pieces = list(b.generate_stream("Once upon a time", max_tokens=60, params=greedy))
    assert len(pieces) > 10
    assert "".join(pieces) == whole


def test_stream_is_lazy_pieces_arrive_before_the_end(ctx, greedy):
    stream = ctx.generate_stream("Once upon a time", max_tokens=50, params=greedy)
    assert ctx.n_past == 0  # nothing ran yet
    first = next(stream)
    assert first
    after_first = ctx.n_past
    rest = list(stream)
    assert ctx.n_past > after_first + 20
    assert stream.finish_reason == "length" and rest


def test_stream_pieces_are_whole_utf8(generator):
    # Emoji and CJK text span several byte-level (BPE) or byte-fallback (SentencePiece) tokens:
    # no piece may split a character.
    params = mullama.SamplerParams(temperature=0.0, penalty_repeat=1.0)
    prompt = "Translate to Japanese with emoji: I love sushi 🍣 and Tokyo 東京. Answer: "
    with mullama.Context(generator, n_ctx=1024) as ctx:
        pieces = list(ctx.generate_stream(prompt, max_tokens=60, params=params))
        # The check means something only if a character of several UTF-8 bytes was produced.
        assert any(len(ch.encode("utf-8")) > 1 for ch in "".join(pieces))
        for piece in pieces:
            assert "\ufffd" not in piece
            piece.encode("utf-8")
        ctx.clear_cache()
        assert "".join(pieces) == ctx.generate(prompt, max_tokens=60, params=params)


def test_stream_close_releases_context(ctx, greedy):
    with ctx.generate_stream("Once upon a time", max_tokens=100, params=greedy) as s:
        next(s)
        assert ctx.busy
    assert not ctx.busy
    assert ctx.generate("Hi", max_tokens=2, params=greedy) is not None


def test_open_stream_in_same_thread_refuses_second_generation(ctx, greedy):
    s = ctx.generate_stream("Once upon a time", max_tokens=100, params=greedy)
    next(s)
    with pytest.raises(mullama.ContextBusyError, match="still open"):
        ctx.generate("Hi", max_tokens=2)
    s.close()
    assert ctx.generate("Hi", max_tokens=2, params=greedy) is not None


def _chat_prompt(model, history) -> str:
    if model.chat_template is not None:
        return model.apply_chat_template(history)
    # The registry's Gemma 3 270M GGUF carries no chat template: Gemma's turn format, by hand
    # (a system message opens the first user turn, as Gemma's own template does).
    system = "".join(text + "\n\n" for role, text in history if role == "system")
    turns = [(role, text) for role, text in history if role != "system"]
    out = ""
    for i, (role, text) in enumerate(turns):
        who = "model" if role == "assistant" else "user"
        out += f"<start_of_turn>{who}\n{system if i == 0 else ''}{text}<end_of_turn>\n"
    return out + "<start_of_turn>model\n"


def test_prefix_reuse_decodes_only_the_new_turn(generator, greedy):
    smollm = generator  # each generation model in turn
    history = [("system", "You are a helpful assistant."), ("user", "What is the capital of France?")]
    with mullama.Context(smollm, n_ctx=1024) as chat, mullama.Context(smollm, n_ctx=1024) as fresh:
        first_prompt = _chat_prompt(smollm, history)
        reply = chat.generate(first_prompt, max_tokens=30, params=greedy)
        assert chat.last_reused_tokens == 0
        history += [("assistant", reply), ("user", "And of Italy?")]
        second_prompt = _chat_prompt(smollm, history)
        n_second = len(smollm.tokenize(second_prompt, special=True))
        second = chat.generate(second_prompt, max_tokens=30, params=greedy)
        assert chat.last_reused_tokens >= len(smollm.tokenize(first_prompt, special=True))
        assert chat.last_evaluated_tokens == n_second - chat.last_reused_tokens
        assert chat.last_evaluated_tokens < n_second // 2
        assert second == fresh.generate(second_prompt, max_tokens=30, params=greedy)
        assert fresh.last_evaluated_tokens == n_second


def test_same_prompt_twice_reuses_all_but_one_token(ctx, greedy):
    a = ctx.generate("The capital of France is", max_tokens=8, params=greedy)
    b = ctx.generate("The capital of France is", max_tokens=8, params=greedy)
    assert a == b
    assert ctx.last_evaluated_tokens == 1


def test_clear_cache_drops_everything(ctx, greedy):
    ctx.generate("The capital of France is", max_tokens=4, params=greedy)
    ctx.clear_cache()
    assert ctx.n_past == 0
    ctx.generate("The capital of France is", max_tokens=4, params=greedy)
    assert ctx.last_reused_tokens == 0


def test_generate_from_tokens_equals_generate(ctx, smollm, greedy):
    toks = smollm.tokenize("The capital of France is", special=True)
    a = ctx.generate_from_tokens(toks, max_tokens=8, params=greedy)
    ctx.clear_cache()
    assert a == ctx.generate("The capital of France is", max_tokens=8, params=greedy)


def test_params_as_a_dict(ctx, greedy):
    a = ctx.generate("The capital of France is", max_tokens=5, params={"temperature": 0.0})
    assert a.startswith(" Paris")


def test_seeded_sampling_is_reproducible(ctx):
    p = mullama.SamplerParams(temperature=0.9, seed=1234)
    a = ctx.generate("Once upon a time", max_tokens=30, params=p)
    b = ctx.generate("Once upon a time", max_tokens=30, params=p)
    assert a == b


@pytest.mark.parametrize("preset", [mullama.sampler_params_creative, mullama.sampler_params_precise, mullama.SamplerParams])
def test_presets_generate(ctx, preset):
    assert isinstance(ctx.generate("Hello", max_tokens=5, params=preset()), str)


def test_properties(smollm):
    with mullama.Context(smollm, n_ctx=512, n_batch=128, n_threads=1) as ctx:
        assert ctx.n_ctx == 512 and ctx.n_batch == 128 and ctx.n_threads == 1
        assert ctx.model is smollm
    with mullama.Context(smollm, n_ctx=256) as ctx:
        import os
        assert ctx.n_threads == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda c: c.generate(""), mullama.InvalidArgumentError, "empty"),
        (lambda c: c.generate(None), mullama.InvalidArgumentError, "str"),
        (lambda c: c.generate("hi", max_tokens=-1), mullama.InvalidArgumentError, "max_tokens"),
        (lambda c: c.generate("hi", max_tokens=1.5), mullama.InvalidArgumentError, "max_tokens"),
        (lambda c: c.generate("hi", params={"temprature": 1}), mullama.InvalidArgumentError, "unknown sampler"),
        (lambda c: c.generate("hi", params=[0.5]), mullama.InvalidArgumentError, "SamplerParams"),
        (lambda c: c.generate_from_tokens([]), mullama.InvalidArgumentError, "empty"),
        (lambda c: c.generate_from_tokens([-5]), mullama.InvalidArgumentError, "vocabulary"),
        (lambda c: c.generate_from_tokens([1, 10**9]), mullama.InvalidArgumentError, "vocabulary"),
        (lambda c: c.generate("word " * 2000), mullama.ContextOverflowError, "context holds"),
        (lambda c: c.get_embeddings(), mullama.EmbeddingsDisabledError, "embeddings=True"),
        (lambda c: c.generate_stream("hi", max_tokens=-3), mullama.InvalidArgumentError, "max_tokens"),
    ],
)
def test_bad_input_raises_and_context_stays_usable(smollm, greedy, call, exc, match):
    with mullama.Context(smollm, n_ctx=512) as c:
        with pytest.raises(exc, match=match):
            call(c)
        assert c.generate("The capital of France is", max_tokens=3, params=greedy).startswith(" Paris")


@pytest.mark.parametrize(
    "field, value",
    [("temperature", float("nan")), ("temperature", -1.0), ("top_p", 1.5), ("top_k", -1),
     ("penalty_repeat", float("inf")), ("min_p", -0.1), ("seed", -1), ("top_k", 2.5)],
)
def test_bad_sampler_params(ctx, field, value):
    p = mullama.SamplerParams()
    setattr(p, field, value)
    with pytest.raises(mullama.InvalidArgumentError, match=field):
        ctx.generate("hi", params=p)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"n_ctx": -1}, "n_ctx"), ({"n_batch": 0}, "n_batch"), ({"n_threads": 100000}, "n_threads"),
     ({"n_ctx": "big"}, "n_ctx")],
)
def test_bad_context_params(smollm, kwargs, match):
    with pytest.raises(mullama.InvalidArgumentError, match=match):
        mullama.Context(smollm, **kwargs)


def test_n_ctx_beyond_memory_raises_memory_error(smollm):
    # RoPE scaling lets the context pass the training-length check; the allocation then fails.
    with pytest.raises(MemoryError):
        mullama.Context(smollm, n_ctx=1 << 24, rope_scaling="linear", rope_freq_scale=1 / 2048)


def test_context_keeps_model_alive(smollm_path, greedy):
    model = mullama.Model.load(smollm_path)
    ctx = mullama.Context(model, n_ctx=256)
    model.close()           # deferred: the context still uses the weights
    del model
    assert ctx.generate("The capital of France is", max_tokens=3, params=greedy).startswith(" Paris")
    ctx.close()
    ctx.close()
    with pytest.raises(mullama.ClosedError):
        ctx.generate("hi")


def test_closed_model_refuses_new_context(smollm_path):
    model = mullama.Model.load(smollm_path)
    model.close()
    with pytest.raises(mullama.ClosedError):
        mullama.Context(model)


def test_two_threads_on_one_context_are_serialized(smollm, greedy):
    with mullama.Context(smollm, n_ctx=512) as ctx:
        expected = ctx.generate("The capital of France is", max_tokens=20, params=greedy)
        ctx.clear_cache()
        results, errors = [], []

        def worker():
            try:
                results.append(ctx.generate("The capital of France is", max_tokens=20, params=greedy))
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and results == [expected] * 4


def test_other_threads_run_while_generating(smollm, greedy):
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    with mullama.Context(smollm, n_ctx=512) as ctx:
        t = threading.Thread(target=ticker)
        t.start()
        t0 = time.perf_counter()
        ctx.generate("Once upon a time", max_tokens=60, params=greedy)
        t1 = time.perf_counter()
        stop.set()
        t.join()
    during = [x for x in ticks if t0 <= x <= t1]
    # A GIL held for the whole loop would leave (almost) no ticks inside it.
    assert len(during) > (t1 - t0) / 0.01


def test_cancel_from_another_thread(smollm, greedy):
    with mullama.Context(smollm, n_ctx=2048) as ctx:
        threading.Timer(0.2, ctx.cancel).start()
        with pytest.raises(mullama.GenerationCancelled):
            ctx.generate("Once upon a time", max_tokens=100_000, params=mullama.SamplerParams(temperature=0.8, seed=1))
        assert ctx.last_finish_reason == "cancelled"
        assert ctx.generate("The capital of France is", max_tokens=3, params=greedy).startswith(" Paris")


def test_cancel_mid_decode_logs_no_errors_but_real_failures_still_do(smollm, tmp_path, caplog):
    """llama.cpp logs ERROR lines when its decode is aborted; for a cancel mullama asked for
    they go to DEBUG, so a server log does not fill with errors on each client disconnect."""
    caplog.set_level(logging.DEBUG, logger="mullama")
    with mullama.Context(smollm, n_ctx=2048, n_batch=2048) as ctx:
        timer = threading.Timer(0.05, ctx.cancel)
        timer.start()
        with pytest.raises(mullama.GenerationCancelled):
            ctx.generate("hello " * 1500, 5)   # long enough that the cancel lands inside the decode
        timer.join()
    aborted = [r for r in caplog.records if "failed to decode" in r.getMessage()]
    assert aborted and all(r.levelno == logging.DEBUG for r in aborted)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    caplog.clear()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(mullama.InvalidModelError):
        mullama.Model.load(bad)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("mode", ["generate", "stream", "embed_batch"])
def test_ctrl_c_interrupts_promptly_and_context_stays_usable(smollm_path, mode):
    code = textwrap.dedent(f"""
        import os, signal, sys, threading, time, mullama
        model = mullama.Model.load({str(smollm_path)!r})
        ctx = mullama.Context(model, n_ctx=4096)
        gen = mullama.EmbeddingGenerator(model, n_ctx=256)
        params = mullama.SamplerParams(temperature=0.8, seed=3)
        sent = []
        def fire():
            time.sleep(0.5)
            sent.append(time.perf_counter())
            os.kill(os.getpid(), signal.SIGINT)
        threading.Thread(target=fire).start()
        try:
            if {mode!r} == "generate":
                ctx.generate("Once upon a time", max_tokens=4000, params=params)
            elif {mode!r} == "embed_batch":
                gen.embed_batch(["a sentence about cats and dogs number %d" % i for i in range(20000)])
            else:
                for _ in ctx.generate_stream("Once upon a time", max_tokens=4000, params=params):
                    pass
            print("NOT INTERRUPTED")
        except KeyboardInterrupt:
            print("LATENCY_MS", (time.perf_counter() - sent[0]) * 1000)
        out = ctx.generate("The capital of France is", max_tokens=3, params=mullama.sampler_params_greedy())
        assert gen.embed("still usable").shape == (576,)
        print("AFTER", repr(out))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert "LATENCY_MS" in lines, proc.stdout
    assert float(lines["LATENCY_MS"]) < 100
    assert lines["AFTER"].startswith("' Paris")


def test_a_piece_longer_than_256_bytes_comes_out_whole(vendor_dir, tmp_path, greedy):
    from tests.long_token_model import LONG_PIECE, write

    model = mullama.Model.load(write(tmp_path / "long.gguf", vendor_dir))
    with mullama.Context(model, n_ctx=128) as ctx:
        assert ctx.generate("abc", 3, greedy) == LONG_PIECE * 3
        assert list(ctx.generate_stream("abc", 2, greedy)) == [LONG_PIECE, LONG_PIECE]
    with mullama.Engine(model, n_parallel=2, n_ctx=256) as engine:
        assert list(engine.stream("abc", 2, greedy)) == [LONG_PIECE, LONG_PIECE]


def test_context_larger_than_the_training_context_is_refused(smollm):
    train = smollm.n_ctx_train
    with pytest.raises(mullama.ContextOverflowError, match=f"{2 * train}.*{train}"):
        mullama.Context(smollm, n_ctx=2 * train)
    with pytest.raises(mullama.ContextOverflowError):
        mullama.Engine(smollm, n_parallel=2, n_ctx=4 * train)


def test_rope_scaling_extends_the_context_on_purpose(smollm, greedy):
    with mullama.Context(smollm, n_ctx=2 * smollm.n_ctx_train, rope_scaling="linear", rope_freq_scale=0.5) as ctx:
        assert ctx.n_ctx == 2 * smollm.n_ctx_train
        assert ctx.generate("Once upon a time", 4, greedy)


@pytest.mark.parametrize("kwargs", [{"rope_scaling": "wide"}, {"rope_freq_scale": 0}, {"rope_freq_base": float("nan")},
                                    {"yarn_orig_ctx": -1}, {"yarn_beta_fast": "1"}])
def test_bad_rope_settings_are_refused_by_name(smollm, kwargs):
    with pytest.raises(mullama.InvalidArgumentError, match=next(iter(kwargs))):
        mullama.Context(smollm, n_ctx=256, **kwargs)


def test_a_forked_child_generates_with_a_context_made_before_the_fork(smollm, greedy):
    # The context keeps its compute threads between decodes; a forked child has none of them,
    # so it must start its own rather than wait for the parent's.
    prompt = "The capital of France is"
    with mullama.Context(smollm, n_ctx=256) as ctx:
        want = ctx.generate(prompt, 8, greedy)   # the threads are running from here on
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.write(w, ctx.generate(prompt, 8, greedy).encode())
            finally:
                os._exit(0)
        os.close(w)
        deadline = time.monotonic() + 120
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung generating with the parent's context")
            time.sleep(0.05)
        with os.fdopen(r, "rb") as f:
            got = f.read().decode()
        assert got == want
        assert ctx.generate(prompt, 8, greedy) == want   # the parent's threads still serve it
