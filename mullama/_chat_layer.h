/* llama.cpp's chat layer (common/chat.h) behind plain types: JSON text in, JSON text or strings
   out. It renders Jinja chat templates, builds the grammar that makes a model's output a
   well-formed tool call, and parses that output back into an OpenAI-shaped message.
   Every entry point catches C++ exceptions and returns them as a message: none may cross into
   Cython, and llama.cpp's chat code throws for bad templates, bad messages and bad output. */
#ifndef MULLAMA_CHAT_LAYER_H
#define MULLAMA_CHAT_LAYER_H

#include <algorithm>
#include <exception>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "llama.h"
#include "chat.h"
#include "common.h"
#include "log.h"

/* The templates of one model (or of an override), as common_chat_templates_init reads them. */
struct mullama_chat {
    common_chat_templates_ptr tmpls;
};

/* What common_chat_templates_apply says about one conversation, with its grammar triggers
   already in the form llama_sampler_init_grammar_lazy_patterns takes (patterns and tokens). */
struct mullama_chat_applied {
    std::string prompt;
    std::string grammar;
    bool grammar_lazy = false;
    std::vector<std::string> trigger_patterns;
    std::vector<llama_token> trigger_tokens;
    std::vector<std::string> trigger_words;      /* the words among the triggers, as text */
    std::vector<llama_token> preserved_tokens;   /* those that are one token of this vocabulary */
    std::vector<std::string> additional_stops;
    std::string generation_prompt;
    std::string parser;                          /* the serialized PEG parser of the output */
    int format = 0;
    std::string format_name;
};

static inline mullama_chat * mullama_chat_init(const llama_model * model, const std::string & override_src,
                                               std::string * err) {
    /* common's own log writes to stderr from a thread of its own; what it says about a template
       comes back as the error here, so it stays quiet (mullama's convention for llama.cpp). */
    common_log_set_verbosity_thold(LOG_LEVEL_OUTPUT);
    try {
        if (!override_src.empty()) {
            /* common_chat_templates_init rethrows a parse error as a bare std::exception: parse
               it alone first, so that the reason comes back. */
            common_chat_template probe(override_src, "", "");
        }
        std::unique_ptr<mullama_chat> c(new mullama_chat());
        c->tmpls = common_chat_templates_init(model, override_src);
        return c.release();
    } catch (const std::exception & e) {
        *err = e.what();
        return nullptr;
    }
}

static inline void mullama_chat_free(mullama_chat * c) {
    delete c;
}

/* The template's capabilities (supports_tools, supports_tool_calls, ...) as a JSON object. */
static inline std::string mullama_chat_caps(const mullama_chat * c) {
    try {
        common_json out = common_json::object();
        for (const auto & kv : common_chat_templates_get_caps(c->tmpls.get())) out[kv.first] = kv.second;
        return out.dump();
    } catch (const std::exception &) {
        return "{}";
    }
}

static inline std::string mullama_chat_source(const mullama_chat * c) {
    try {
        return common_chat_templates_source(c->tmpls.get());
    } catch (const std::exception &) {
        return std::string();
    }
}

/* Single tokens of this vocabulary for each text; what is not one token is left out. */
static inline void mullama_single_tokens(const llama_vocab * vocab, const std::vector<std::string> & texts,
                                         std::vector<llama_token> & out) {
    for (const auto & t : texts) {
        auto ids = common_tokenize(vocab, t, false, true);
        if (ids.size() == 1) out.push_back(ids[0]);
    }
}

/* Triggers as llama.cpp's common sampler reads them: a word that is one preserved token
   triggers on that token (as llama-server does), any other word on its escaped text; a full
   pattern is anchored at both ends. */
static inline void mullama_chat_triggers(const llama_vocab * vocab, const common_chat_params & p,
                                         mullama_chat_applied * out) {
    for (const auto & t : p.grammar_triggers) {
        switch (t.type) {
            case COMMON_GRAMMAR_TRIGGER_TYPE_WORD: {
                out->trigger_words.push_back(t.value);
                auto ids = common_tokenize(vocab, t.value, false, true);
                bool preserved = ids.size() == 1 &&
                    std::find(out->preserved_tokens.begin(), out->preserved_tokens.end(), ids[0]) !=
                        out->preserved_tokens.end();
                if (preserved) {
                    out->trigger_tokens.push_back(ids[0]);
                } else {
                    out->trigger_patterns.push_back(regex_escape(t.value));
                }
                break;
            }
            case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN:
                out->trigger_patterns.push_back(t.value);
                break;
            case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL: {
                std::string a = t.value;
                if (a.empty() || a.front() != '^') a = "^" + a;
                if (a.size() == 1 || a.back() != '$') a += "$";
                out->trigger_patterns.push_back(a);
                break;
            }
            case COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN:
                out->trigger_tokens.push_back(t.token);
                break;
        }
    }
}

/* Apply the templates to a request, given as JSON: {"messages": [OpenAI messages], "tools":
   [OpenAI tools] or null, "tool_choice": "auto" | "none" | "required", "parallel_tool_calls":
   bool, "json_schema": object or null, "add_generation_prompt": bool}. 0, or -1 with *err. */
