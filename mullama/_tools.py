"""Tool calling for ``mullama serve``: OpenAI's ``tools``, ``tool_choice`` and ``tool_calls``
over llama.cpp's own chat layer.

Nothing here renders a template, writes a grammar or parses a reply: llama.cpp's chat layer
(``_ChatTemplates`` / ``_ChatParser`` in the extension) does all three. This module checks the
request's fields, chooses what to ask that layer for, turns its answer into SamplerParams, and
its parses into OpenAI's message and stream deltas.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ._errors import ChatTemplateError, GrammarError
from ._llama import _ChatParser, _ChatTemplates
from ._params import MAX_STOPS, SamplerParams, renamed, schema_grammar

__all__ = ["FieldError", "ToolRequest", "ChatPlan", "read_messages", "read_tools", "plan", "DeltaMaker"]

_ROLES = ("system", "developer", "user", "assistant", "tool")


class FieldError(ValueError):
    """A request field that is wrong; the server answers 400 naming ``param``."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolRequest:
    """The tool fields of a chat request, checked. ``named`` is the function tool_choice names."""

    tools: list[dict[str, Any]]
    choice: str                  # "auto", "none" or "required" (also for a named function)
    named: str | None
    parallel: bool

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"


def _content(content: Any, where: str) -> str | None:
    """A message's content: a string, None, or text parts joined by newlines (as llama.cpp does)."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise FieldError(where, "must be a string or a list of content parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise FieldError(f"{where}[{j}]", f"only text content parts are supported, got {kind!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(call, dict) or call.get("type", "function") != "function" or not isinstance(fn, dict):
        raise FieldError(where, "must be {'type': 'function', 'id': ..., 'function': {'name': ..., 'arguments': ...}}")
    name, args = fn.get("name"), fn.get("arguments", "{}")
    if not isinstance(name, str) or not name:
        raise FieldError(f"{where}.function.name", "must be a non-empty string")
    if not isinstance(args, (str, dict)):
        raise FieldError(f"{where}.function.arguments", "must be a JSON string (or an object)")
    out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
    if call.get("id") is not None:
        if not isinstance(call["id"], str):
            raise FieldError(f"{where}.id", "must be a string")
        out["id"] = call["id"]
    return out


def read_messages(value: Any) -> tuple[list[dict[str, Any]], bool]:
    """OpenAI messages, checked, as llama.cpp's chat layer reads them; and whether all are plain
    (a role and a text content: llama.cpp's built-in formats can render them)."""
    if not isinstance(value, list) or not value:
        raise FieldError("messages", "must be a non-empty list of messages")
    out, plain = [], True
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise FieldError(where, "must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in _ROLES:
            raise FieldError(f"{where}.role", f"must be one of {list(_ROLES)}, got {role!r}")
        if m.get("function_call") is not None:
            raise FieldError(f"{where}.function_call", "the legacy function_call is not supported; use tool_calls")
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role,
                               "content": _content(m.get("content"), f"{where}.content")}
        calls = m.get("tool_calls")
        if calls:
            if role != "assistant" or not isinstance(calls, list):
                raise FieldError(f"{where}.tool_calls", "must be a list, on an assistant message")
            msg["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str):
                raise FieldError(f"{where}.tool_call_id", "a tool message needs the tool_call_id it answers")
            msg["tool_call_id"] = call_id
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        if msg["content"] is None and not calls:
            msg["content"] = ""
        plain = plain and role != "tool" and not calls
        out.append(msg)
    return out, plain


def _tool(t: Any, where: str) -> dict[str, Any]:
    fn = t.get("function") if isinstance(t, dict) else None
    if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
        raise FieldError(where, "must be {'type': 'function', 'function': {'name': ..., 'parameters': {...}}}")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise FieldError(f"{where}.function.name", "must be a non-empty string")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise FieldError(f"{where}.function.parameters", "must be a JSON schema object")
    if params is not None:
        _check_parameters(params, f"{where}.function.parameters")
    desc = fn.get("description")
    if desc is not None and not isinstance(desc, str):
        raise FieldError(f"{where}.function.description", "must be a string")
    out = {"name": name, "parameters": params if params is not None else {"type": "object", "properties": {}}}
    if desc is not None:
        out["description"] = desc
    return {"type": "function", "function": out}


def _check_parameters(schema: dict[str, Any], where: str) -> None:
    """The chat layer makes its call grammar from every tool's parameters with llama.cpp's schema
    converter: a schema the converter refuses is that tool's fault, named here, not a failure to
    render the messages. Patterns it cannot translate stay allowed, as llama-server allows them."""
    try:
        schema_grammar(schema, patterns=False)
    except (GrammarError, TypeError) as exc:
        raise FieldError(where, renamed(exc, "the schema")) from None


def read_tools(body: Mapping[str, Any]) -> ToolRequest:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` of a chat request, checked."""
    value = body.get("tools")
    if value is not None and not isinstance(value, list):
        raise FieldError("tools", "must be a list of function tools")
    tools = [_tool(t, f"tools[{i}]") for i, t in enumerate(value or [])]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise FieldError("tools", "two tools have the same name")
    choice, named = body.get("tool_choice"), None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise FieldError("tool_choice", "must be 'auto', 'none', 'required' or "
                             "{'type': 'function', 'function': {'name': ...}}")
        named, choice = fn["name"], "required"
        if named not in names:
            raise FieldError("tool_choice", f"names the function {named!r}, which is not among the tools {names}")
    elif choice not in ("auto", "none", "required"):
        raise FieldError("tool_choice", f"must be 'auto', 'none', 'required' or a named function, got {choice!r}")
    if choice == "required" and not tools:
        raise FieldError("tool_choice", f"{choice!r} needs tools")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise FieldError("parallel_tool_calls", f"must be true or false, got {parallel!r}")
    return ToolRequest(tools, choice, named, bool(parallel) if parallel is not None else True)


@dataclass(frozen=True)
class ChatPlan:
    """How one chat request is generated and read back: the prompt, the sampler parameters
    (with the tool-call grammar, its triggers and stops), and what the reply's parser needs."""

    prompt: str
    params: SamplerParams
    format: int = 0
    generation_prompt: str = ""
    parser: str = ""
    reply_prefix: str = ""     # text the reply begins with, already at the end of the prompt
    tools: bool = False        # whether the reply is parsed for tool calls
    parallel: bool = True      # several calls allowed; else the first is the answer

    @property
    def max_calls(self) -> int | None:
        # llama.cpp's tool-call grammars allow several calls whatever parallel_tool_calls says.
        return None if self.parallel else 1

    def reader(self) -> _ChatParser | None:
        """A parser for one reply (None when the reply is plain text)."""
        if not self.tools:
            return None
        reader = _ChatParser(self.format, self.generation_prompt, self.parser, True)
        if self.reply_prefix:
            reader.feed(self.reply_prefix, True)
        return reader


def plan(templates: _ChatTemplates, messages: list[dict[str, Any]], tools: ToolRequest,
         params: SamplerParams) -> ChatPlan:
    """Ask llama.cpp's chat layer for the prompt and, with tools, the grammar that makes the
    reply a well-formed call; ChatTemplateError (with the field named) for what it refuses.
    Runs the template (milliseconds): the server calls it off the event loop."""
    if (tools.tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)) \
            and not templates.supports_tools:
        raise FieldError("tools" if tools.tools else "messages",
                         "this model's chat template cannot express tools or tool calls, so llama.cpp's "
                         "chat layer would ignore them; start the server with a template that can "
                         "(mullama serve --chat-template FILE, or create_app(chat_template=...))")
    if not tools.active:
        applied = templates.apply(messages, tools=tools.tools or None, tool_choice="none")
        return ChatPlan(applied["prompt"], params)
    if params.grammar is not None or params.json_schema is not None or params.json:
        raise FieldError("response_format", "cannot be combined with tools (their grammar is the template's)")
    shown = templates.apply(messages, tools=tools.tools, tool_choice="auto", parallel_tool_calls=tools.parallel)
    applied = shown
    if tools.choice == "required":
        # A named function: only its call is allowed, though the model is shown every tool.
        allowed = [t for t in tools.tools if tools.named in (None, t["function"]["name"])]
        applied = templates.apply(messages, tools=allowed, tool_choice="required", parallel_tool_calls=tools.parallel)
    if not applied["grammar"] or not applied["parser"]:
        raise FieldError("tools", f"llama.cpp's chat layer found no tool-call format in this chat template "
                         f"({applied['format_name']}); start the server with one it knows (--chat-template)")
    prefix = _required_prefix(shown, tools)
    extra = applied["additional_stops"] + ([prefix] if prefix and not tools.parallel else [])
    # One call wanted: a second marker ends the reply (llama.cpp's grammar would allow more).
    stops = list(params.stop_strings()) + [s for s in extra if s not in params.stop_strings()]
    params = replace(params, stop=stops[:MAX_STOPS], grammar=applied["grammar"], grammar_lazy=applied["grammar_lazy"],
                     grammar_triggers=applied["grammar_triggers"],
                     grammar_trigger_tokens=applied["grammar_trigger_tokens"],
                     grammar_prefill=applied["generation_prompt"] + prefix,
                     preserved_tokens=applied["preserved_tokens"]).validated()
    return ChatPlan(shown["prompt"] + prefix, params, applied["format"], applied["generation_prompt"],
                    applied["parser"], prefix, True, tools.parallel)


def _required_prefix(shown: Mapping[str, Any], tools: ToolRequest) -> str:
    """With a call required, the reply starts with the template's tool-call marker (the word
    llama.cpp's lazy grammar waits for): llama.cpp's required grammar allows free text before
    the call, which a small model can fill to the token limit. OpenAI's required calls come
    without text too."""
    if tools.choice != "required":
        return ""
    words = shown["trigger_words"]
    return words[0] if len(words) == 1 else ""


def _tool_call_json(call: Mapping[str, Any]) -> dict[str, Any]:
    fn = call["function"]
    return {"id": call.get("id") or "", "type": "function",
            "function": {"name": fn["name"], "arguments": fn["arguments"]}}


def final_message(reader: _ChatParser, text: str, truncated: bool,
                  max_calls: int | None = None) -> tuple[dict[str, Any], bool]:
    """The whole reply as OpenAI's assistant message, and whether its calls are whole: a reply
    cut short (by the token limit) keeps what parsed, and its calls are whole only when a later
    one (dropped for max_calls) had begun. One that does not parse comes back as content."""
    try:
        _, msg = reader.feed(text, truncated)
    except ChatTemplateError:
        _, msg = reader.feed("", True)
    calls = msg.get("tool_calls") or []
    whole = bool(calls) and (not truncated or (max_calls is not None and len(calls) > max_calls))
    out: dict[str, Any] = {"role": "assistant", "content": msg.get("content") or None, "refusal": None}
    if msg.get("reasoning_content"):
        out["reasoning_content"] = msg["reasoning_content"]
    if msg.get("tool_calls"):
        out["tool_calls"] = [_tool_call_json(c) for c in msg["tool_calls"][:max_calls]]
    elif out["content"] is None:
        out["content"] = ""
    return out, whole


class DeltaMaker:
    """Stream deltas of one reply from the changes between successive parses (llama.cpp's
    common_chat_msg_diff). A call's id and name go out once, with its first argument text (a
    name still being parsed may grow), and every call has been named by the end."""

    def __init__(self, reader: _ChatParser, max_calls: int | None = None) -> None:
        self.reader = reader
        self.max_calls = max_calls
        self.named: set[int] = set()
        self.calls = 0
        self.more = False    # a call beyond max_calls began: those kept are whole

    def feed(self, text: str, final: bool) -> dict[str, Any] | None:
        try:
            diffs, msg = self.reader.feed(text, not final)
        except ChatTemplateError:
            if not final:
                raise
            diffs, msg = self.reader.feed("", True)
        calls = msg.get("tool_calls") or []
        self.more = self.max_calls is not None and len(calls) > self.max_calls
        calls = calls[:self.max_calls]
        self.calls = len(calls)
        delta: dict[str, Any] = {}
        content = "".join(d.get("content", "") for d in diffs)
        reasoning = "".join(d.get("reasoning_content", "") for d in diffs)
        if content:
            delta["content"] = content
        if reasoning:
            delta["reasoning_content"] = reasoning
        out = []
        for d in diffs:
            if "index" in d and d["index"] < len(calls):
                out.extend(self._call(d["index"], d.get("arguments", ""), calls, final))
        if final:
            for i in range(len(calls)):
                out.extend(self._call(i, "", calls, True))
        if out:
            delta["tool_calls"] = out
        return delta or None

    def _call(self, i: int, args: str, calls: list[dict[str, Any]], final: bool) -> list[dict[str, Any]]:
        if i in self.named:
            return [{"index": i, "function": {"arguments": args}}] if args else []
        if not args and not final:
            return []
        self.named.add(i)
        call = calls[i]
        return [{"index": i, "id": call.get("id") or "", "type": "function",
                 "function": {"name": call["function"]["name"], "arguments": args}}]
