"""An OpenAI-compatible HTTP server on the continuous-batching engine (``mullama serve``).

Pure Python over the public async API: :class:`mullama.aio.AsyncEngine` generates (every request
and every one of its ``n`` choices is a sequence of the same engine, decoded together), and
:class:`mullama.aio.AsyncEmbeddingGenerator` embeds. The stack is Starlette (routing only: the
request bodies are parsed and checked here, without a validation framework on the hot path),
uvicorn with uvloop and httptools, and orjson; a streamed piece costs one small bytes join.

>>> app = create_app("model.gguf", parallel=8)          # doctest: +SKIP
>>> uvicorn.run(app, host="127.0.0.1", port=8080)       # doctest: +SKIP

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/embeddings``,
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus); the API's paths answer
without the ``/v1`` prefix too, as llama-server's do.
Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hmac
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from os import PathLike
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ._completion import Completion, TokenLogprob
from . import _tools
from ._errors import (
    ChatTemplateError,
    ContextOverflowError,
    GrammarError,
    InvalidArgumentError,
    MullamaError,
    RPCServerLostError,
)
from ._llama import Model, _ChatTemplates
from ._params import MAX_STOP_LENGTH, MAX_STOPS, SamplerParams, renamed
from ._prompt_cache import PromptCache
from .aio import AsyncEmbeddingGenerator, AsyncEngine, load_model

__all__ = ["create_app"]

log = logging.getLogger("mullama.server")

MAX_N = 16                 # choices per request
MAX_TOP_LOGPROBS = 20      # as OpenAI
MAX_BODY = 32 << 20        # bytes of one request body
_FINISH = {"stop": "stop", "length": "length", "context": "length", "grammar": "stop", "cancelled": "stop"}
_UNSUPPORTED = {           # OpenAI fields that change the answer and that this server cannot honour
    "functions": "function calling is not supported by this server",
    "function_call": "function calling is not supported by this server",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
}


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return _json(self.body(), self.status, self.headers)


def _bad(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, f"{param}: {message}" if param else message, param=param, code=code)


def _from_mullama(exc: MullamaError, param: str | None = None) -> APIError:
    """A mullama error raised by bad input, as a 400 naming the field where it is known."""
    if isinstance(exc, ContextOverflowError):
        return APIError(400, str(exc), param=param or "messages", code="context_length_exceeded")
    if isinstance(exc, GrammarError):
        return APIError(400, str(exc), param=param, code="invalid_grammar")
    if isinstance(exc, (InvalidArgumentError, ChatTemplateError)):
        return APIError(400, str(exc), param=param)
    if isinstance(exc, RPCServerLostError):   # for good: a balancer should try another replica
        log.error("an RPC server was lost: %s", exc)
        return APIError(503, str(exc), code="rpc_server_lost")
    log.error("request failed: %s: %s", type(exc).__name__, exc)   # the engine's fault, not the input's
    return APIError(500, f"{type(exc).__name__}: {exc}")


def _json(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), status, headers,
                    media_type="application/json")


# -- reading a request body -------------------------------------------------------------------

def _int(body: Mapping[str, Any], name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise _bad(name, f"must be in [{lo}, {hi}], got {value}")
    return value


def _intd(body: Mapping[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = _int(body, name, None, lo, hi)
    return default if value is None else value


def _float(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, f"must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise _bad(name, f"must be in [{lo}, {hi}], got {value}")
    return float(value)


def _bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(name, f"must be true or false, got {value!r}")
    return value


def _stops(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "must be a string or a list of strings")
    if len(stops) > MAX_STOPS:
        raise _bad("stop", f"{len(stops)} stop strings; at most {MAX_STOPS}")
    for s in stops:
        if len(s) > MAX_STOP_LENGTH:
            raise _bad("stop", f"a stop string of {len(s)} characters; at most {MAX_STOP_LENGTH}")
    return [s for s in stops if s]     # OpenAI ignores empty stop strings


def _logit_bias(value: Any, n_vocab: int) -> dict[int, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad("logit_bias", "must be an object of token id (as a string) -> bias")
    bias: dict[int, float] = {}
    for key, b in value.items():
        try:
            token = int(key)
        except ValueError:
            raise _bad("logit_bias", f"key {key!r} is not a token id") from None
        if not 0 <= token < n_vocab:
            raise _bad("logit_bias", f"token id {token} is outside the vocabulary [0, {n_vocab})")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise _bad("logit_bias", f"bias of token {token} must be a number in [-100, 100], got {b!r}")
        bias[token] = float(b)
    return bias


def _response_format(value: Any) -> dict[str, Any]:
    """SamplerParams fields for OpenAI's response_format."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad("response_format", "must be an object with a 'type'")
    kind = value.get("type")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json": True}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise _bad("response_format.json_schema", "must be an object with a 'schema'")
        schema = spec.get("schema")
        if schema is None:    # OpenAI allows it: any JSON object then
            return {"json": True}
        if not isinstance(schema, dict):
            raise _bad("response_format.json_schema.schema", "must be a JSON schema object")
        return {"json_schema": schema}
    raise _bad("response_format.type", f"must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def _sampler(body: Mapping[str, Any], n_vocab: int, n_probs: int, logprobs: bool) -> SamplerParams:
    """SamplerParams from the fields OpenAI's two generation endpoints share (and a few of
    llama-server's own). Defaults are llama-server's: temperature 0.8, top_k 40, top_p 0.95,
    min_p 0.05, no repeat penalty."""
    params = SamplerParams(
        temperature=_float(body, "temperature", 0.8, 0.0, 2.0),
        top_p=_float(body, "top_p", 0.95, 0.0, 1.0),
        top_k=_intd(body, "top_k", 40, 0, 1 << 20),
        min_p=_float(body, "min_p", 0.05, 0.0, 1.0),
        typical_p=_float(body, "typical_p", 1.0, 0.0, 1.0),
        penalty_repeat=_float(body, "repeat_penalty", 1.0, 0.01, 10.0),
        penalty_present=_float(body, "presence_penalty", 0.0, -2.0, 2.0),
        penalty_freq=_float(body, "frequency_penalty", 0.0, -2.0, 2.0),
        seed=_seed(body),
        stop=_stops(body.get("stop")),
        logit_bias=_logit_bias(body.get("logit_bias"), n_vocab),
        logprobs=logprobs,
        n_probs=n_probs,
        **_response_format(body.get("response_format")),
    )
    grammar = body.get("grammar")
    if grammar is not None:
        if not isinstance(grammar, str):
            raise _bad("grammar", "must be a string of GBNF")
        if params.json or params.json_schema is not None:
            raise _bad("grammar", "give either grammar or a JSON response_format, not both")
        params.grammar = grammar
    try:
        return params.validated()
    except GrammarError as exc:
        if grammar is not None:
            raise _grammar_error(exc, "grammar") from None
        raise _grammar_error(exc, "response_format" if params.json else "response_format.json_schema.schema") from None
    except MullamaError as exc:
        raise _from_mullama(exc) from None


def _grammar_error(exc: GrammarError, field: str) -> APIError:
    """A grammar error named by the request's field, not by the SamplerParams one it became."""
    message = renamed(exc, field)
    if not message.startswith(field):
        message = f"{field}: {message}"
    return APIError(400, message, param=field, code="invalid_grammar")


def _seed(body: Mapping[str, Any]) -> int:
    """A fixed seed in [1, 2**32 - 2] (llama.cpp reads 0 and 2**32 - 1 as "random"), or 0."""
    seed = _int(body, "seed", None, -(2**63), 2**63 - 1)
    return 0 if seed is None else (seed - 1) % 0xFFFFFFFE + 1


def _choice_params(params: SamplerParams, n: int) -> list[SamplerParams]:
    """One SamplerParams per choice: a fixed seed gives each choice a seed of its own."""
    if n == 1 or params.seed == 0:
        return [params] * n
    return [replace(params, seed=(params.seed - 1 + i) % 0xFFFFFFFE + 1) for i in range(n)]


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    for name, why in _UNSUPPORTED.items():
        if body.get(name) not in (None, [], {}, "none", "auto"):
            raise _bad(name, why)
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise _bad("modalities", "only ['text'] is supported")


# -- log-probabilities ------------------------------------------------------------------------

def _lp(value: float) -> float:
    return value if value > -9999.0 else -9999.0    # OpenAI's floor; JSON has no -inf


class _LogprobCursor:
    """Hands out the log-probabilities of the tokens whose text has been sent: a token belongs
    to the text once its first byte has (the tokens of a stop string are never sent)."""

    def __init__(self) -> None:
        self.taken = 0          # entries handed out
        self.bytes_taken = 0    # bytes those entries cover

    def advance(self, entries: Sequence[TokenLogprob] | None, bytes_sent: int) -> list[TokenLogprob]:
        out: list[TokenLogprob] = []
        if entries is None:
            return out
        while self.taken < len(entries) and self.bytes_taken < bytes_sent:
            e = entries[self.taken]
            out.append(e)
            self.taken += 1
            self.bytes_taken += len(e.bytes)
        return out


def _chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    return {"content": [{
        "token": e.text, "logprob": _lp(e.logprob), "bytes": list(e.bytes),
        "top_logprobs": [{"token": t.text, "logprob": _lp(t.logprob), "bytes": list(t.bytes)} for t in e.top],
    } for e in entries], "refusal": None}


def _text_logprobs(entries: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.text)
    return {"tokens": [e.text for e in entries], "token_logprobs": [_lp(e.logprob) for e in entries],
            "top_logprobs": [{t.text: _lp(t.logprob) for t in e.top} for e in entries], "text_offset": offsets}


# -- responses --------------------------------------------------------------------------------

class _EventStream:
    """A Server-Sent Events response fed by ``produce(emit)``. A client that goes away cancels
    ``produce`` (and with it the engine requests it reads), whether or not a piece was due."""

    def __init__(self, produce: Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[None]],
                 close: Callable[[], Awaitable[None]]) -> None:
        self.produce = produce
        self.close = close    # run in any case, produce or not

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self._respond(receive, send)
        finally:
            await self.close()

    async def _respond(self, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]})
        gone = False

        async def emit(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        async with anyio.create_task_group() as tg:
            async def watch() -> None:
                nonlocal gone
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone = True
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                await self.produce(emit)
                await emit(b"data: [DONE]\n\n")
            except APIError as exc:
                await emit(b"data: " + orjson.dumps(exc.body()) + b"\n\n")
            except MullamaError as exc:   # after the response started: an error event, then the end
                log.warning("stream ended by %s: %s", type(exc).__name__, exc)
                await emit(b"data: " + orjson.dumps(APIError(500, str(exc)).body()) + b"\n\n")
            except OSError:    # the client went away while we wrote
                gone = True
            tg.cancel_scope.cancel()
        if not gone:
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _until_disconnect(request: Request, work: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``work``; cancel it (and its engine requests) if the client disconnects first."""
    result: list[Any] = []
    errors: list[Exception] = []
    async with anyio.create_task_group() as tg:
        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            result.append(await work())
        except Exception as exc:    # raised below as itself, not inside an ExceptionGroup
            errors.append(exc)
        tg.cancel_scope.cancel()
    if errors:
        raise errors[0]
    if not result:
        return Response(status_code=499)   # nobody reads it
    return result[0]


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _piece_template(chunk: dict[str, Any]) -> tuple[bytes, bytes]:
    """The bytes before and after a piece of text in a chunk, so that a streamed piece costs
    one string encoding and one join instead of a dict and a whole dumps."""
    marker = "\x00mullama-piece\x00"
    data = _sse(chunk)
    head, tail = data.split(orjson.dumps(marker))
    return head, tail


# -- the server -------------------------------------------------------------------------------

class _Server:
    def __init__(self, model: str | PathLike[str] | Model | None, embedding_model: str | PathLike[str] | Model | None,
                 *, parallel: int, ctx_size: int | None, api_key: str | None, max_waiting: int | None,
                 model_name: str | None, embedding_model_name: str | None, n_batch: int, n_threads: int,
                 embedding_ctx_size: int | None, prompt_cache_mb: int = 256, chat_template: str | None = None,
                 on_start_error: Callable[[str], None] | None = None, flash_attn: bool | None = None) -> None:
        if model is None:
            from . import models

            model = models.fetch()
        self.model_src = model
        self.embedding_src = embedding_model
        self.parallel = parallel
        self.ctx_size = ctx_size
        self.api_key = api_key
        self.max_waiting = max_waiting
        self.n_batch = n_batch
        self.n_threads = n_threads
        self.flash_attn = flash_attn
        self.embedding_ctx_size = embedding_ctx_size
        self.model_name = model_name or _name_of(model)
        self.embedding_name = (embedding_model_name or _name_of(embedding_model)) if embedding_model is not None \
            else self.model_name
        self.created = int(time.time())
        self.engine: AsyncEngine | None = None
        self.embedder: AsyncEmbeddingGenerator | None = None
        self.model: Model | None = None
        self.embedding_model: Model | None = None
        self.chat_template = chat_template
        self.templates: _ChatTemplates | None = None   # llama.cpp's chat layer, for tools and Jinja
        self.error: str | None = None
        self.on_start_error = on_start_error
        self.active = 0          # engine requests submitted and not finished
        self.prompt_cache = PromptCache(prompt_cache_mb << 20)
        self._embed_lock = anyio.Lock()

    # -- lifetime -------------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            self.model = await _loaded(self.model_src)
            if self.embedding_src is not None:
                self.embedding_model = await _loaded(self.embedding_src)
            model = self.model
            self.templates = await anyio.to_thread.run_sync(self._templates)
            self.engine = await anyio.to_thread.run_sync(lambda: AsyncEngine(
                model, n_parallel=self.parallel, n_ctx=self.ctx_size, n_batch=self.n_batch, n_threads=self.n_threads,
                flash_attn=self.flash_attn))
            log.info("serving %s (%d slots of %d tokens)", self.model_name, self.parallel,
                     self.engine.n_ctx_per_sequence)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("could not start: %s", self.error)
            if self.on_start_error is not None:
                self.on_start_error(self.error)

    def _templates(self) -> _ChatTemplates | None:
        """The chat templates requests are rendered with: the --chat-template override (which
        must parse), or the model's own (None if it has none; plain chats then fail clearly)."""
        assert self.model is not None
        if self.chat_template is not None:
            return _ChatTemplates(self.model, self.chat_template)
        try:
            return _ChatTemplates(self.model)
        except ChatTemplateError as exc:
            log.warning("no tool calling: %s", exc)
            return None

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.aclose()
        if self.embedder is not None:
            await self.embedder.aclose()

    def ready(self) -> AsyncEngine:
        if self.error is not None:
            raise APIError(503, f"the model could not be loaded: {self.error}", code="model_load_failed")
        if self.engine is None:
            raise APIError(503, "the model is loading; try again shortly", code="model_loading",
                           headers={"Retry-After": "1"})
        return self.engine

    async def embedding_generator(self) -> AsyncEmbeddingGenerator:
        """Made at the first embeddings request: a server that never embeds keeps no context for it."""
        self.ready()
        async with self._embed_lock:
            if self.embedder is None:
                model = self.embedding_model or self.model
                assert model is not None
                n_ctx = self.embedding_ctx_size or min(model.n_ctx_train, 2048)
                self.embedder = await anyio.to_thread.run_sync(
                    lambda: AsyncEmbeddingGenerator(model, n_ctx, n_threads=self.n_threads))
            return self.embedder

    def check_model(self, body: Mapping[str, Any], names: Sequence[str]) -> str:
        name = body.get("model")
        if name is None:
            return names[0]
        if name not in names:
            raise APIError(404, f"The model {name!r} does not exist here; this server has {list(names)}",
                           param="model", code="model_not_found")
        return name

    def admit(self, n: int) -> Callable[[], None]:
        """Count n engine requests in (refused with a 503 when max_waiting would be exceeded);
        returns the function, safe to call more than once, that counts them out."""
        if self.max_waiting is not None and self.active + n > self.parallel + self.max_waiting:
            raise APIError(503, f"the server is busy: {self.active} requests for {self.parallel} slots and "
                           f"{self.max_waiting} waiting places; retry later", code="server_busy",
                           type="server_error", headers={"Retry-After": "1"})
        self.active += n
        left = [n]

        def release() -> None:
            self.active -= left[0]
            left[0] = 0

        return release

    # -- endpoints ------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if self.error is not None:
            return _json({"status": "error", "error": self.error}, 503)
        if self.model is not None and self.model._rpc_lost:
            return _json({"status": "error", "error": "an RPC server holding layers of the model stopped "
                          "answering; restart this server once it is back"}, 503)
        if self.engine is None:
            return _json({"status": "loading"}, 503, {"Retry-After": "1"})
        return _json({"status": "ok", **self.engine.stats(), "prompt_cache": self.prompt_cache.stats()})

    async def models(self, request: Request) -> Response:
        names = dict.fromkeys([self.model_name, self.embedding_name])
        return _json({"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "mullama"} for name in names]})

    async def chat(self, request: Request) -> Response:
        body = await _body(request)
        engine = self.ready()
        name = self.check_model(body, [self.model_name])
        _refuse_unsupported(body)
        assert self.model is not None
        logprobs = _bool(body, "logprobs")
        top = _intd(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        if top and not logprobs:
            raise _bad("top_logprobs", "needs logprobs: true")
        params = _sampler(body, self.model.n_vocab, top, logprobs)
        plan = await self._chat_plan(body, params)
        tokens = self._prompt(plan.prompt, engine, "messages")
        return await self._generate(request, body, name, tokens, [""], plan.params, chat=True, plan=plan)

    async def _chat_plan(self, body: Mapping[str, Any], params: SamplerParams) -> _tools.ChatPlan:
        """The prompt and parameters of a chat request. Plain chats on the model's own template
        take llama.cpp's built-in formats where they know it (no Jinja run); tools, tool
        messages and --chat-template go through llama.cpp's chat layer, off the event loop."""
        assert self.model is not None
        try:
            messages, plain = _tools.read_messages(body.get("messages"))
            tools = _tools.read_tools(body)
            if tools.active and params.logprobs:
                raise _tools.FieldError("logprobs", "is not supported together with tools")
            if plain and not tools.tools and self.chat_template is None:
                return _tools.ChatPlan(self.model.apply_chat_template(messages), params)
            templates = self.templates
            if templates is None:
                raise _tools.FieldError("messages", f"model {self.model.path!r} has no chat template; start the "
                                        "server with one (mullama serve --chat-template FILE)")
            return await anyio.to_thread.run_sync(lambda: _tools.plan(templates, messages, tools, params))
        except _tools.FieldError as exc:
            raise _bad(exc.param, str(exc)) from None
        except ChatTemplateError as exc:
            raise _bad("messages", str(exc)) from None
        except MullamaError as exc:
            raise _from_mullama(exc, "tools") from None

    async def completions(self, request: Request) -> Response:
        body = await _body(request)
        engine = self.ready()
        name = self.check_model(body, [self.model_name])
        if body.get("suffix") not in (None, ""):
            raise _bad("suffix", "insertion (fill-in-the-middle with suffix) is not supported; "
                       "send the whole prompt instead")
        if _intd(body, "best_of", 1, 1, MAX_N) != 1:
            raise _bad("best_of", "only best_of=1 is supported; use n for several completions")
        n_probs = _int(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
        echo = _bool(body, "echo")
        if echo and n_probs is not None:
            raise _bad("echo", "echo with logprobs is not supported (the prompt's tokens get no log-probabilities)")
        assert self.model is not None
        params = _sampler(body, self.model.n_vocab, n_probs or 0, n_probs is not None)
        prompts = self._completion_prompts(body.get("prompt"))
        token_lists = [self._fits(p, engine, "prompt") if isinstance(p, list) else self._prompt(p, engine, "prompt")
                       for p in prompts]
        echoes = [""] * len(prompts)
        if echo:
            echoes = [p if isinstance(p, str) else self.model.detokenize(p) for p in prompts]
        if len(token_lists) > 1:   # several prompts: one request, as many choices per prompt as n
            return await self._generate(request, body, name, token_lists, echoes, params, chat=False)
        return await self._generate(request, body, name, token_lists[0], echoes, params, chat=False)

    async def embeddings(self, request: Request) -> Response:
        body = await _body(request)
        self.ready()
        name = self.check_model(body, [self.embedding_name])
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise _bad("encoding_format", f"must be 'float' or 'base64', got {fmt!r}")
        gen = await self.embedding_generator()
        dims = _int(body, "dimensions", None, 1, 1 << 20)
        if dims is not None and dims != gen.n_embd:
            raise _bad("dimensions", f"this model gives {gen.n_embd} dimensions and cannot shorten them; "
                       "leave dimensions out")
        model = gen.model
        texts = self._embedding_texts(body.get("input"), model)
        n_tokens = sum(len(model.tokenize(t, True, True)) for t in texts)
        request.scope["mullama.tokens"] = (n_tokens, 0)
        try:
            vectors = await _until_disconnect(request, lambda: gen.embed_batch(texts))
        except MullamaError as exc:
            raise _from_mullama(exc, "input") from None
        if isinstance(vectors, Response):
            return vectors
        data = []
        for i, v in enumerate(vectors):
            vec: Any = base64.b64encode(np.ascontiguousarray(v, "<f4").tobytes()).decode() if fmt == "base64" else v
            data.append({"object": "embedding", "index": i, "embedding": vec})
        return _json({"object": "list", "data": data, "model": name,
                      "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

    # -- helpers --------------------------------------------------------------------------------

    def _prompt(self, text: str, engine: AsyncEngine, param: str) -> list[int]:
        assert self.model is not None
        tokens = self.model.tokenize(text, True, True)
        if not tokens and self.model.token_bos >= 0:
            tokens = [self.model.token_bos]
        if not tokens:
            raise _bad(param, "is empty; give some text")
        return self._fits(tokens, engine, param)

    def _fits(self, tokens: list[int], engine: AsyncEngine, param: str) -> list[int]:
        limit = engine.n_ctx_per_sequence
        if len(tokens) >= limit:
            raise APIError(400, f"the prompt is {len(tokens)} tokens; this server's context holds {limit} per "
                           "request (--ctx-size / --parallel); shorten it", param=param,
                           code="context_length_exceeded")
        return tokens

    def _completion_prompts(self, value: Any) -> list[str | list[int]]:
        assert self.model is not None
        n_vocab = self.model.n_vocab

        def token_list(x: list[Any], where: str) -> list[int]:
            for t in x:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_vocab:
                    raise _bad(where, f"token {t!r} is not a token id in [0, {n_vocab})")
            return x

        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value:
            if all(isinstance(x, str) for x in value):
                return list(value)
            if all(isinstance(x, int) and not isinstance(x, bool) for x in value):
                return [token_list(value, "prompt")]
            if all(isinstance(x, list) and x for x in value):
                return [token_list(x, f"prompt[{i}]") for i, x in enumerate(value)]
        raise _bad("prompt", "must be a string, a list of strings, a list of token ids or a list of such lists")

    def _embedding_texts(self, value: Any, model: Model) -> list[str]:
        n_vocab = model.n_vocab

        def from_tokens(x: list[Any], where: str) -> str:
            for t in x:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_vocab:
                    raise _bad(where, f"token {t!r} is not a token id of this model, in [0, {n_vocab}) (a client "
                               "that tokenizes for OpenAI's models sends others: LangChain's OpenAIEmbeddings "
                               "needs check_embedding_ctx_length=False)")
            return model.detokenize(x)

        texts: list[str]
        if isinstance(value, str):
            texts = [value]
        elif isinstance(value, list) and value and all(isinstance(x, str) for x in value):
            texts = list(value)
        elif isinstance(value, list) and value and all(isinstance(x, int) for x in value):
            texts = [from_tokens(value, "input")]
        elif isinstance(value, list) and value and all(isinstance(x, list) and x for x in value):
            texts = [from_tokens(x, f"input[{i}]") for i, x in enumerate(value)]
        else:
            raise _bad("input", "must be a non-empty string, list of strings, list of token ids or list of such lists")
        if len(texts) > 2048:
            raise _bad("input", f"{len(texts)} inputs; at most 2048 per request")
        for i, t in enumerate(texts):
            if not t:
                raise _bad(f"input[{i}]" if len(texts) > 1 else "input", "is empty; embed a non-empty text")
        return texts

    async def _generate(self, request: Request, body: Mapping[str, Any], name: str,
                        tokens: list[int] | list[list[int]], echoes: list[str], params: SamplerParams,
                        *, chat: bool, plan: _tools.ChatPlan | None = None) -> Response:
        engine = self.ready()
        n = _intd(body, "n", 1, 1, MAX_N)
        prompts: list[list[int]]
        prompts = tokens if tokens and isinstance(tokens[0], list) else [tokens]  # type: ignore[assignment,list-item]
        stream = _bool(body, "stream")
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise _bad("stream_options", "must be an object")
        include_usage = bool(options and options.get("include_usage"))
        if options is not None and not stream:
            raise _bad("stream_options", "is only allowed with stream: true")
        limit = engine.n_ctx_per_sequence
        max_field = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _int(body, max_field, None if chat else 16, 0, 1 << 30)
        jobs = []   # (choice index, prompt tokens, echo, params, max_tokens)
        saved = []  # per job: (a cached state its prompt begins with, whether to keep its own)
        cache = self.prompt_cache
        for p, toks in enumerate(prompts):
            room = limit - len(toks)
            found = cache.lookup(toks, engine.cached_prefix(toks))
            for j, prm in enumerate(_choice_params(params, n)):
                jobs.append((p * n + j, toks, echoes[p] if p < len(echoes) else "", prm,
                             room if max_tokens is None else max_tokens))
                saved.append((found, j == 0 and cache.wants(toks)))
        cid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        state = request.scope.setdefault("mullama.tokens", [0, 0])

        release = self.admit(len(jobs))
        if not stream:
            try:
                done = await _until_disconnect(request, lambda: _complete_all(engine, jobs, saved))
            except MullamaError as exc:
                raise _from_mullama(exc) from None
            finally:
                release()
            if isinstance(done, Response):
                return done
            for c in done:
                cache.store(c.state)
            choices = [self._choice(index, c, echo, prm, chat, plan) for (index, _, echo, prm, _), c in zip(jobs, done)]
            prompt_tokens = sum(len(p) for p in prompts)
            completion_tokens = sum(c.usage.completion_tokens for c in done)
            cached = sum(c.usage.reused_tokens for c in done[::n])
            state[0], state[1] = prompt_tokens, completion_tokens
            return _json({"id": cid, "object": obj, "created": created, "model": name, "choices": choices,
                          "usage": _usage(prompt_tokens, completion_tokens, cached)})

        # Streams are submitted here, before the response starts: bad input is still a 400.
        streams: list[Any] = []
        try:
            for (_, toks, _, prm, mt), (found, keep) in zip(jobs, saved):
                streams.append(engine.stream_from_tokens(toks, mt, prm, buffer=64, state=found, keep_state=keep))
        except BaseException as exc:
            for s in streams:
                s.cancel()
            release()
            if isinstance(exc, MullamaError):
                raise _from_mullama(exc) from None
            raise

        base = {"id": cid, "object": obj + ".chunk" if chat else obj, "created": created, "model": name}
        extra = {"usage": None} if include_usage else {}

        async def produce(emit: Callable[[bytes], Awaitable[None]]) -> None:
            try:
                if len(streams) == 1:
                    index, _, echo, prm, _ = jobs[0]
                    await self._stream_choice(emit, streams[0], index, echo, prm, base, extra, chat, plan)
                else:
                    lock = anyio.Lock()

                    async def locked_emit(data: bytes) -> None:
                        async with lock:   # one event at a time on the connection
                            await emit(data)

                    await _together([functools.partial(self._stream_choice, locked_emit, s, job[0], job[2], job[3],
                                                       base, extra, chat, plan) for s, job in zip(streams, jobs)])
            finally:
                await close()
            if include_usage:
                cached = sum(s.usage.reused_tokens for s in streams[::n])
                await emit(_sse({**base, "choices": [], "usage": _usage(state[0], state[1], cached)}))

        async def close() -> None:
            with anyio.CancelScope(shield=True):
                for s in streams:
                    await s.aclose()
            for s in streams:
                cache.store(s.state)
            release()
            state[0] = sum(len(p) for p in prompts)
            state[1] = sum(s.usage.completion_tokens for s in streams)

        return _EventStream(produce, close)  # type: ignore[return-value]

    async def _stream_choice(self, emit: Callable[[bytes], Awaitable[None]], s: Any, index: int, echo: str,
                             params: SamplerParams, base: dict[str, Any], extra: dict[str, Any], chat: bool,
                             plan: _tools.ChatPlan | None = None) -> None:
        if plan is not None and plan.tools:
            return await self._stream_tool_choice(emit, s, index, plan, base, extra)
        want_lp = params.logprobs
        cursor = _LogprobCursor()
        sent = 0        # bytes of text sent
        chars = len(echo)

        def chunk(text: str | None, finish: str | None, entries: list[TokenLogprob] | None) -> bytes:
            if chat:
                delta = {} if text is None else {"content": text}
                lp = None if entries is None else _chat_logprobs(entries)
                return _sse({**base, "choices": [{"index": index, "delta": delta, "logprobs": lp,
                                                  "finish_reason": finish}], **extra})
            lp = None if entries is None else _text_logprobs(entries, chars)
            return _sse({**base, "choices": [{"text": text or "", "index": index, "logprobs": lp,
                                              "finish_reason": finish}], **extra})

        if chat:
            await emit(_sse({**base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}], **extra}))
            head, tail = _piece_template({**base, "choices": [{"index": index, "delta": {
                "content": "\x00mullama-piece\x00"}, "logprobs": None, "finish_reason": None}], **extra})
        else:
            head, tail = _piece_template({**base, "choices": [{"text": "\x00mullama-piece\x00", "index": index,
                                                               "logprobs": None, "finish_reason": None}], **extra})
            if echo:
                await emit(chunk(echo, None, [] if want_lp else None))
        async with s:
            async for piece in s:
                if want_lp:
                    sent += len(piece.encode())
                    await emit(chunk(piece, None, cursor.advance(s.logprobs, sent)))
                    chars += len(piece)
                else:
                    await emit(head + orjson.dumps(piece) + tail)
        reason = _FINISH.get(s.finish_reason or "stop", "stop")
        rest = cursor.advance(s.logprobs, sent) if want_lp else None
        await emit(chunk(None, reason, rest or None if chat else rest))

    async def _stream_tool_choice(self, emit: Callable[[bytes], Awaitable[None]], s: Any, index: int,
                                  plan: _tools.ChatPlan, base: dict[str, Any], extra: dict[str, Any]) -> None:
        """One choice of a request with tools: each piece is parsed with what came before it,
        and the delta carries what changed (content, or a call's name, id and argument text)."""
        reader = plan.reader()
        assert reader is not None
        maker = _tools.DeltaMaker(reader, plan.max_calls)

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            return _sse({**base, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                              "finish_reason": finish}], **extra})

        await emit(chunk({"role": "assistant", "content": ""}, None))
        async with s:
            async for piece in s:
                delta = maker.feed(piece, False)
                if delta:
                    await emit(chunk(delta, None))
        delta = maker.feed("", True)
        if delta:
            await emit(chunk(delta, None))
        reason = _FINISH.get(s.finish_reason or "stop", "stop")
        await emit(chunk({}, "tool_calls" if maker.calls and (reason == "stop" or maker.more) else reason))

    def _choice(self, index: int, c: Completion, echo: str, params: SamplerParams, chat: bool,
                plan: _tools.ChatPlan | None = None) -> dict[str, Any]:
        reason = _FINISH.get(c.finish_reason or "stop", "stop")
        reader = plan.reader() if plan is not None else None
        if plan is not None and reader is not None:
            message, whole = _tools.final_message(reader, c.text, reason == "length", plan.max_calls)
            if whole:
                reason = "tool_calls"
            return {"index": index, "message": message, "logprobs": None, "finish_reason": reason}
        entries = _LogprobCursor().advance(c.logprobs, len(c.text.encode())) if params.logprobs else None
        if chat:
            return {"index": index, "message": {"role": "assistant", "content": c.text, "refusal": None},
                    "logprobs": None if entries is None else _chat_logprobs(entries), "finish_reason": reason}
        return {"text": echo + c.text, "index": index,
                "logprobs": None if entries is None else _text_logprobs(entries, len(echo)), "finish_reason": reason}


async def _together(fns: Sequence[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run fns concurrently and return their results. The first to fail cancels the others, and
    its exception is raised as itself (not in an ExceptionGroup), so that it maps to a status."""
    results: list[Any] = [None] * len(fns)
    errors: list[Exception] = []

    async with anyio.create_task_group() as tg:
        async def one(k: int) -> None:
            try:
                results[k] = await fns[k]()
            except Exception as exc:
                errors.append(exc)
                tg.cancel_scope.cancel()

        for k in range(len(fns)):
            tg.start_soon(one, k)
    if errors:
        raise errors[0]
    return results


async def _complete_all(engine: AsyncEngine, jobs: list[Any], saved: list[Any]) -> list[Completion]:
    """The completions of all jobs, decoded together on the engine."""
    return await _together([functools.partial(engine.complete, toks, mt, prm, state=state, keep_state=keep)
                            for (_, toks, _, prm, mt), (state, keep) in zip(jobs, saved)])


def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _template_text(value: str | PathLike[str] | None) -> str | None:
    """A chat template given as text, or as the path of a file holding it."""
    if value is None:
        return None
    if not isinstance(value, (str, PathLike)):
        raise InvalidArgumentError(f"chat_template={value!r} must be a Jinja template (str) or the path of a file "
                                   "holding one")
    if isinstance(value, str) and ("{{" in value or "{%" in value):
        return value
    path = Path(value)
    if not path.is_file():
        raise InvalidArgumentError(f"chat_template={str(value)!r} is neither a Jinja template nor a file")
    return path.read_text(encoding="utf-8")


def _name_of(model: Any) -> str:
    path = model.path if isinstance(model, Model) else model
    return Path(path).name.removesuffix(".gguf")


async def _loaded(model: str | PathLike[str] | Model) -> Model:
    return model if isinstance(model, Model) else await load_model(model)


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise APIError(413, f"the request body is {len(raw)} bytes; at most {MAX_BODY}")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise APIError(400, f"We could not parse the JSON body of your request ({exc})") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/chat/completions",
          "/completions", "/embeddings", "/models", "/health", "/v1/health", "/metrics"}


class _Metrics:
    """Prometheus metrics of one application (its own registry, so that two apps in a process
    do not mix): requests by path and status, their duration and tokens, and the engine's state
    read at each scrape."""

    def __init__(self, server: _Server) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.registry = CollectorRegistry()
        self.requests = Counter("mullama_requests", "HTTP requests answered", ["path", "status"],
                                registry=self.registry)
        self.seconds = Histogram("mullama_request_duration_seconds", "Time to answer a request (to its last byte)",
                                 ["path"], registry=self.registry,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.prompt_tokens = Counter("mullama_prompt_tokens", "Prompt tokens of answered requests",
                                     registry=self.registry)
        self.completion_tokens = Counter("mullama_completion_tokens", "Tokens generated for answered requests",
                                         registry=self.registry)

        class Engine:
            def collect(self) -> Any:
                stats = server.engine.stats() if server.engine is not None else {}
                for name, what in (("running", "Requests being decoded"),
                                   ("waiting", "Requests waiting for a slot"),
                                   ("slot_use", "Share of the engine's slots in use"),
                                   ("tokens_per_second", "Tokens generated per second, last seconds")):
                    yield GaugeMetricFamily(f"mullama_{name}", what, value=stats.get(name, 0))
                yield GaugeMetricFamily("mullama_slots", "Requests the engine decodes together",
                                        value=stats.get("slots", server.parallel))
                yield CounterMetricFamily("mullama_generated_tokens", "Tokens generated by the engine",
                                          value=stats.get("generated_tokens", 0))
                yield CounterMetricFamily("mullama_engine_steps", "Decode steps of the engine",
                                          value=stats.get("steps", 0))
                yield CounterMetricFamily("mullama_prompt_tokens_decoded", "Prompt tokens the engine decoded",
                                          value=stats.get("prompt_tokens_decoded", 0))
                yield CounterMetricFamily("mullama_reused_tokens",
                                          "Prompt tokens the engine found in its cache instead of decoding",
                                          value=stats.get("reused_tokens", 0))
                yield GaugeMetricFamily("mullama_ready", "1 once the model is loaded",
                                        value=1 if server.engine is not None else 0)

        self.registry.register(Engine())  # type: ignore[arg-type]

    def observe(self, path: str, status: int, seconds: float, tokens: Sequence[int]) -> None:
        label = path if path in _PATHS else "other"
        self.requests.labels(label, str(status)).inc()
        self.seconds.labels(label).observe(seconds)
        if tokens[0] or tokens[1]:
            self.prompt_tokens.inc(tokens[0])
            self.completion_tokens.inc(tokens[1])

    async def endpoint(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class _Front:
    """The outermost ASGI layer: the API key, and one log line per request (method, path, status,
    prompt and completion tokens, seconds). Plain ASGI: no per-request middleware objects."""

    def __init__(self, app: Any, api_key: str | None, metrics: _Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self.key = ("Bearer " + api_key).encode() if api_key else None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [0]

        async def send_status(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.key is not None and scope["path"] != "/health" and not self._authorized(scope):
                error = APIError(401, "Incorrect API key provided; send it as 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")
                await error.response()(scope, receive, send_status)
                return
            await self.app(scope, receive, send_status)
        finally:
            tokens = scope.get("mullama.tokens", (0, 0))
            seconds = time.perf_counter() - t0
            self.metrics.observe(scope["path"], status[0], seconds, tokens)
            log.info("%s %s %d %d+%d tokens %.3f s", scope["method"], scope["path"], status[0], tokens[0],
                     tokens[1], seconds)

    def _authorized(self, scope: Any) -> bool:
        for key, value in scope["headers"]:
            if key == b"authorization":
                return hmac.compare_digest(value, self.key)  # type: ignore[arg-type]
        return False


def create_app(model: str | PathLike[str] | Model | None = None, *,
               embedding_model: str | PathLike[str] | Model | None = None, parallel: int = 8,
               ctx_size: int | None = None, api_key: str | None = None, max_waiting: int | None = None,
               model_name: str | None = None, embedding_model_name: str | None = None, n_batch: int = 512,
               n_threads: int = 0, embedding_ctx_size: int | None = None, prompt_cache_mb: int = 256,
               chat_template: str | PathLike[str] | None = None,
               on_start_error: Callable[[str], None] | None = None, flash_attn: bool | None = None) -> Any:
    """An ASGI application serving OpenAI's API from ``model`` (a GGUF path or a loaded
    :class:`mullama.Model`; default: :func:`mullama.models.fetch`).

    ``parallel`` requests decode together, each in ``ctx_size // parallel`` tokens of context
    (``ctx_size`` is the total, as llama-server's ``-c``); more wait their turn, and beyond
    ``max_waiting`` of them the server answers 503 with ``Retry-After``. ``api_key`` makes every
    endpoint but ``/health`` ask for ``Authorization: Bearer KEY``. ``embedding_model`` serves
    ``/v1/embeddings`` (default: the generation model). Models named by path are loaded when the
    application starts (its lifespan), in the background: ``/health`` answers 503 ``loading``
    until they are ready. Model names in the API are the file names without ``.gguf`` unless
    ``model_name``/``embedding_model_name`` are given. Up to ``prompt_cache_mb`` MiB of recent
    requests' caches are kept (0: none), so a prompt that begins with an earlier conversation
    decodes only what is new (``usage.prompt_tokens_details.cached_tokens``).

    ``chat_template`` (a Jinja template, or the path of a file holding one) replaces the
    model's own; llama.cpp's chat layer renders it, and with it builds the grammar and the
    parser of tool calls (``tools``, ``tool_choice``). A model whose template cannot express
    tools answers requests with ``tools`` 400, naming this option.

    ``flash_attn`` is the engine's (None: llama.cpp's choice, on for the CPU); there, off makes
    a long chat's next turns faster, and long prompts and many streams slower (BENCHMARKS.md).

    A server that cannot start (a model that does not load, a context it cannot create) answers
    503 with the reason; ``on_start_error`` is called with it too (``mullama serve`` exits).
    """
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"parallel={parallel!r} must be an int >= 1")
    if max_waiting is not None and (isinstance(max_waiting, bool) or not isinstance(max_waiting, int)
                                    or max_waiting < 0):
        raise ValueError(f"max_waiting={max_waiting!r} must be None or an int >= 0")
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        # An empty key would turn the check off: a script's unset variable must not open the server.
        raise ValueError("api_key must be None (no key) or a non-empty str")
    if flash_attn is not None and not isinstance(flash_attn, bool):
        raise ValueError(f"flash_attn={flash_attn!r} must be None, True or False")
    server = _Server(model, embedding_model, parallel=parallel, ctx_size=ctx_size, api_key=api_key,
                     max_waiting=max_waiting, model_name=model_name, embedding_model_name=embedding_model_name,
                     n_batch=n_batch, n_threads=n_threads, embedding_ctx_size=embedding_ctx_size,
                     prompt_cache_mb=prompt_cache_mb, chat_template=_template_text(chat_template),
                     on_start_error=on_start_error, flash_attn=flash_attn)
    if isinstance(model, Model) and server.chat_template is not None:
        _ChatTemplates(model, server.chat_template)   # a template that does not parse: ChatTemplateError now

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.start)
            yield
            tg.cancel_scope.cancel()
        await server.stop()

    def endpoint(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            try:
                return await fn(request)
            except APIError as exc:
                return exc.response()
            except MullamaError as exc:   # bad input the checks above did not name
                return _from_mullama(exc).response()
        return handle

    routes = []
    for path, fn, methods in (("/chat/completions", server.chat, ["POST"]),
                              ("/completions", server.completions, ["POST"]),
                              ("/embeddings", server.embeddings, ["POST"]),
                              ("/models", server.models, ["GET"])):
        routes.append(Route("/v1" + path, endpoint(fn), methods=methods))
        routes.append(Route(path, endpoint(fn), methods=methods))
    routes.append(Route("/health", server.health, methods=["GET"]))
    routes.append(Route("/v1/health", server.health, methods=["GET"]))
    metrics = _Metrics(server)
    routes.append(Route("/metrics", metrics.endpoint, methods=["GET"]))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        what = "Unknown path" if exc.status_code == 404 else str(exc.detail)
        return APIError(exc.status_code, f"{what}: {request.method} {request.url.path}",
                        code="not_found" if exc.status_code == 404 else None).response()

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.mullama = server
    return _Front(app, api_key, metrics)
