"""Generation controls: stop strings, grammars, JSON schema, logit bias, log-probabilities,
llama.cpp's other samplers, and the Completion result, on Context, Engine and the async API."""

from __future__ import annotations

import asyncio
import json
import math
import re

import jsonschema
import numpy as np
import pytest

import mullama
import mullama.aio
from mullama import GrammarError, InvalidArgumentError, SamplerParams

from conftest import VENDOR, free_port, wait_until_healthy

PROMPT = "Once upon a time"
N = 40


def greedy(**kw) -> SamplerParams:
    return SamplerParams(temperature=0.0, top_k=1, top_p=1.0, min_p=0.0, penalty_repeat=1.0, **kw)


@pytest.fixture(scope="module")
def reference(smollm):
    """The model's own greedy continuation of PROMPT and the text of each of its tokens."""
    with mullama.Context(smollm, n_ctx=512) as ctx:
        c = ctx.complete(PROMPT, N, greedy())
    pieces = [smollm.detokenize([t]) for t in c.tokens]
    assert "".join(pieces) == c.text and len(c.tokens) == N
    return c.text, pieces


def straddling_stops(pieces: list[str]) -> list[str]:
    """Stop strings that begin inside one token's text and end inside a later token's."""
    stops = []
    for i in range(3, len(pieces) - 2):
        a, b = pieces[i], pieces[i + 1]
        if len(a) >= 2 and len(b) >= 2:
            stops.append(a[-1] + b[:-1])                       # two tokens
            stops.append(a[-1] + b + pieces[i + 2][:1])       # three tokens
        if len(stops) >= 6:
            break
    assert len(stops) >= 4
    return stops


# -- stop strings ------------------------------------------------------------------------------

def test_stop_strings_cut_before_the_stop_at_token_straddling_positions(ctx, reference):
    text, pieces = reference
    for stop in straddling_stops(pieces):
        want = text[: text.index(stop)]
        c = ctx.complete(PROMPT, N, greedy(stop=[stop]))
        assert (c.text, c.finish_reason) == (want, "stop"), stop
        assert ctx.generate(PROMPT, N, greedy(stop=[stop])) == want
        with ctx.stream(PROMPT, N, greedy(stop=[stop])) as s:
            streamed = list(s)
        assert "".join(streamed) == want, stop
        assert s.finish_reason == "stop"


def test_earliest_of_several_stops_wins(ctx, reference):
    text, pieces = reference
    stops = straddling_stops(pieces)
    c = ctx.complete(PROMPT, N, greedy(stop=list(reversed(stops))))
    assert c.text == text[: min(text.index(s) for s in stops)]


def test_a_stop_that_never_completes_is_flushed_at_the_end(ctx, reference):
    text, _ = reference
    stop = text[-3:] + "\x01never"   # its start is the end of the text: held back, then let go
    with ctx.stream(PROMPT, N, greedy(stop=stop)) as s:
        assert "".join(s) == text
    assert s.finish_reason == "length"
    assert ctx.complete(PROMPT, N, greedy(stop=stop)).text == text


def test_stop_inside_a_multibyte_character(ctx, smollm):
    prompt = "Le garçon a mangé une crêpe et il a été très"
    full = ctx.complete(prompt, 60, greedy()).text
    accented = [ch for ch in full if len(ch.encode()) > 1]
    assert accented, full
    stop = accented[0]
    with ctx.stream(prompt, 60, greedy(stop=[stop])) as s:
        pieces = list(s)
    assert "".join(pieces) == full[: full.index(stop)]
    assert all(stop not in p for p in pieces)


def test_stop_strings_on_the_engine_and_async(smollm, reference):
    text, pieces = reference
    stop = straddling_stops(pieces)[0]
    want = text[: text.index(stop)]
    with mullama.Engine(smollm, n_parallel=2, n_ctx=1024) as engine:
        c = engine.complete(PROMPT, N, greedy(stop=[stop]))
        assert (c.text, c.finish_reason) == (want, "stop")
        with engine.stream(PROMPT, N, greedy(stop=[stop])) as s:
            assert "".join(s) == want

    async def run():
        async with mullama.aio.AsyncContext(smollm, n_ctx=512) as actx:
            a = await actx.complete(PROMPT, N, greedy(stop=[stop]))
            async with actx.stream(PROMPT, N, greedy(stop=[stop])) as s:
                streamed = "".join([p async for p in s])
        async with mullama.aio.AsyncEngine(smollm, n_parallel=2, n_ctx=1024) as aengine:
            b = await aengine.complete(PROMPT, N, greedy(stop=[stop]))
        return a, streamed, b

    a, streamed, b = asyncio.run(run())
    assert a.text == streamed == b.text == want
    assert a.finish_reason == b.finish_reason == "stop"


