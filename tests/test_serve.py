"""`mullama serve`, for real on 127.0.0.1: a subprocess driven by the official `openai` client
(sync and async), with httpx for raw bytes and error cases."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import free_port, wait_until_healthy

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key-12"
MODEL = "smollm"
# One compute thread: on a machine whose cores are all busy (CI beside other jobs), llama.cpp's
# threads waiting for each other at every step made a 64-token reply take 40-110 s, against
# 1.6 s with one thread (2 shared cores).
THREADS = ["--threads", "1"]
EMBED = "minilm"


def _start(args: list[str], key: str | None = KEY) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "mullama", "serve", "--port", str(port), "--log-level", "warning", *args]
    if key:
        cmd += ["--api-key", key]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_until_healthy(proc, base, "mullama serve", 90)
    return proc, base


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("mullama serve did not exit within 20 s of SIGTERM")


@contextlib.contextmanager
def served(args: list[str]) -> Iterator[str]:
    """A running `mullama serve` with args, stopped at the end; its log must be clean."""
    proc, base = _start(args)
    yield base
    _stop(proc)
    log = proc.stdout.read().decode()
    # uvicorn drains, then ends the process with the signal it got, as a program killed by it.
    assert proc.returncode in (0, -signal.SIGTERM) and "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="module")
def server(smollm_path, minilm_path):
    with served(["-m", str(smollm_path), "--embedding-model", str(minilm_path), "--alias", MODEL,
                 "--parallel", "8", "--ctx-size", "8192", *THREADS]) as base:
        yield base


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def _embed_name(client) -> str:
    names = [m.id for m in client.models.list().data]
    assert MODEL in names and len(names) == 2
    return next(n for n in names if n != MODEL)


def _greedy_chat(client, content, n=24, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          max_tokens=n, temperature=0, **kw)


# -- chat -------------------------------------------------------------------------------------

def test_chat_completion_has_openai_shape(client):
    r = _greedy_chat(client, "What is the capital of France?")
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    [choice] = r.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # Greedy decoding is repeatable; content parts are the same text as a string.
    again = client.chat.completions.create(
        model=MODEL, max_tokens=24, temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}])
    assert again.choices[0].message.content == choice.message.content


def test_chat_n_gives_choices_decoded_together(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                                       max_tokens=16, n=3, seed=7, temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content for c in r.choices)
    assert r.usage.completion_tokens > 16   # the three choices' tokens, added up
    assert len({c.message.content for c in r.choices}) > 1   # a seed of its own for each choice


def test_stop_string_across_token_boundaries(client):
    ref = _greedy_chat(client, "Write three sentences about the sea.", 40).choices[0].message.content
    # A stop string that starts inside one token and ends inside another.
    cut = len(ref) // 2
    stop = ref[cut:cut + 5]
    assert len(stop.strip()) >= 3
    r = _greedy_chat(client, "Write three sentences about the sea.", 40, stop=[stop, "@@@"])
    assert r.choices[0].message.content == ref[:ref.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in _greedy_chat(
        client, "Write three sentences about the sea.", 40, stop=stop, stream=True) if c.choices)
    assert streamed == ref[:ref.index(stop)]


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}


def test_json_schema_response_format_validates(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=120, n=5, seed=1,
                                       response_format=fmt)
    texts = [c.message.content for c in r.choices]
    chunks: dict[int, list[str]] = {}
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=120, n=5, seed=100,
                                                response_format=fmt, stream=True):
        for c in chunk.choices:
            chunks.setdefault(c.index, []).append(c.delta.content or "")
    texts += ["".join(v) for v in chunks.values()]
    assert len(texts) == 10
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_response_format(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A JSON object, please."}],
                                       max_tokens=60, temperature=0, response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.lstrip().startswith("{")
    if r.choices[0].finish_reason == "stop":    # else max_tokens cut it: a prefix of an object
        assert isinstance(json.loads(text), dict)


def test_logprobs_have_openai_shape(client):
    r = _greedy_chat(client, "Count to five.", 12, logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert t.logprob <= 0 and bytes(t.bytes).decode(errors="replace") is not None
        assert len(t.top_logprobs) == 3
        assert t.logprob == pytest.approx(max(x.logprob for x in t.top_logprobs))   # greedy: the best
        assert sum(np.exp(x.logprob) for x in t.top_logprobs) <= 1.0 + 1e-4
    streamed = [lp for c in _greedy_chat(client, "Count to five.", 12, logprobs=True, top_logprobs=3, stream=True)
                if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_eight_concurrent_streams_with_usage(server):
    async with openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120) as client:
        async def one(i, firsts, lasts, results):
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Tell me about the number {i}."}],
                max_tokens=32, temperature=0, stream=True, stream_options={"include_usage": True})
            pieces, usage = [], None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    firsts.setdefault(i, time.perf_counter())
                    pieces.append(chunk.choices[0].delta.content)
                    lasts[i] = time.perf_counter()
                if not chunk.choices:
                    usage = chunk.usage
            results[i] = ("".join(pieces), usage)

        firsts: dict = {}
        lasts: dict = {}
        results: dict = {}
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(one, i, firsts, lasts, results)
    assert len(results) == 8
    for text, usage in results.values():
        assert text and usage is not None and usage.completion_tokens > 0
    # They streamed at once: every stream had its first piece before any stream ended.
    assert max(firsts.values()) < min(lasts.values())


# -- completions ------------------------------------------------------------------------------

def test_completions_echo_and_token_prompts(client, smollm):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, echo=True)
    assert r.object == "text_completion"
    text = r.choices[0].text
    assert text.startswith(prompt) and len(text) > len(prompt)
    tokens = smollm.tokenize(prompt, True, True)
    by_tokens = client.completions.create(model=MODEL, prompt=tokens, max_tokens=8, temperature=0)
    assert prompt + by_tokens.choices[0].text == text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert prompt + streamed == text
    batch = client.completions.create(model=MODEL, prompt=[prompt, "Once upon a time"], max_tokens=4, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]


def test_completions_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0


# -- embeddings -------------------------------------------------------------------------------

def test_embeddings_base64_and_float_agree(client, minilm):
    name = _embed_name(client)
    texts = ["The cat sat on the mat.", "Stocks fell today."]
    default = client.embeddings.create(model=name, input=texts)     # base64 on the wire (numpy installed)
    floats = client.embeddings.create(model=name, input=texts, encoding_format="float")
    assert len(default.data) == len(floats.data) == 2
    for a, b in zip(default.data, floats.data):
        assert len(a.embedding) == len(b.embedding) == minilm.n_embd
        np.testing.assert_allclose(a.embedding, b.embedding, rtol=0, atol=1e-6)
    assert default.usage.prompt_tokens > 0
    one = client.embeddings.create(model=name, input=texts[0], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, floats.data[0].embedding, atol=1e-5)
    by_tokens = client.embeddings.create(model=name, input=[minilm.tokenize(texts[0], False, False)],
                                         encoding_format="float")
    assert np.dot(by_tokens.data[0].embedding, floats.data[0].embedding) > 0.99


def test_embeddings_raw_base64_is_little_endian_float32(http, client):
    name = _embed_name(client)
    body = http.post("/v1/embeddings", json={"model": name, "input": "hello", "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), "<f4")
    assert vec.shape == (384,) and abs(np.linalg.norm(vec) - 1) < 1e-3


# -- errors -----------------------------------------------------------------------------------

def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_bad_input_is_400_naming_the_field(client, http):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=7)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       logit_bias={"99999999": 5})
    assert e.value.param == "logit_bias"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "x", "schema": {"type": "string", "pattern": "a+"}}})
    assert e.value.param == "response_format.json_schema.schema" and e.value.code == "invalid_grammar"
    assert "'a+'" in e.value.message and "SamplerParams" not in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"grammar": "root ::= undefined-rule"})
    assert e.value.param == "grammar" and "SamplerParams" not in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="def f(", suffix="return 1")
    assert e.value.param == "suffix"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=_embed_name(client), input="hi", dimensions=64)
    assert e.value.param == "dimensions"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x " * 2000}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[1] * 1100, max_tokens=1)
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.param == "model"

    err = _error(http.post("/v1/chat/completions", content=b"{not json"), 400)
    assert "JSON" in err["message"]
    err = _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}), 400)
    assert err["param"] == "messages[0].content[0]"
    assert _error(http.post("/v1/chat/completions", json={"messages": []}), 400)["param"] == "messages"
    assert _error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                          "stop": [1]}), 400)["param"] == "stop"
    assert _error(http.post("/v1/embeddings", json={"input": [[10**9]]}), 400)["param"] == "input[0]"
    assert _error(http.post("/v1/embeddings", json={"input": "x", "encoding_format": "int8"}),
                  400)["param"] == "encoding_format"
    assert _error(http.get("/v1/nowhere"), 404)["code"] == "not_found"


# Random values in the fields of valid bodies: every answer is a 2xx or a 4xx in OpenAI's shape,
# never a 500, and the server goes on serving.
_ANY = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | st.floats(allow_nan=False)
    | st.sampled_from(["", "text", "json_object", "json_schema", "auto", "required", "float", "base64", "user"])
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["type", "text", "role", "content", "schema", "json_schema", "function", "name",
                         "parameters", "include_usage", "0", "100"]), inner, max_size=3),
    max_leaves=8)
_FIELDS = {
    "/v1/chat/completions": ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                             ["messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
                              "stop", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
                              "top_logprobs", "n", "response_format", "tools", "tool_choice", "stream",
                              "stream_options", "grammar"]),
    "/v1/completions": ({"model": MODEL, "prompt": "hi"},
                        ["prompt", "echo", "suffix", "logprobs", "n", "stop", "stream", "stream_options", "seed"]),
    "/v1/embeddings": ({"input": "hi"}, ["input", "encoding_format", "dimensions"]),
}


@given(st.sampled_from(sorted(_FIELDS)).flatmap(lambda path: st.tuples(
    st.just(path), st.dictionaries(st.sampled_from(_FIELDS[path][1]), _ANY, min_size=1, max_size=3))))
@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_random_field_values_get_a_4xx_never_a_500(http, client, case):
    path, fields = case
    base, _ = _FIELDS[path]
    body = {**base, "model": _embed_name(client) if "embeddings" in path else MODEL, "max_tokens": 3, **fields}
    if isinstance(body["max_tokens"], int) and body["max_tokens"] > 3:
        body["max_tokens"] = 3           # the fuzz is about parsing, not generating
    with http.stream("POST", path, json=body) as response:
        data = response.read()
    assert response.status_code < 500, (body, data[:500])
    if response.status_code >= 400:
        err = json.loads(data)["error"]
        assert err["message"] and set(err) == {"message", "type", "param", "code"}, (body, err)


def test_tools_on_a_template_that_cannot_express_them_are_400(client):
    # SmolLM2's own template has no place for tools: llama.cpp's chat layer would drop them.
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=tools,
                                       tool_choice="required")
    assert e.value.param == "tools" and "--chat-template" in e.value.message


def test_wrong_api_key_is_401(server):
    with openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    assert _error(httpx.get(server + "/v1/models"), 401)["code"] == "invalid_api_key"
    assert httpx.get(server + "/health").status_code == 200   # health needs no key


# -- streaming bytes, disconnects, limits -----------------------------------------------------

def test_sse_framing_and_first_chunk_before_the_end(http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 64, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    first = None
    raw = b""
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for data in r.iter_raw():
            if first is None:
                first = time.perf_counter() - t0
            raw += data
    total = time.perf_counter() - t0
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    for event in events[:-2]:
        assert event.startswith(b"data: ") and b"\n" not in event
        assert json.loads(event[6:])["object"] == "chat.completion.chunk"
    assert len(events) > 10
    assert first < total / 2, (first, total)


def _first_content(lines) -> None:
    """Read the lines of a stream up to the first generated piece (the engine is then decoding
    this request)."""
    for line in lines:
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            return
    raise AssertionError("the stream ended before its first piece")


def test_client_disconnect_cancels_the_request(http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to ten thousand."}],
            "max_tokens": 2000, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        _first_content(r.iter_lines())
    deadline = time.monotonic() + 5
    while http.get("/health").json()["running"]:
        assert time.monotonic() < deadline, "the engine still runs the request of a client that left"
        time.sleep(0.05)
    # Not streamed: a client that gives up also frees its slot.
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json={**body, "stream": False}, timeout=1.0)
    deadline = time.monotonic() + 5
    while http.get("/health").json()["running"]:
        assert time.monotonic() < deadline, "the engine still runs the request of a client that left"
        time.sleep(0.05)


def _serve_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mullama", "serve", *args], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)


@pytest.mark.parametrize("args, words", [(["--port", "70000"], "--port: must be from 0 to 65535"),
                                         (["--parallel", "0"], "--parallel/-np: must be 1 or more"),
                                         (["--max-waiting", "-1"], "--max-waiting: must be 0 or more"),
                                         (["--threads", "-2"], "--threads: must be from 0 to 1024"),
                                         (["--api-key", ""], "--api-key: must not be empty"),
                                         (["--flash-attn", "yes"], "--flash-attn/-fa: invalid choice")])
def test_bad_serve_arguments_exit_2_naming_them_before_anything_loads(args, words):
    # An empty key used to start a server without one; the others a traceback, or a late failure.
    proc = _serve_cli("-m", "no-such-model.gguf", *args)
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_serve_that_cannot_start_its_engine_exits_1_with_the_reason(smollm_path):
    # It used to keep listening, answering 503 to every request.
    proc = _serve_cli("-m", str(smollm_path), "--ctx-size", "20", "--port", str(free_port()), *THREADS)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "the server could not start" in proc.stderr and "n_ctx=20" in proc.stderr


def test_create_app_refuses_an_empty_api_key():
    from mullama.server import create_app

    for key in ("", "  "):
        with pytest.raises(ValueError, match="non-empty"):
            create_app("model.gguf", api_key=key)


def test_create_app_refuses_a_flash_attn_that_is_not_a_bool():
    from mullama.server import create_app

    with pytest.raises(ValueError, match="flash_attn='off'"):
        create_app("model.gguf", flash_attn="off")


def test_max_waiting_answers_503_with_retry_after(smollm_path):
    # With flash attention off, so that a served engine runs that way in the tests too.
    proc, base = _start(["-m", str(smollm_path), "--parallel", "1", "--max-waiting", "0", "--ctx-size", "1024",
                         "--flash-attn", "off", *THREADS],
                        key=None)
    try:
        body = {"messages": [{"role": "user", "content": "Count to a thousand."}], "max_tokens": 500,
                "stream": True}
        with httpx.Client(base_url=base, timeout=60) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                _first_content(r.iter_lines())
                busy = http.post("/v1/chat/completions", json={**body, "stream": False})
                err = _error(busy, 503)
                assert busy.headers["retry-after"] == "1" and err["code"] == "server_busy"
            # Once the client that held the slot has gone, the next request gets in.
            deadline = time.monotonic() + 5
            while (ok := http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})).status_code == 503:
                assert time.monotonic() < deadline, "the slot of a client that left was not given back"
                time.sleep(0.05)
            assert ok.status_code == 200, ok.text
            # SIGTERM lets a running stream finish (within --drain seconds), then the server exits.
            with http.stream("POST", "/v1/chat/completions", json={**body, "max_tokens": 40}) as r:
                lines = r.iter_lines()
                _first_content(lines)
                proc.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line]
            assert rest[-1] == "data: [DONE]"
            assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
            proc.wait(20)
    finally:
        _stop(proc)


# -- LangChain --------------------------------------------------------------------------------

def test_langchain_structured_output_and_embeddings(server, client):
    lc = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=20)
        country: str = Field(max_length=20)
        population_millions: int = Field(ge=0, le=100)

    chat = lc.ChatOpenAI(base_url=server + "/v1", api_key=KEY, model=MODEL, temperature=0, max_tokens=80,
                         max_retries=0)
    city = chat.with_structured_output(City).invoke("Describe Paris.")
    assert isinstance(city, City)
    assert chat.invoke("Say hello.").content

    embeddings = lc.OpenAIEmbeddings(base_url=server + "/v1", api_key=KEY, model=_embed_name(client),
                                     check_embedding_ctx_length=False, max_retries=0)
    vectors = embeddings.embed_documents(["The cat sat on the mat.", "Stocks fell today."])
    assert len(vectors) == 2 and len(vectors[0]) == 384


def test_metrics_count_requests_and_tokens(http):
    http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0})
    text = http.get("/metrics").text
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line and not line.startswith("#")}
    assert lines['mullama_requests_total{path="/v1/completions",status="200"}'] >= 1
    assert lines["mullama_completion_tokens_total"] >= 3 and lines["mullama_prompt_tokens_total"] >= 1
    assert lines["mullama_slots"] == 8 and lines["mullama_ready"] == 1
    for name in ("mullama_running", "mullama_waiting", "mullama_slot_use", "mullama_tokens_per_second",
                 "mullama_generated_tokens_total", 'mullama_request_duration_seconds_count{path="/v1/completions"}'):
        assert name in lines, name
    assert httpx.get(str(http.base_url) + "/metrics").status_code == 401   # behind the key, as the API


def test_create_app_serves_a_loaded_model_in_process(smollm):
    """create_app is an ASGI app: here run by uvicorn in a thread of this process."""
    import threading

    import uvicorn

    from mullama.server import create_app

    port = free_port()
    app = create_app(smollm, parallel=2, ctx_size=1024, model_name="mine", n_threads=1)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:   # 503 "loading" until the engine is made, then 200
            try:
                health = httpx.get(base + "/health")
                if health.status_code == 200:
                    break
                assert health.status_code == 503 and health.json()["status"] == "loading"
            except httpx.ConnectError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0) as client:
            assert [m.id for m in client.models.list().data] == ["mine"]
            r = client.completions.create(model="mine", prompt="Hello", max_tokens=2, temperature=0)
            assert r.usage.completion_tokens == 2
    finally:
        server.should_exit = True
        thread.join(30)
    assert not thread.is_alive()


SYSTEM = ("You are a careful assistant for a museum of natural history. You answer visitors' questions "
          "about the exhibits in one short sentence, in plain words, without lists, and you never "
          "invent opening hours or prices: you send visitors to the front desk for those.")


def test_a_conversations_next_turn_reuses_the_cached_prompt(client):
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where are the dinosaurs?"}]
    a = client.chat.completions.create(model=MODEL, messages=first, max_tokens=16, temperature=0)
    assert a.usage.prompt_tokens >= 64   # long enough to be kept
    follow = first + [{"role": "assistant", "content": a.choices[0].message.content},
                      {"role": "user", "content": "And the minerals?"}]
    b = client.chat.completions.create(model=MODEL, messages=follow, max_tokens=16, temperature=0)
    # The second turn starts from the first one's saved cache: at least its whole prompt.
    assert b.usage.prompt_tokens_details.cached_tokens >= a.usage.prompt_tokens
    # A stream of the same turn says the same, and reports its cache use too.
    stream = client.chat.completions.create(model=MODEL, messages=follow, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == b.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= a.usage.prompt_tokens


def _metric(http, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ", 1)[1])
    raise AssertionError(f"{name} is not in /metrics")


@pytest.mark.anyio
async def test_concurrent_chats_sharing_a_system_prompt_decode_it_once(server, http):
    system = ("You answer questions about geography for school children, in two short sentences, "
              "with one fact they can check in an atlas, and no lists. ") * 5
    before = _metric(http, "mullama_prompt_tokens_decoded_total")
    async with openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120) as client:
        replies: dict = {}

        async def one(i):
            replies[i] = await client.chat.completions.create(
                model=MODEL, max_tokens=4, temperature=0,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": f"Tell me about river {i}."}])

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(one, i)
    decoded = _metric(http, "mullama_prompt_tokens_decoded_total") - before
    one_prompt = replies[0].usage.prompt_tokens
    assert one_prompt > 150
    assert decoded <= 1.5 * one_prompt, f"8 requests decoded {decoded} prompt tokens; one has {one_prompt}"
    assert sum(r.usage.prompt_tokens_details.cached_tokens for r in replies.values()) >= 7 * (one_prompt - 20)
