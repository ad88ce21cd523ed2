"""Tool calling on `mullama serve`, for real on 127.0.0.1: SmolLM2 served with a Hermes-style
template (tests/data/hermes-tools.jinja, given with --chat-template) that llama.cpp's chat layer
reads, driven by the official `openai` client and by LangChain. The grammar llama.cpp builds
from the template makes even a 135M model's call well-formed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import jsonschema
import pytest

from test_serve import KEY, ROOT, THREADS, _error, served

openai = pytest.importorskip("openai")

TEMPLATE = "tests/data/hermes-tools.jinja"
MODEL = "smollm-tools"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"]}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 24}}, "required": ["timezone"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone now",
                                      "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(smollm_path):
    with served(["-m", str(smollm_path), "--alias", MODEL, "--chat-template", TEMPLATE,
                 "--parallel", "2", "--ctx-size", "4096", *THREADS]) as base:
        yield base


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=300) as c:
        yield c


def _ask(client, **kw):
    args = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=64, temperature=0, parallel_tool_calls=False)
    return client.chat.completions.create(**{**args, **kw})


def _check_call(name: str, arguments: str) -> dict:
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args


def test_required_tool_call_is_well_formed(client):
    r = _ask(client, tool_choice="required")
    [choice] = r.choices
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in SCHEMAS
    _check_call(call.function.name, call.function.arguments)
    assert not choice.message.content


def test_named_function_streamed_deltas_reassemble(client):
    chunks = list(_ask(client, tool_choice={"type": "function", "function": {"name": "get_time"}}, stream=True))
    calls: dict[int, dict] = {}
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    for chunk in chunks:
        for d in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            if d.id:
                assert call["id"] is None, "a call's id comes once"
                call["id"] = d.id
            if d.function and d.function.name:
                assert call["name"] is None, "a call's name comes once, whole"
                call["name"] = d.function.name
            if d.function and d.function.arguments:
                call["arguments"] += d.function.arguments
    assert finish == ["tool_calls"]
    assert list(calls) == [0] and calls[0]["name"] == "get_time" and calls[0]["id"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.tool_calls]) > 2   # the arguments stream
    _check_call("get_time", calls[0]["arguments"])


def test_tool_results_in_history_are_accepted(client):
    call = _ask(client, tool_choice={"type": "function", "function": {"name": "get_weather"}}).choices[0].message
    history = ASK + [call.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": '{"temperature": 21}'}]
    r = _ask(client, messages=history, tool_choice="none", max_tokens=16)
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content
    assert not r.choices[0].message.tool_calls


def test_bad_tool_fields_are_400_naming_them(client, server):
    for kw, param in [(dict(tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
                      (dict(tool_choice="sometimes"), "tool_choice"),
                      (dict(tools=[{"type": "function", "function": {"name": ""}}]), "tools[0].function.name"),
                      (dict(tools=[{"type": "retrieval"}]), "tools[0]"),
                      (dict(logprobs=True), "logprobs"),
                      (dict(response_format={"type": "json_object"}), "response_format")]:
        with pytest.raises(openai.BadRequestError) as e:
            _ask(client, **kw)
        assert e.value.param == param, (kw, e.value)
    # A parameters schema llama.cpp's converter refuses is that tool's fault, not the messages'.
    for schema, words in [({"type": "object", "properties": {"a": {"anyOf": {}}}}, "#/properties/a/anyOf"),
                          ({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}, "left recursion")]:
        with pytest.raises(openai.BadRequestError) as e:
            _ask(client, tools=[TOOLS[0], {"type": "function", "function": {"name": "g", "parameters": schema}}])
        assert e.value.param == "tools[1].function.parameters" and words in e.value.message, e.value
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}) as http:
        err = _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK + [
            {"role": "tool", "content": "21"}]}), 400)
        assert err["param"] == "messages[1].tool_call_id"


def test_langchain_bind_tools_gives_parsed_arguments(server):
    lc = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    class get_weather(BaseModel):   # noqa: N801  (LangChain names the tool after the class)
        """The weather in a city now."""

        city: str = Field(max_length=24)
        unit: str = Field(pattern="^(celsius|fahrenheit)$")

    chat = lc.ChatOpenAI(base_url=server + "/v1", api_key=KEY, model=MODEL, temperature=0, max_tokens=64,
                         max_retries=0, timeout=300)
    reply = chat.bind_tools([get_weather], tool_choice="get_weather", parallel_tool_calls=False).invoke(
        "What is the weather in Paris?")
    [call] = reply.tool_calls
    assert call["name"] == "get_weather" and call["id"]
    get_weather(**call["args"])   # LangChain parsed the JSON arguments; they fit the schema


@pytest.mark.parametrize("template, words", [("{% for m in messages %}", "cannot be parsed"),
                                             ("no-such-template.jinja", "neither a Jinja template nor a file")])
def test_a_bad_chat_template_stops_serve_before_it_listens(smollm_path, template, words):
    proc = subprocess.run([sys.executable, "-m", "mullama", "serve", "-m", str(smollm_path), "--chat-template",
                           template, "--port", "1"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