# -- grammars ----------------------------------------------------------------------------------

GRAMMARS = sorted((VENDOR / "grammars").glob("*.gbnf"))


@pytest.mark.parametrize("path", GRAMMARS, ids=lambda p: p.name)
def test_every_vendored_grammar_is_accepted(ctx, path):
    params = greedy(grammar=path.read_text())
    assert params.validated() is params
    c = ctx.complete("Here it is:\n", 8, params)
    assert c.finish_reason in ("length", "stop") and c.tokens


# Each pattern matches every prefix of a sentence of its grammar: a generation may be cut by
# max_tokens; one that ended by itself must match the whole grammar (the second pattern).
GRAMMAR_PATTERNS = {
    "list.gbnf": (r"(- [^\r\n]+\n)*(- [^\r\n]*|-)?", r"(- [^\r\n]+\n)+"),
    "arithmetic.gbnf": (r"[-+*/=()a-z0-9_ \t\n]*", r"([^=\n]+=[ \t\n]*[^=\n]*\n)+"),
    "chess.gbnf": (r"(1\. [^\n]*)?(\n\d+\. [^\n]*)*\n?", r"1\. .*"),
}


@pytest.mark.parametrize("name", sorted(GRAMMAR_PATTERNS))
def test_output_under_a_vendored_grammar_matches_its_pattern(ctx, name):
    grammar = (VENDOR / "grammars" / name).read_text()
    prefix, whole = GRAMMAR_PATTERNS[name]
    for prompt in ("Here is the answer:\n", "Write it down.\n"):
        c = ctx.complete(prompt, 48, greedy(grammar=grammar))
        assert re.fullmatch(prefix, c.text, re.S), (name, c.text)
        if c.finish_reason == "stop":
            assert re.fullmatch(whole, c.text, re.S), (name, c.text)


def test_a_grammar_that_never_ends_stops_at_max_tokens(ctx):
    c = ctx.complete("Say it:", 12, greedy(grammar='root ::= "ab" root'))
    # Cut at max_tokens: a beginning of "abab...", which may end inside an "ab" (a token "a").
    assert c.finish_reason == "length" and re.fullmatch("(ab)+a?", c.text), c.text


def test_a_grammar_with_no_way_forward_ends_with_reason_grammar(ctx, smollm):
    # The grammar allows only "Q"; every token whose text starts with Q is banned.
    banned = {t: -math.inf for t in range(smollm.n_vocab) if smollm.detokenize([t]).startswith("Q")}
    c = ctx.complete("Say Q:", 8, greedy(grammar='root ::= "Q"', logit_bias=banned))
    assert (c.text, c.finish_reason) == ("", "grammar")
    assert ctx.generate("Say Q:", 8, greedy(grammar='root ::= "Q"')) == "Q"


def _trigger_at(pieces: list[str]) -> int:
    """The first generated token, after a few, whose text is a space and a word seen nowhere earlier."""
    for i in range(3, len(pieces)):
        word = pieces[i].strip()
        if pieces[i] == " " + word and word.isalpha() and "".join(pieces[:i + 1]).find(word) == \
                len("".join(pieces[:i + 1])) - len(word):
            return i
    raise AssertionError(f"no trigger word in {pieces}")


@pytest.mark.parametrize("by", ["pattern", "token"])
def test_a_lazy_grammar_holds_from_its_trigger_on(ctx, smollm, by):
    free = ctx.complete(PROMPT, N, greedy())
    pieces = [smollm.detokenize([t]) for t in free.tokens]
    i = _trigger_at(pieces)
    word = pieces[i].strip()
    if by == "pattern":   # the grammar reads the text from the match on
        lazy = dict(grammar=f'root ::= "{word}" " zebra"', grammar_triggers=[word])
    else:                 # or from the trigger token on, the whole token
        lazy = dict(grammar=f'root ::= " {word}" " zebra"', grammar_trigger_tokens=[free.tokens[i]])
    c = ctx.complete(PROMPT, N, greedy(grammar_lazy=True, **lazy))
    assert c.text == "".join(pieces[:i + 1]) + " zebra" and c.finish_reason == "stop"


