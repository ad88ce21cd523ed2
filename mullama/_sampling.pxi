# SamplerParams -> the controls of one generation: a llama.cpp sampler chain, a grammar sampler,
# stop strings and log-probability settings (_controls.h). The generation that made them owns them.

from ._completion import Completion, TokenLogprob, TopLogprob, Usage
from ._params import _strings


cdef extern from "_controls.h" nogil:
    ctypedef struct mullama_alt:
        llama_token token
        float logprob
    ctypedef struct mullama_token_info:
        llama_token token
        float logprob
        int n_top
        mullama_alt top[20]
    cdef enum:
        MULLAMA_CHOSEN
        MULLAMA_NO_CHOICE
        MULLAMA_NAN_LOGITS
        MULLAMA_GRAMMAR_OK
        MULLAMA_GRAMMAR_BAD
        MULLAMA_GRAMMAR_NEEDS_VOCAB
    cdef cppclass mullama_controls:
        int n_vocab
        llama_sampler * chain
        llama_sampler * grammar
        bint want_logprobs
        bint argmax
        int n_probs
        vector[string] stops
        vector[llama_token] preserved
        vector[llama_token] tokens
        vector[mullama_token_info] infos
        string text
    bint mullama_append_piece(const llama_vocab * vocab, llama_token tok, string & s)
    int mullama_choose(mullama_controls * c, const float * row, llama_token * out)
    bint mullama_take(mullama_controls * c, const llama_vocab * vocab, llama_token tok)
    size_t mullama_ready(const mullama_controls * c)
    int mullama_check_grammar(const char * src, string * err) except +
    int mullama_schema_to_grammar(const string & schema, string * out, string * err) except +
    llama_sampler * mullama_grammar_lazy(const llama_vocab * vocab, const char * grammar,
                                         const vector[string] & patterns, const vector[llama_token] & tokens,
                                         string * err)
    bint mullama_grammar_prefill(llama_sampler * grammar, const llama_vocab * vocab, const string & text)


# What _choose found, in numbers of its own.
cdef enum Choice:
    CHOICE_TOKEN = 2000       # a token was chosen
    CHOICE_NONE = 2001        # the grammar allows no token here
    CHOICE_NO_LOGITS = 2002   # the last decode computed no logits at this row
    CHOICE_NAN = 2003         # the row holds NaN (weights or cache that are not numbers)


cdef inline Choice _choose(mullama_controls * c, llama_context * ctx, int idx, llama_token * tok) noexcept nogil:
    """Choose the next token from output row idx into *tok. No memory means an encoder-only
    model (its llama_decode runs the encoder, no logits); a stamp still on the row
    (mullama_logits_used) means some other model that computed none."""
    cdef float * row = llama_get_logits_ith(ctx, idx)
    if llama_get_memory(ctx) == NULL or not mullama_logits_fresh(row):
        return CHOICE_NO_LOGITS
    cdef int r = mullama_choose(c, row, tok)
    mullama_logits_used(row)
    if r == MULLAMA_NAN_LOGITS:
        return CHOICE_NAN
    return CHOICE_TOKEN if r == MULLAMA_CHOSEN else CHOICE_NONE


@cython.final
cdef class _Controls:
    """Owns the mullama_controls of one generation (a Context call, a stream, an engine request)."""

    cdef mullama_controls * c

    def __cinit__(self):
        self.c = NULL

    @staticmethod
    cdef _Controls make(object params, Model model, int n_ctx):
        cdef _Controls self = _Controls.__new__(_Controls)
        self.c = _make_controls(params, model, n_ctx)
        return self

    def __dealloc__(self):
        if self.c != NULL:
            del self.c
            self.c = NULL


def _check_grammar(str text):
    """Parse a GBNF grammar with llama.cpp's parser; raise GrammarError with its message."""
    cdef string err
    cdef bytes src = text.encode("utf-8")
    mark = _log_mark()
    cdef int rc = mullama_check_grammar(src, &err)
    if rc == MULLAMA_GRAMMAR_BAD:
        raise GrammarError(f"invalid grammar: {_grammar_reason(err, mark)}")


cdef str _grammar_reason(string & err, object mark):
    reason = err.decode("utf-8", "replace") or "; ".join(_log_since(mark, logging.DEBUG)) or "llama.cpp refused it"
    return reason if len(reason) <= 300 else reason[:300] + "..."


def _json_schema_to_grammar(str schema):
    """JSON schema (JSON text) -> GBNF, by llama.cpp's json_schema_to_grammar."""
    cdef string out, err
    if mullama_schema_to_grammar(schema.encode("utf-8"), &out, &err) != 0:
        reason = err.decode("utf-8", "replace").replace("JSON schema conversion failed:\n", "").strip()
        raise GrammarError(f"SamplerParams.json_schema cannot be turned into a grammar: {reason}")
    return out.decode("utf-8")