static inline int mullama_chat_apply(const mullama_chat * c, const llama_vocab * vocab, const std::string & request,
                                     mullama_chat_applied * out, std::string * err) {
    try {
        common_json req = common_json::parse(request);
        common_chat_templates_inputs in;
        in.messages = common_chat_msgs_parse_oaicompat(req.at("messages"));
        in.tools = common_chat_tools_parse_oaicompat(req.value("tools", common_json()));
        in.tool_choice = common_chat_tool_choice_parse_oaicompat(req.value("tool_choice", std::string("auto")));
        in.parallel_tool_calls = req.value("parallel_tool_calls", false);
        in.add_generation_prompt = req.value("add_generation_prompt", true);
        in.use_jinja = true;
        in.reasoning_format = COMMON_REASONING_FORMAT_AUTO;
        common_json schema = req.value("json_schema", common_json());
        if (!schema.is_null()) in.json_schema = schema.dump();
        common_chat_params p = common_chat_templates_apply(c->tmpls.get(), in);
        out->prompt = p.prompt;
        out->grammar = p.grammar;
        out->grammar_lazy = p.grammar_lazy;
        out->generation_prompt = p.generation_prompt;
        out->parser = p.parser;
        out->additional_stops = p.additional_stops;
        out->format = (int) p.format;
        out->format_name = common_chat_format_name(p.format);
        if (vocab != nullptr) {
            mullama_single_tokens(vocab, p.preserved_tokens, out->preserved_tokens);
            mullama_chat_triggers(vocab, p, out);
        }
        return 0;
    } catch (const std::exception & e) {
        *err = e.what();
        return -1;
    }
}

/* The parser of one reply: the text so far, its last parse, and the ids given to its calls. */
struct mullama_chat_parser {
    common_chat_parser_params params;
    std::string text;
    common_chat_msg msg;
    std::vector<std::string> ids;
};

static inline mullama_chat_parser * mullama_chat_parser_new(int format, const std::string & generation_prompt,
                                                            const std::string & parser, bool parse_tool_calls,
                                                            std::string * err) {
    try {
        std::unique_ptr<mullama_chat_parser> p(new mullama_chat_parser());
        p->params.format = (common_chat_format) format;
        p->params.generation_prompt = generation_prompt;
        p->params.reasoning_format = COMMON_REASONING_FORMAT_AUTO;
        p->params.parse_tool_calls = parse_tool_calls;
        if (!parser.empty()) p->params.parser.load(parser);   /* as llama-server loads it */
        return p.release();
    } catch (const std::exception & e) {
        *err = e.what();
        return nullptr;
    }
}

static inline void mullama_chat_parser_free(mullama_chat_parser * p) {
    delete p;
}

static inline std::string mullama_call_id() {
    static const char alphabet[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    thread_local std::mt19937 rng{std::random_device{}()};
    std::uniform_int_distribution<int> pick(0, (int) sizeof(alphabet) - 2);
    std::string id = "call_";
    for (int i = 0; i < 24; i++) id += alphabet[pick(rng)];
    return id;
}

static inline common_json mullama_diff_json(const common_chat_msg_diff & d) {
    common_json j = common_json::object();
    if (!d.content_delta.empty()) j["content"] = d.content_delta;
    if (!d.reasoning_content_delta.empty()) j["reasoning_content"] = d.reasoning_content_delta;
    if (d.tool_call_index != std::string::npos) {
        j["index"] = (uint64_t) d.tool_call_index;
        j["id"] = d.tool_call_delta.id;
        j["name"] = d.tool_call_delta.name;
        j["arguments"] = d.tool_call_delta.arguments;
    }
    return j;
}

/* Add text to the reply and parse it all again (partial: more may come). *diffs gets the
   changes since the last parse as a JSON list of {content, reasoning_content, index, id, name,
   arguments} (common_chat_msg_diff); *message the whole message, OpenAI-shaped. A partial
   parse that fails keeps the last one; a final one that fails is an error. */
static inline int mullama_chat_parser_feed(mullama_chat_parser * p, const std::string & added, bool partial,
                                           std::string * diffs, std::string * message, std::string * err) {
    try {
        p->text += added;
        common_chat_msg prev = p->msg;
        common_chat_msg now;
        try {
            now = common_chat_parse(p->text, partial, p->params);
        } catch (const std::exception &) {
            if (!partial) throw;
            now = prev;
        }
        common_json out = common_json::array();
        if (!now.empty()) {
            now.set_tool_call_ids(p->ids, mullama_call_id);
            for (const auto & d : common_chat_msg_diff::compute_diffs(prev, now)) out.push_back(mullama_diff_json(d));
            p->msg = now;
        }
        *diffs = out.dump();
        *message = p->msg.to_json_oaicompat().dump();
        return 0;
    } catch (const std::exception & e) {
        *err = e.what();
        return -1;
    }
}

#endif
