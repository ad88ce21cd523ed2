# Chat templates through llama.cpp's own chat layer (common/chat.h, behind _chat_layer.h): any
# Jinja template, tool-call grammars and the parser of a reply. Used by Model.apply_chat_template
# and by the server (mullama/_tools.py); requests and replies cross as JSON text.

import json as _jsonlib


cdef extern from "_chat_layer.h" nogil:
    cdef cppclass mullama_chat:
        pass
    cdef cppclass mullama_chat_applied:
        string prompt
        string grammar
        cbool grammar_lazy
        vector[string] trigger_patterns
        vector[llama_token] trigger_tokens
        vector[string] trigger_words
        vector[llama_token] preserved_tokens
        vector[string] additional_stops
        string generation_prompt
        string parser
        int format
        string format_name
    cdef cppclass mullama_chat_parser:
        pass
    mullama_chat * mullama_chat_init(const llama_model * model, const string & override_src, string * err)
    void mullama_chat_free(mullama_chat * c)
    string mullama_chat_caps(const mullama_chat * c)
    string mullama_chat_source(const mullama_chat * c)
    int mullama_chat_apply(const mullama_chat * c, const llama_vocab * vocab, const string & request,
                           mullama_chat_applied * out, string * err)
    mullama_chat_parser * mullama_chat_parser_new(int format, const string & generation_prompt, const string & parser,
                                                  cbool parse_tool_calls, string * err)
    void mullama_chat_parser_free(mullama_chat_parser * p)
    int mullama_chat_parser_feed(mullama_chat_parser * p, const string & added, cbool partial, string * diffs,
                                 string * message, string * err)


cdef str _text(const string & s):
    return s.decode("utf-8", "replace")


@cython.final
cdef class _ChatTemplates:
    """The chat templates of a model (or ``chat_template``, a Jinja template that replaces
    them), as llama.cpp's chat layer reads them. ChatTemplateError if there is none or it does
    not parse."""

    cdef mullama_chat * c
    cdef readonly Model model    # kept alive: apply() tokenizes with its vocabulary
    cdef readonly str source
    cdef readonly dict caps

    def __cinit__(self):
        self.c = NULL

    def __init__(self, Model model not None, chat_template=None):
        model._check()
        cdef string err
        cdef bytes src = b""
        if chat_template is not None:
            if not isinstance(chat_template, str) or not chat_template.strip():
                raise ChatTemplateError("chat_template must be a non-empty str holding a Jinja template")
            src = _utf8(chat_template, "chat_template")
        elif llama_model_chat_template(model.ptr, NULL) == NULL:
            raise ChatTemplateError(f"model {model.path!r} has no chat template; format the prompt yourself "
                                    "or give one (chat_template=, --chat-template)")
        mark = _log_mark()
        self.c = mullama_chat_init(model.ptr, src, &err)
        if self.c == NULL:
            why = _text(err) or "; ".join(_log_since(mark)) or "llama.cpp refused it"
            raise ChatTemplateError(f"the chat template cannot be parsed: {why}")
        self.model = model
        self.source = _text(mullama_chat_source(self.c))
        self.caps = _jsonlib.loads(_text(mullama_chat_caps(self.c)))

    def __dealloc__(self):
        if self.c != NULL:
            mullama_chat_free(self.c)
            self.c = NULL

    @property
    def supports_tools(self):
        """Whether the template can show the model tools and the calls it made."""
        return bool(self.caps.get("supports_tools") and self.caps.get("supports_tool_calls"))

    def apply(self, list messages, *, tools=None, str tool_choice="auto", bint parallel_tool_calls=False,
              json_schema=None, bint add_generation_prompt=True):
        """Render ``messages`` (OpenAI-shaped dicts, already checked) and say how to constrain
        and parse the reply: a dict of prompt, grammar, grammar_lazy, grammar_triggers,
        grammar_trigger_tokens, trigger_words, preserved_tokens, additional_stops, generation_prompt, parser,
        format and format_name. ChatTemplateError for what the template refuses."""
        self.model._check()
        request = _jsonlib.dumps({"messages": messages, "tools": tools, "tool_choice": tool_choice,
                                  "parallel_tool_calls": parallel_tool_calls, "json_schema": json_schema,
                                  "add_generation_prompt": add_generation_prompt}, ensure_ascii=False)
        cdef string req = request.encode("utf-8", "surrogatepass")
        cdef mullama_chat_applied out
        cdef string err
        cdef int rc
        mark = _log_mark()
        with nogil:
            rc = mullama_chat_apply(self.c, self.model.vocab, req, &out, &err)
        if rc != 0:
            why = _text(err) or "; ".join(_log_since(mark)) or "llama.cpp refused it"
            raise ChatTemplateError(f"the chat template cannot be applied: {why}")
        return {
            "prompt": _text(out.prompt),
            "grammar": _text(out.grammar),
            "grammar_lazy": out.grammar_lazy,
            "grammar_triggers": [_text(p) for p in out.trigger_patterns],
            "grammar_trigger_tokens": list(out.trigger_tokens),
            "trigger_words": [_text(w) for w in out.trigger_words],
            "preserved_tokens": list(out.preserved_tokens),
            "additional_stops": [_text(s) for s in out.additional_stops],
            "generation_prompt": _text(out.generation_prompt),
            "parser": _text(out.parser),
            "format": out.format,
            "format_name": _text(out.format_name),
        }


@cython.final
cdef class _ChatParser:
    """Parses one reply, as it grows, into an OpenAI-shaped message (content, tool_calls with
    JSON-string arguments, reasoning_content), with llama.cpp's parser for the template's
    format (``format``, ``generation_prompt`` and ``parser`` from _ChatTemplates.apply)."""

    cdef mullama_chat_parser * p

    def __cinit__(self):
        self.p = NULL

    def __init__(self, int format, str generation_prompt, str parser, bint parse_tool_calls=True):
        cdef string err
        self.p = mullama_chat_parser_new(format, generation_prompt.encode("utf-8"), parser.encode("utf-8"),
                                         parse_tool_calls, &err)
        if self.p == NULL:
            raise ChatTemplateError(f"llama.cpp cannot load the reply's parser: {_text(err)}")

    def __dealloc__(self):
        if self.p != NULL:
            mullama_chat_parser_free(self.p)
            self.p = NULL

    def feed(self, str text, bint partial):
        """Add ``text`` to the reply; return (the changes since the last call, as dicts of
        content / reasoning_content / index, id, name, arguments; the whole message so far).
        ``partial=False`` marks the end: output that does not parse then raises ChatTemplateError."""
        cdef string added = text.encode("utf-8", "surrogatepass")
        cdef string diffs, message, err
        cdef int rc
        with nogil:
            rc = mullama_chat_parser_feed(self.p, added, partial, &diffs, &message, &err)
        if rc != 0:
            raise ChatTemplateError(f"the reply does not parse as the template's format: {_text(err)}")
        return _jsonlib.loads(_text(diffs)), _jsonlib.loads(_text(message))