cdef mullama_controls * _make_controls(object params, Model model, int n_ctx) except NULL:
    """Build the controls of one generation; the caller deletes them."""
    params = SamplerParams.coerce(params)
    stops = params.stop_strings()
    grammar = params.grammar_text()
    bias = _logit_bias(params, model._n_vocab)
    cdef mullama_controls * c = new mullama_controls()
    try:
        c.chain = _make_chain(params, model, n_ctx, bias)
        c.argmax = params.temperature == 0 and llama_sampler_chain_n(c.chain) == 1
        if grammar is not None:
            c.grammar = _make_grammar(grammar, model, params)
        for t in sorted(set(_token_ids(params.preserved_tokens, "preserved_tokens", model._n_vocab))):
            c.preserved.push_back(t)
        c.want_logprobs = params.logprobs or params.n_probs > 0
        c.n_probs = params.n_probs
        for s in stops:
            c.stops.push_back(s.encode("utf-8"))
        c.n_vocab = model._n_vocab
    except BaseException:
        del c
        raise
    return c


cdef llama_sampler * _make_grammar(str grammar, Model model, object params) except NULL:
    cdef bytes src = grammar.encode("utf-8")
    cdef string err
    cdef vector[string] patterns
    cdef vector[llama_token] tokens
    mark = _log_mark()
    cdef llama_sampler * g
    if params.grammar_lazy:
        for p in _strings(params.grammar_triggers, "grammar_triggers"):
            patterns.push_back(p.encode("utf-8"))
        for t in _token_ids(params.grammar_trigger_tokens, "grammar_trigger_tokens", model._n_vocab):
            tokens.push_back(t)
        g = mullama_grammar_lazy(model.vocab, src, patterns, tokens, &err)
        if g == NULL and not err.empty():
            raise GrammarError(f"SamplerParams.grammar_triggers: {err.decode('utf-8', 'replace')}")
    else:
        g = llama_sampler_init_grammar(model.vocab, src, b"root")
    if g == NULL:
        # Only a grammar that names tokens gets here without having been checked (it needs
        # the vocabulary); the parser says what is wrong.
        mullama_check_grammar(src, &err)
        raise GrammarError(f"invalid grammar: {_grammar_reason(err, mark)}")
    if params.grammar_prefill and not params.grammar_lazy:
        if not mullama_grammar_prefill(g, model.vocab, params.grammar_prefill.encode("utf-8")):
            llama_sampler_free(g)
            raise GrammarError("SamplerParams.grammar_prefill: the grammar does not begin with this text")
    return g


cdef list _token_ids(object ids, str name, int n_vocab):
    out = list(ids)
    for t in out:
        if not 0 <= t < n_vocab:
            raise InvalidArgumentError(f"SamplerParams.{name}: token id {t} is outside the vocabulary [0, {n_vocab})")
    return out


cdef list _logit_bias(object params, int n_vocab):
    if not params.logit_bias:
        return []
    out = []
    for token, bias in params.logit_bias.items():
        if token >= n_vocab:
            raise InvalidArgumentError(
                f"SamplerParams.logit_bias: token id {token} is outside the vocabulary [0, {n_vocab})")
        out.append((token, bias))
    return out


cdef llama_sampler * _make_chain(object params, Model model, int n_ctx, list bias) except NULL:
    cdef llama_sampler_chain_params cp = llama_sampler_chain_default_params()
    cp.no_perf = True
    cdef llama_sampler * chain = llama_sampler_chain_init(cp)
    if chain == NULL:
        raise MemoryError("llama_sampler_chain_init failed")
    try:
        _fill_chain(chain, params, model, n_ctx, bias)
    except BaseException:
        llama_sampler_free(chain)
        raise
    return chain