def test_grammar_prefill_is_text_the_grammar_has_already_read(ctx):
    c = ctx.complete(PROMPT, 8, greedy(grammar='root ::= "Once upon" " a zebra"', grammar_prefill="Once upon"))
    assert c.text == " a zebra"


def test_json_object_mode_gives_json(ctx):
    c = ctx.complete('Give the answer as JSON: {"answer": 4}. What is 2+2?', 60, greedy(json=True))
    assert c.finish_reason == "stop"
    assert isinstance(json.loads(c.text), dict)
    cut = ctx.complete("A JSON object describing a cat:", 5, greedy(json=True))   # its object takes more
    assert cut.finish_reason == "length" and cut.text.startswith("{")


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 1, "maximum": 99},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16},
                           "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}


def test_json_schema_outputs_validate_for_20_seeds(smollm):
    prompt = "A user record as JSON:\n"
    with mullama.Engine(smollm, n_parallel=4, n_ctx=4 * 512) as engine:
        streams = [engine.stream(prompt, 300, SamplerParams(temperature=0.8, seed=seed, json_schema=SCHEMA),
                                 buffer=1 << 20) for seed in range(1, 21)]
        outputs = [(s.read(), s.finish_reason) for s in streams]
    for text, reason in outputs:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len({t for t, _ in outputs}) > 10   # different seeds, different records


# -- differential: llama.cpp's own server, same grammar, same prompt -------------------------

@pytest.fixture(scope="module")
def llama_server(smollm_path, tmp_path_factory):
    import subprocess

    import build_llama

    exe = build_llama.build_tool("llama-server")["llama-server"]
    port = free_port()
    log = open(tmp_path_factory.mktemp("llama-server") / "log.txt", "wb")   # its log is long: not a pipe
    proc = subprocess.Popen([str(exe), "-m", str(smollm_path), "--host", "127.0.0.1", "--port", str(port),
                             "-c", "1024", "-np", "1", "-t", "2", "--no-webui"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, url, f"llama-server (log: {log.name})", 120)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def server_completion(url: str, prompt: str, n: int, grammar: str) -> str:
    import urllib.request

    body = json.dumps({"prompt": prompt, "n_predict": n, "grammar": grammar, "temperature": 0.0,
                       "top_k": 1, "repeat_penalty": 1.0, "cache_prompt": False}).encode()
    req = urllib.request.Request(url + "/completion", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())["content"]


@pytest.mark.parametrize("prompt", ["A JSON object for a book:", "Shopping list:\n", "Compute:\n", "The game:\n"])
def test_greedy_under_a_grammar_equals_llama_server(llama_server, ctx, prompt):
    grammars = {"A JSON object for a book:": "json.gbnf", "Shopping list:\n": "list.gbnf",
                "Compute:\n": "arithmetic.gbnf", "The game:\n": "chess.gbnf"}
    grammar = (VENDOR / "grammars" / grammars[prompt]).read_text()
    ours = ctx.generate(prompt, 48, greedy(grammar=grammar))
    assert ours == server_completion(llama_server, prompt, 48, grammar)


# -- logit bias and log-probabilities ------------------------------------------------------------

def test_logit_bias_bans_and_forces_tokens(ctx, reference):
    text, _ = reference
    first = ctx.complete(PROMPT, 1, greedy()).tokens[0]
    banned = ctx.complete(PROMPT, 5, greedy(logit_bias={first: -math.inf}))
    assert banned.tokens[0] != first and first not in banned.tokens
    forced = ctx.complete(PROMPT, 3, greedy(logit_bias={42: 100.0}))
    assert forced.tokens == (42, 42, 42)


def test_logprobs_are_a_log_softmax_of_the_raw_logits(ctx, smollm):
    c = ctx.complete(PROMPT, 3, greedy(n_probs=5))
    assert c.logprobs is not None and len(c.logprobs) == 3
    prompt = smollm.tokenize(PROMPT)
    for k, rec in enumerate(c.logprobs):
        assert rec.token == c.tokens[k]
        assert rec.logprob == pytest.approx(max(t.logprob for t in rec.top), abs=1e-6)
        assert rec.top[0].token == rec.token and len(rec.top) == 5
        assert sum(math.exp(t.logprob) for t in rec.top) <= 1.0 + 1e-6
        # Independently: the logits of the same position, log-softmaxed with numpy.
        ctx.generate_from_tokens(prompt + list(c.tokens[:k]), max_tokens=0)
        logits = ctx.get_logits().astype(np.float64)
        logp = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
        assert rec.logprob == pytest.approx(logp[rec.token], abs=1e-4)
        best = np.argsort(-logp)[:5]
        assert [t.token for t in rec.top] == best.tolist()
        assert [t.logprob for t in rec.top] == pytest.approx(logp[best].tolist(), abs=1e-4)
        assert rec.text == smollm.detokenize([rec.token])


def test_logprobs_without_alternatives_and_on_streams(ctx):
    c = ctx.complete(PROMPT, 4, greedy(logprobs=True))
    assert [r.top for r in c.logprobs] == [()] * 4
    assert ctx.complete(PROMPT, 4, greedy()).logprobs is None
    with ctx.stream(PROMPT, 4, greedy(n_probs=2)) as s:
        text = "".join(s)
    assert text == c.text and s.tokens == list(c.tokens)
    assert [r.logprob for r in s.logprobs] == pytest.approx([r.logprob for r in c.logprobs])


def test_usage_counts_reused_and_evaluated_tokens(ctx, smollm):
    n_prompt = len(smollm.tokenize(PROMPT))
    a = ctx.complete(PROMPT, 4, greedy())
    b = ctx.complete(PROMPT, 4, greedy())
    assert a.usage.prompt_tokens == b.usage.prompt_tokens == n_prompt
    assert a.usage.completion_tokens == 4 and a.usage.total_tokens == n_prompt + 4
    assert b.usage.reused_tokens == n_prompt - 1 and b.usage.evaluated_tokens == 1


def test_complete_takes_token_ids(ctx, smollm):
    by_text = ctx.complete(PROMPT, 6, greedy())
    assert ctx.complete(smollm.tokenize(PROMPT), 6, greedy()).text == by_text.text


# -- llama.cpp's other samplers ------------------------------------------------------------------

@pytest.mark.parametrize("extra", [
    dict(mirostat=1), dict(mirostat=2, mirostat_tau=3.0, mirostat_eta=0.2),
    dict(dry_multiplier=0.8), dict(xtc_probability=0.5, xtc_threshold=0.1),
    dict(top_n_sigma=1.5), dict(min_keep=5, top_p=0.5),
], ids=lambda d: ",".join(d))
def test_every_sampler_runs_and_is_reproducible_with_a_seed(ctx, extra):
    params = SamplerParams(temperature=0.9, seed=7, **extra)
    a = ctx.complete(PROMPT, 24, params)
    b = ctx.complete(PROMPT, 24, params)
    assert a.text == b.text and len(a.tokens) == 24


def test_dry_breaks_a_repetition(ctx):
    prompt = "one two three one two three one two three one two three one two"
    plain = ctx.generate(prompt, 24, greedy())
    dry = ctx.generate(prompt, 24, greedy(dry_multiplier=2.0, dry_allowed_length=2))
    assert plain.count("three one two") > dry.count("three one two")


# -- the Engine: many controls at once -----------------------------------------------------------

def test_engine_requests_with_different_controls_get_what_they_get_alone(smollm, reference):
    text, pieces = reference
    stops = straddling_stops(pieces)
    params = [
        greedy(stop=[stops[0]]), greedy(stop=[stops[1], stops[2]]), greedy(grammar='root ::= [a-z ]+ "."'),
        greedy(json=True), greedy(logit_bias={11: -math.inf, 30: 5.0}), greedy(n_probs=3),
        greedy(grammar=(VENDOR / "grammars" / "list.gbnf").read_text()), greedy(stop=["\n"], logit_bias={28: 3.0}),
    ]
    prompts = [PROMPT, PROMPT, "Animals:", "A cat:", PROMPT, PROMPT, "Shopping:", "Hello"]
    with mullama.Engine(smollm, n_parallel=8, n_ctx=8 * 256) as engine:
        alone = [engine.complete(p, 32, q) for p, q in zip(prompts, params)]
        streams = [engine.stream(p, 32, q, buffer=1 << 20) for p, q in zip(prompts, params)]
        together = [(s.read(), s.finish_reason, s.tokens) for s in streams]
    assert together == [(c.text, c.finish_reason, list(c.tokens)) for c in alone]
    assert alone[5].logprobs is not None and len(alone[5].logprobs[0].top) == 3


# -- bad input: raised before any decode ----------------------------------------------------------

BAD = [
    (dict(stop=[""]), InvalidArgumentError, "empty"),
    (dict(stop=[3]), TypeError, "stop"),
    (dict(stop=["x"] * 1000), InvalidArgumentError, "stop"),
    (dict(stop=["x" * 10_000]), InvalidArgumentError, "stop"),
    (dict(grammar="root ::= " + '"a" ' * 300_000), GrammarError, "grammar"),
    (dict(grammar="root ::= root \"a\" | \"a\""), GrammarError, "left recursion"),
    (dict(grammar="root ::= (\"a\""), GrammarError, "expecting"),
    (dict(grammar="root ::= undefined-rule"), GrammarError, "undefined-rule"),
    (dict(grammar="item ::= \"a\""), GrammarError, "root"),
    (dict(grammar=b"root ::= \"a\""), TypeError, "grammar"),
    (dict(json_schema=["not", "a", "dict"]), TypeError, "json_schema"),
    (dict(json_schema={"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}), GrammarError, "json_schema"),
    (dict(json_schema={"type": "string", "pattern": "(?=lookahead)"}), GrammarError, "anchored"),
    (dict(json_schema={"type": "string", "pattern": "^(?=lookahead)$"}), GrammarError, "does not support"),
    (dict(grammar='root ::= "a"', json=True), InvalidArgumentError, "only one"),
    (dict(logit_bias={-1: 1.0}), InvalidArgumentError, "-1"),
    (dict(logit_bias={10**9: 1.0}), InvalidArgumentError, "vocabulary"),
    (dict(logit_bias={"a": 1.0}), TypeError, "logit_bias"),
    (dict(logit_bias={5: math.nan}), InvalidArgumentError, "logit_bias"),
    (dict(n_probs=10**6), InvalidArgumentError, "n_probs"),
    (dict(mirostat=3), InvalidArgumentError, "mirostat"),
    (dict(xtc_probability=2.0), InvalidArgumentError, "xtc_probability"),
    (dict(dry_base=0.5), InvalidArgumentError, "dry_base"),
    (dict(grammar='root ::= "a"', grammar_lazy=True), InvalidArgumentError, "grammar_triggers"),
    (dict(grammar_lazy=True, grammar_triggers=["a"]), InvalidArgumentError, "needs a grammar"),
    (dict(grammar='root ::= "a"', grammar_lazy=True, grammar_triggers=["(unclosed"]), GrammarError, "grammar_triggers"),
    (dict(grammar='root ::= "a"', grammar_lazy=True, grammar_trigger_tokens=[10**9]), InvalidArgumentError,
     "vocabulary"),
    (dict(preserved_tokens=[-1]), InvalidArgumentError, "preserved_tokens"),
    (dict(grammar='root ::= "a"', grammar_prefill="b"), GrammarError, "grammar_prefill"),
]


@pytest.mark.parametrize("kw, error, words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_controls_raise_before_any_decode(ctx, smollm, kw, error, words):
    before = ctx.total_evaluated_tokens
    with pytest.raises(error, match=re.escape(words)):
        ctx.complete(PROMPT, 4, SamplerParams(**kw))
    with pytest.raises(error, match=re.escape(words)):
        ctx.stream(PROMPT, 4, SamplerParams(**kw))
    with mullama.Engine(smollm, n_parallel=1, n_ctx=256) as engine:
        with pytest.raises(error, match=re.escape(words)):
            engine.stream(PROMPT, 4, SamplerParams(**kw))
    assert ctx.total_evaluated_tokens == before
    assert ctx.generate(PROMPT, 2, greedy())   # the context is still fine


def test_params_may_be_a_dict_with_the_new_fields(ctx, reference):
    text, pieces = reference
    stop = straddling_stops(pieces)[0]
    c = ctx.complete(PROMPT, N, {"temperature": 0.0, "penalty_repeat": 1.0, "stop": stop})
    assert c.text == text[: text.index(stop)]