cdef int _fill_chain(llama_sampler * chain, object params, Model model, int n_ctx, list bias) except -1:
    """llama.cpp's common sampler order: bias, penalties, DRY, top-n-sigma, top-k, typical,
    top-p, min-p, XTC, temperature, then the choice (greedy, distribution or Mirostat)."""
    cdef int n_vocab = model._n_vocab
    cdef uint32_t seed = <uint32_t> params.seed if params.seed != 0 else <uint32_t> LLAMA_DEFAULT_SEED
    cdef size_t min_keep = params.min_keep
    cdef vector[llama_logit_bias] lb
    cdef llama_logit_bias one
    if bias:
        for token, value in bias:
            one.token = token
            one.bias = value
            lb.push_back(one)
        llama_sampler_chain_add(chain, llama_sampler_init_logit_bias(n_vocab, <int32_t> lb.size(), lb.data()))
    if (params.penalty_repeat != 1.0 or params.penalty_freq != 0.0 or params.penalty_present != 0.0) \
            and params.penalty_last_n != 0:
        # llama.cpp allocates a window of penalty_last_n tokens: none can be older than n_ctx.
        llama_sampler_chain_add(chain, llama_sampler_init_penalties(
            n_vocab, min(params.penalty_last_n, n_ctx), params.penalty_repeat, params.penalty_freq, params.penalty_present))
    if params.dry_multiplier > 0:
        _add_dry(chain, params, model, n_ctx)
    if params.temperature == 0:
        llama_sampler_chain_add(chain, llama_sampler_init_greedy())
        return 0
    if params.mirostat:
        llama_sampler_chain_add(chain, llama_sampler_init_temp(params.temperature))
        if params.mirostat == 1:
            llama_sampler_chain_add(chain, llama_sampler_init_mirostat(
                n_vocab, seed, params.mirostat_tau, params.mirostat_eta, 100))
        else:
            llama_sampler_chain_add(chain, llama_sampler_init_mirostat_v2(seed, params.mirostat_tau, params.mirostat_eta))
        return 0
    if params.top_n_sigma > 0:
        llama_sampler_chain_add(chain, llama_sampler_init_top_n_sigma(params.top_n_sigma))
    if params.top_k > 0:
        llama_sampler_chain_add(chain, llama_sampler_init_top_k(params.top_k))
    if params.typical_p < 1.0:
        llama_sampler_chain_add(chain, llama_sampler_init_typical(params.typical_p, min_keep))
    if params.top_p < 1.0:
        llama_sampler_chain_add(chain, llama_sampler_init_top_p(params.top_p, min_keep))
    if params.min_p > 0.0:
        llama_sampler_chain_add(chain, llama_sampler_init_min_p(params.min_p, min_keep))
    if params.xtc_probability > 0:
        llama_sampler_chain_add(chain, llama_sampler_init_xtc(params.xtc_probability, params.xtc_threshold,
                                                              min_keep, seed))
    llama_sampler_chain_add(chain, llama_sampler_init_temp(params.temperature))
    llama_sampler_chain_add(chain, llama_sampler_init_dist(seed))
    return 0


cdef int _add_dry(llama_sampler * chain, object params, Model model, int n_ctx) except -1:
    breakers = [b.encode("utf-8") for b in _strings(params.dry_sequence_breakers, "dry_sequence_breakers")]
    cdef vector[const char *] ptrs
    for b in breakers:
        ptrs.push_back(<const char *> b)
    cdef int last_n = n_ctx if params.dry_penalty_last_n == -1 else min(params.dry_penalty_last_n, n_ctx)
    llama_sampler_chain_add(chain, llama_sampler_init_dry(
        model.vocab, params.dry_multiplier, params.dry_base, params.dry_allowed_length, last_n,
        ptrs.data(), ptrs.size()))
    return 0


# -- results -----------------------------------------------------------------------------------

cdef int _collect(Model model, mullama_controls * c, list tokens, list logprobs) except -1:
    """Append to tokens (and logprobs, unless None) the records of the tokens generated since
    the last call: a stream's or an engine request's lists, read by their consumer."""
    cdef size_t start = len(tokens)
    if c.tokens.size() > start:
        tokens.extend(_new_tokens(c, start))
        if logprobs is not None:
            logprobs.extend(_new_logprobs(model, c, start))
    return 0


cdef list _new_tokens(mullama_controls * c, size_t start):
    return [c.tokens[i] for i in range(start, c.tokens.size())]


cdef list _new_logprobs(Model model, mullama_controls * c, size_t start):
    """Python records of the log-probabilities of tokens start.. (empty unless asked for)."""
    cdef size_t i
    cdef int j
    out = []
    for i in range(start, c.infos.size()):
        info = &c.infos[i]
        top = tuple(_top(model, info.top[j].token, info.top[j].logprob) for j in range(info.n_top))
        raw = _piece_bytes(model, info.token)
        out.append(TokenLogprob(info.token, raw.decode("utf-8", "replace"), raw, info.logprob, top))
    return out


cdef object _top(Model model, llama_token token, float logprob):
    raw = _piece_bytes(model, token)
    return TopLogprob(token, raw.decode("utf-8", "replace"), raw, logprob)


cdef bytes _piece_bytes(Model model, llama_token token):
    cdef string s
    mullama_append_piece(model.vocab, token, s)
    return s
