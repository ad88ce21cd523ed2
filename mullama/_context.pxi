# Context: one llama_context, its KV cache bookkeeping, and the nogil generation loop.

# Why a generation ended.
cdef enum Finish:
    FINISH_NONE = 0
    FINISH_STOP = 1       # an end-of-generation token
    FINISH_LENGTH = 2     # max_tokens reached
    FINISH_CONTEXT = 3    # the context is full
    FINISH_NO_LOGITS = 4  # the model computed no logits to sample from (an error, not a reason)
    FINISH_GRAMMAR = 5    # the grammar allows no further token
    FINISH_NAN = 6        # the model computed NaN logits (an error, not a reason)

_FINISH_NAMES = {FINISH_NONE: None, FINISH_STOP: "stop", FINISH_LENGTH: "length", FINISH_CONTEXT: "context",
                 FINISH_GRAMMAR: "grammar"}

# What one _gen_step did, in numbers of its own.
cdef enum Step:
    STEP_TOKEN = 1000     # a token was generated
    STEP_DONE = 1001      # the generation ended; Gen.finish says why
    STEP_NO_LOGITS = 1002 # the model computed no logits to sample from
    STEP_DECODE = 1003    # the decode did not succeed; Gen.decoded says how
    STEP_NAN = 1004       # the model computed NaN logits


cdef struct Gen:
    NativeState * st
    const llama_vocab * vocab
    mullama_controls * ctl        # sampler, grammar, stop strings; the generated text (ctl.text)
    vector[llama_token] * hist    # tokens whose keys/values are in the cache, in order
    int n_ctx
    int max_tokens
    int n_generated
    llama_token pending           # sampled and delivered, not yet decoded (-1: none)
    int finish
    Decoded decoded               # how the decode that stopped the loop went


cdef Decoded _decode_chunk(Gen * g, const llama_token * toks, int n, bint last_logits,
                           bint all_outputs) noexcept nogil:
    """Decode n tokens at the end of the sequence 0 cache; on success append them to hist.
    On failure the cache is trimmed back to hist, so hist and the cache always agree."""
    cdef int i
    cdef int pos0 = <int> g.hist.size()
    cdef Decoded d
    for i in range(n):
        _batch_put(g.st, i, toks[i], pos0 + i, 0, all_outputs or (last_logits and i == n - 1))
    d = _native_decode(g.st, n)
    if d != DECODED:
        _seq_rm(g.st, 0, pos0, -1)
        return d
    for i in range(n):
        g.hist.push_back(toks[i])
    return DECODED


cdef Decoded _decode_prompt(Gen * g, const llama_token * toks, int n, int n_batch, bint all_outputs) noexcept nogil:
    """Decode the new part of a prompt in chunks of n_batch; logits for its last token."""
    cdef int start = 0
    cdef int chunk
    cdef Decoded d
    while start < n:
        chunk = n - start if n - start < n_batch else n_batch
        d = _decode_chunk(g, toks + start, chunk, start + chunk == n, all_outputs)
        if d != DECODED:
            return d
        start += chunk
    return DECODED


cdef Step _gen_step(Gen * g) noexcept nogil:
    """One token: decode the pending token, choose the next, append its text to g.ctl.text."""
    cdef llama_token tok
    cdef Choice chosen
    if _poll_interrupt(&g.st.interrupt):
        g.decoded = DECODE_ABORTED
        return STEP_DECODE
    if g.n_generated >= g.max_tokens:
        g.finish = FINISH_LENGTH
        return STEP_DONE
    if g.pending >= 0:
        if <int> g.hist.size() >= g.n_ctx:
            g.finish = FINISH_CONTEXT
            return STEP_DONE
        tok = g.pending
        g.decoded = _decode_chunk(g, &tok, 1, True, False)
        if g.decoded != DECODED:
            return STEP_DECODE
        g.pending = -1
    chosen = _choose(g.ctl, g.st.ctx, -1, &tok)
    if chosen == CHOICE_NO_LOGITS:
        return STEP_NO_LOGITS
    if chosen == CHOICE_NAN:
        return STEP_NAN
    if chosen == CHOICE_NONE:
        g.finish = FINISH_GRAMMAR
        return STEP_DONE
    if llama_vocab_is_eog(g.vocab, tok):
        g.finish = FINISH_STOP
        return STEP_DONE
    g.n_generated += 1
    if mullama_take(g.ctl, g.vocab, tok):   # a stop string: the text is cut before it
        g.finish = FINISH_STOP
        return STEP_DONE
    g.pending = tok
    return STEP_TOKEN


@cython.no_gc_clear   # the streams and native state it owns are freed by their owners
cdef class Context:
    """A llama.cpp context: a KV cache of ``n_ctx`` tokens over a :class:`Model`.

    ``generate`` reuses whatever the cache holds that is a token prefix of the new prompt,
    so a chat that resends its growing history only decodes the new turn.

    ``n_ctx=0`` takes the model's training context (a larger one raises ContextOverflowError
    unless RoPE scaling is set on purpose); ``n_threads=0`` the cores this process may use;
    ``flash_attn`` None keeps llama.cpp's choice (auto), True/False force it.

    >>> ctx = Context(model, n_ctx=2048)                              # doctest: +SKIP
    >>> ctx.generate("The capital of France is", max_tokens=8)        # doctest: +SKIP
    """

    cdef _NativeContext core          # owns the llama_context, batch and interrupt
    cdef readonly Model model        # keeps the model (and its vocabulary) alive
    cdef vector[llama_token] hist
    cdef object _lock                # one call (or open stream) at a time
    cdef object _owner               # the thread whose stream holds _lock
    cdef readonly int last_reused_tokens
    cdef readonly int last_evaluated_tokens
    cdef readonly object last_finish_reason
    cdef readonly long long total_evaluated_tokens

    def __init__(self, Model model not None, *, n_ctx=0, n_batch=2048, n_threads=0, embeddings=False,
                 n_seq_max=1, flash_attn=None, rope_scaling=None, rope_freq_base=None, rope_freq_scale=None,
                 yarn_ext_factor=None, yarn_attn_factor=None, yarn_beta_fast=None, yarn_beta_slow=None,
                 yarn_orig_ctx=None, adapters=None):
        applied = _check_adapters(model, adapters)
        rope = dict(rope_scaling=rope_scaling, rope_freq_base=rope_freq_base, rope_freq_scale=rope_freq_scale,
                    yarn_ext_factor=yarn_ext_factor, yarn_attn_factor=yarn_attn_factor,
                    yarn_beta_fast=yarn_beta_fast, yarn_beta_slow=yarn_beta_slow, yarn_orig_ctx=yarn_orig_ctx)
        self.core = _NativeContext.open(model, n_ctx, n_batch, n_threads, bool(embeddings), n_seq_max, flash_attn,
                                       rope, None)
        self.core.set_adapters(applied)
        self.model = model
        self._lock = threading.Lock()
        self._owner = None
        self.last_reused_tokens = 0
        self.last_evaluated_tokens = 0
        self.total_evaluated_tokens = 0
        self.last_finish_reason = None

    def close(self):
        """Free the context now (idempotent). A generation running in another thread is
        cancelled first; a stream another thread keeps open makes this raise ContextBusyError."""
        if self.core is None or self.core.st.ctx == NULL:
            return
        if self._owner is threading.current_thread():
            raise ContextBusyError("close the open generate_stream of this Context before closing it")
        if not self._lock.acquire(blocking=False):
            self.core.cancel_running()
            if not self._lock.acquire(timeout=5.0):
                raise ContextBusyError(
                    "another thread keeps a generate_stream of this Context open; close that stream first"
                )
        try:
            self.core.free()
            self.hist.clear()
        finally:
            self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def closed(self):
        return self.core is None or self.core.st.ctx == NULL

    @property
    def n_ctx(self):
        """Tokens the cache can hold."""
        return self._core().n_ctx

    @property
    def n_batch(self):
        """Most tokens decoded in one llama_decode call."""
        return self._core().n_batch

    @property
    def n_threads(self):
        return self._core().n_threads

    @property
    def n_past(self):
        """Tokens currently held in the cache."""
        return <int> self.hist.size()

    @property
    def cached_tokens(self):
        """The token ids currently held in the cache, in order."""
        return [self.hist[i] for i in range(self.hist.size())]

    @property
    def busy(self):
        """True while a generation or an open stream owns this context."""
        return self._lock.locked()

    def cancel(self):
        """Stop the generation running on this context (from any thread) within one token.

        It covers every generation already started: the one running, an open stream between
        two pieces, and calls still waiting for the context; later calls are not affected."""
        self._core().cancel()

    cdef _NativeContext _core(self):
        if self.core is None:    # Context.__new__ without __init__
            raise ClosedError("this Context was never opened")
        return self.core

    cdef int _check(self) except -1:
        return self._core().check()

    # -- locking -----------------------------------------------------------------------------

    cdef int _enter(self, long long ticket) except -1:
        self._check()
        if self._owner is threading.current_thread():
            raise ContextBusyError(
                "a generate_stream on this Context is still open in this thread; "
                "exhaust it or call its close() before starting another generation"
            )
        self._lock.acquire()
        if self.core.st.ctx == NULL:
            self._lock.release()
            raise ClosedError("this Context was closed while waiting for it")
        self.core.arm(ticket)
        return 0

    cdef void _leave(self):
        self._owner = None
        self._lock.release()

    # -- prompt handling ---------------------------------------------------------------------

    cdef int _prepare(self, vector[llama_token] & toks) except -1:
        """Keep the cached prefix shared with toks, drop the rest, decode what is new."""
        cdef int n = <int> toks.size()
        self._check_fits(n)
        cdef int keep = 0
        cdef int limit = min(<int> self.hist.size(), n - 1)   # the last token is decoded for its logits
        while keep < limit and self.hist[keep] == toks[keep]:
            keep += 1
        if keep < <int> self.hist.size():
            keep = self.core.keep_prefix(0, keep)
            self.hist.resize(keep)
        cdef Gen g
        self._init_gen(&g, NULL, 0)
        cdef Decoded d
        cdef bint all_out = self.core.embeddings and self.core.pooling != LLAMA_POOLING_TYPE_NONE
        with nogil:
            d = _decode_prompt(&g, toks.data() + keep, n - keep, self.core.n_batch, all_out)
        self.last_reused_tokens = keep
        self.last_evaluated_tokens = <int> self.hist.size() - keep
        self.total_evaluated_tokens += self.last_evaluated_tokens
        if d == DECODE_ABORTED:
            self.last_finish_reason = "cancelled"
        self.core.raise_for(d, f"decoding a prompt of {n} tokens")
        return 0

    cdef int _check_fits(self, size_t n) except -1:
        if n == 0:
            raise InvalidArgumentError("prompt is empty; give at least one token of text")
        if n > <size_t> self.core.n_ctx:
            raise ContextOverflowError(
                f"prompt is {n} tokens but the context holds {self.core.n_ctx}; "
                "use a larger n_ctx or a shorter prompt"
            )
        return 0

    cdef void _init_gen(self, Gen * g, mullama_controls * ctl, int max_tokens):
        g.st = &self.core.st
        g.vocab = self.model.vocab
        g.ctl = ctl
        g.hist = &self.hist
        g.n_ctx = self.core.n_ctx
        g.max_tokens = max_tokens
        g.n_generated = 0
        g.pending = -1
        g.finish = FINISH_NONE
        g.decoded = DECODED

    # -- generation --------------------------------------------------------------------------

    def generate(self, prompt, max_tokens=100, params=None):
        """Complete ``prompt`` and return the new text only.

        Stops at an end-of-generation token or a stop string of ``params``, after ``max_tokens``
        tokens, or when the context is full (see ``last_finish_reason``). The whole loop runs
        without the GIL. :meth:`complete` returns the tokens, log-probabilities and usage too.
        """
        cdef vector[llama_token] toks
        self._check()
        cdef long long ticket = self.core.ticket()
        self.model._prompt_tokens(prompt, toks)
        return self._generate(toks, max_tokens, params, ticket, False)

    def generate_from_tokens(self, tokens, max_tokens=100, params=None):
        """Like :meth:`generate`, from token ids (checked against the vocabulary)."""
        cdef vector[llama_token] toks
        self._check()
        cdef long long ticket = self.core.ticket()
        self.model._tokens_to_vector(tokens, toks)
        return self._generate(toks, max_tokens, params, ticket, False)

    def complete(self, prompt, max_tokens=100, params=None):
        """Complete ``prompt`` (text, or a list of token ids) and return a :class:`Completion`:
        the text, its tokens, ``finish_reason``, log-probabilities (when ``params`` asks for
        them) and usage. A cancel ends it with ``finish_reason == "cancelled"`` and the text
        generated so far, instead of raising.

        >>> c = ctx.complete("Q: 2+2?\\nA:", 16, SamplerParams(stop=["\\n"], n_probs=3))  # doctest: +SKIP
        >>> c.text, c.finish_reason, c.logprobs[0].top[0].logprob                           # doctest: +SKIP
        """
        cdef vector[llama_token] toks
        self._check()
        cdef long long ticket = self.core.ticket()
        self.model._prompt_or_tokens(prompt, toks)
        return self._generate(toks, max_tokens, params, ticket, True)

    cdef object _generate(self, vector[llama_token] & toks, object max_tokens, object params, long long ticket,
                          bint full):
        _check_int(max_tokens, "max_tokens", 0, 1 << 30)
        cdef _Controls controls = _Controls.make(params, self.model, self.core.n_ctx)
        self._enter(ticket)
        try:
            return self._run(toks, max_tokens, controls.c, full)
        finally:
            self._leave()

    cdef object _run(self, vector[llama_token] & toks, int max_tokens, mullama_controls * ctl, bint full):
        cdef Gen g
        cdef Step rc = STEP_TOKEN
        self._init_gen(&g, ctl, max_tokens)
        try:
            self._prepare(toks)
            with nogil:
                while True:
                    rc = _gen_step(&g)
                    if rc != STEP_TOKEN:
                        break
            self._finish_gen(&g, rc)
        except GenerationCancelled:
            if not full:
                raise
        text = ctl.text.decode("utf-8", "replace")
        if not full:
            return text
        usage = Usage(<int> toks.size(), self.last_reused_tokens, self.last_evaluated_tokens, g.n_generated)
        logprobs = tuple(_new_logprobs(self.model, ctl, 0)) if ctl.want_logprobs else None
        return Completion(text, tuple(_new_tokens(ctl, 0)), self.last_finish_reason, logprobs, usage)

    cdef int _finish_gen(self, Gen * g, Step rc) except -1:
        self.last_finish_reason = _FINISH_NAMES.get(g.finish)
        if rc == STEP_NO_LOGITS:
            raise self.model._no_logits_error()
        if rc == STEP_NAN:
            raise self.model._nan_logits_error()
        if rc == STEP_DECODE:
            if g.decoded == DECODE_ABORTED:
                self.last_finish_reason = "cancelled"
            self.core.raise_for(g.decoded, "generation")
        return 0

    def generate_stream(self, prompt, max_tokens=100, params=None):
        """Complete ``prompt`` lazily: an iterator of text pieces, each produced as it is generated.

        Pieces never end inside a UTF-8 character. The stream owns the context until it is
        exhausted or closed; use it as a context manager (or call ``close()``) to stop early.
        Bad arguments raise here, before any iteration.

        >>> with ctx.generate_stream("Once upon a time") as stream:   # doctest: +SKIP
        ...     for piece in stream:
        ...         print(piece, end="")
        """
        cdef vector[llama_token] toks
        self._check()
        cdef long long ticket = self.core.ticket()
        self.model._prompt_tokens(prompt, toks)
        _check_int(max_tokens, "max_tokens", 0, 1 << 30)
        return TokenStream._start(self, toks, max_tokens, params, ticket)

    def stream(self, prompt, max_tokens=100, params=None):
        """The same as :meth:`generate_stream`, under the name the async API uses."""
        return self.generate_stream(prompt, max_tokens, params)

    def stream_from_tokens(self, tokens, max_tokens=100, params=None):
        """The same as :meth:`generate_stream_from_tokens`."""
        return self.generate_stream_from_tokens(tokens, max_tokens, params)

    def generate_stream_from_tokens(self, tokens, max_tokens=100, params=None):
        """Like :meth:`generate_stream`, from token ids."""
        cdef vector[llama_token] toks
        self._check()
        cdef long long ticket = self.core.ticket()
        self.model._tokens_to_vector(tokens, toks)
        _check_int(max_tokens, "max_tokens", 0, 1 << 30)
        return TokenStream._start(self, toks, max_tokens, params, ticket)

    def clear_cache(self):
        """Forget everything the context holds; the next prompt is decoded from scratch."""
        self._check()
        self._enter(self.core.ticket())
        try:
            self.core.clear()
            self.hist.clear()
        finally:
            self._leave()

    # -- adapters ----------------------------------------------------------------------------

    @property
    def adapters(self):
        """The (LoraAdapter, scale) pairs this context computes with."""
        return self._core().adapters

    def set_adapters(self, adapters):
        """Compute with these (LoraAdapter, scale) pairs from now on (``[]``: the base model).

        A change empties the cache: what it holds was computed with the old adapters."""
        self._check()
        applied = _check_adapters(self.model, adapters)
        self._enter(self.core.ticket())
        try:
            if [(id(a), s) for a, s in applied] != [(id(a), s) for a, s in self.core.adapters]:
                self.core.set_adapters(applied)
                self.core.clear()
                self.hist.clear()
        finally:
            self._leave()

    # -- saved state -------------------------------------------------------------------------

    def get_state(self):
        """The cache and its tokens as bytes, for :meth:`set_state` on a Context of the same
        model file, ``n_ctx`` and ``n_seq_max``, in this process or another (or for an Engine
        request's ``state``, when ``n_seq_max`` is its ``n_parallel`` and ``n_ctx`` its
        ``n_ctx``). Adapters are not saved: apply the same ones before loading.

        >>> data = ctx.get_state()           # doctest: +SKIP
        >>> other.set_state(data)            # doctest: +SKIP
        """
        self._check()
        self._check_has_cache()
        self._enter(self.core.ticket())
        try:
            blob = self.core.seq_state(0)
            return _state.pack(self.model, *self.core.state_layout(), self.cached_tokens, blob)
        finally:
            self._leave()

    def set_state(self, data):
        """Replace what the context holds with a state from :meth:`get_state`; the next prompt
        that starts with its tokens decodes only what follows them.

        StateError for a state of another model, ``n_ctx`` or ``n_seq_max``, or a truncated or
        corrupted one; the context is left as it was (unless llama.cpp itself refuses the
        cache, which leaves it empty)."""
        self._restore(data, "the state")

    def save_state(self, path):
        """Write :meth:`get_state` to ``path`` (atomically: a crash leaves any old file whole)."""
        _state.write_file(path, self.get_state())

    def load_state(self, path):
        """Load a state written by :meth:`save_state` (see :meth:`set_state`)."""
        self._restore(_state.read_file(path), f"state file {os.fspath(path)!r}")

    cdef int _check_has_cache(self) except -1:
        if not self.core.has_memory():
            raise InvalidArgumentError(f"model {self.model.path!r} keeps no cache between calls: no state to save")
        return 0

    cdef int _restore(self, object data, str what) except -1:
        self._check()
        self._check_has_cache()
        saved = _state.load(data, self.model, *self.core.state_layout(), what)
        cdef vector[llama_token] toks
        cdef SeqRestore restored
        self.model._tokens_to_vector(saved.tokens, toks)
        self._enter(self.core.ticket())
        try:
            self.hist.clear()
            restored = self.core.set_seq_state(0, saved.blob, <int> toks.size())
            if restored == SEQ_STUCK:
                self.core.clear()   # sequence 0 is the context's only one
            if restored != SEQ_RESTORED:
                raise StateError(f"{what} could not be loaded into this context: llama.cpp refused its "
                                 "cache (another cache type or layout?), or its cells are not at the positions "
                                 "of its tokens")
            self.hist = toks
        finally:
            self._leave()
        return 0

    def get_logits(self):
        """The raw logits of the last decoded token (one per vocabulary entry, float32 numpy
        array), as the model computed them: decode a prompt with ``generate(prompt,
        max_tokens=0)`` first. A generation that sampled from them leaves none to read."""
        import numpy as np
        self._check()
        cdef float * row
        self._enter(self.core.ticket())
        try:
            row = llama_get_logits_ith(self.core.st.ctx, -1) if self.hist.size() else NULL
            if self.core.embeddings or llama_get_memory(self.core.st.ctx) == NULL or not mullama_logits_fresh(row):
                raise InvalidArgumentError(
                    "no logits to read: decode a prompt with generate(prompt, max_tokens=0) first "
                    "(a generation consumes the logits it samples from)")
            n = self.model._n_vocab
            return np.asarray(<float[:n]> row).copy()
        finally:
            self._leave()

    def get_embeddings(self):
        """The embedding of the last decoded prompt (pooled if the model pools, else the last
        token's), as a float32 numpy array. Needs ``embeddings=True``; decode a prompt first,
        for example with ``generate(prompt, max_tokens=0)``."""
        import numpy as np
        self._check()
        if not self.core.embeddings:
            raise EmbeddingsDisabledError(
                "this Context was created without embeddings=True; create it with "
                "Context(model, embeddings=True) or use EmbeddingGenerator"
            )
        cdef const float * e
        self._enter(self.core.ticket())
        try:
            if self.hist.size() == 0:
                raise InvalidArgumentError("nothing has been decoded yet; call generate(prompt, max_tokens=0) first")
            if self.core.pooling != LLAMA_POOLING_TYPE_NONE:
                e = llama_get_embeddings_seq(self.core.st.ctx, 0)
            else:
                e = llama_get_embeddings_ith(self.core.st.ctx, -1)
            if e == NULL:
                raise InvalidArgumentError("no embeddings are available for the last decode")
            n = llama_model_n_embd_out(self.model.ptr)
            return np.asarray(<float[:n]> e).copy()
        finally:
            self._leave()


@cython.no_gc_clear   # __dealloc__ hands the context back: its ctx must still be there
cdef class TokenStream:
    """Text pieces of one generation, produced lazily. Returned by ``Context.generate_stream``.

    One thread iterates it at a time (a second concurrent ``next()`` raises ContextBusyError,
    as a generator raises "already executing"); ``close()`` and ``cancel()`` may come from any
    thread.
    """

    cdef Context ctx                 # keeps the context (and its model) alive
    cdef _Controls controls          # sampler, grammar, stop strings and the text not yet handed out
    cdef Gen g
    cdef list _tokens                # generated so far
    cdef list _logprobs              # their log-probabilities, None unless asked for
    cdef int _reused                 # prompt tokens found in the cache
    cdef int _evaluated              # prompt tokens decoded
    cdef vector[llama_token] prompt
    cdef long long ticket            # the context's number for this generation
    cdef bint started
    cdef bint done
    cdef bint cancel_requested
    cdef bint closing
    cdef object _running             # held by the thread inside next()
    cdef long _runner                # that thread's ident, 0 when none
    cdef readonly object finish_reason

    def __cinit__(self):
        self.done = True
        self._runner = 0

    @staticmethod
    cdef TokenStream _start(Context ctx, vector[llama_token] & toks, int max_tokens, object params,
                            long long ticket):
        ctx._check_fits(toks.size())   # bad prompts raise here, not at the first next()
        cdef TokenStream s = TokenStream.__new__(TokenStream)
        s._running = threading.Lock()
        s.controls = _Controls.make(params, ctx.model, ctx.core.n_ctx)
        s._tokens = []
        s._reused = 0
        s._evaluated = 0
        s._logprobs = [] if s.controls.c.want_logprobs else None
        s.ctx = ctx
        s.prompt = toks
        s.ticket = ticket
        s.started = False
        s.cancel_requested = False
        s.closing = False
        ctx._init_gen(&s.g, s.controls.c, max_tokens)
        s.done = False
        return s

    @property
    def prompt_tokens(self):
        return <int> self.prompt.size()

    @property
    def completion_tokens(self):
        """Tokens generated so far."""
        return self.g.n_generated

    @property
    def tokens(self):
        """The ids of the tokens generated so far (a stop string's tokens included)."""
        return list(self._tokens)

    @property
    def logprobs(self):
        """A :class:`TokenLogprob` per generated token so far, or None unless
        ``SamplerParams.logprobs`` or ``n_probs`` asked for them. Records can run ahead of the
        text: a piece that might begin a stop string is held back until it cannot."""
        return None if self._logprobs is None else list(self._logprobs)

    @property
    def usage(self):
        """Token counts so far, as a :class:`Usage`."""
        return Usage(<int> self.prompt.size(), self._reused, self._evaluated, self.g.n_generated)

    def read(self):
        """The rest of the text, once the generation has ended."""
        return "".join(self)

    def __iter__(self):
        return self

    def __next__(self):
        if self.done:
            raise StopIteration
        if not self._running.acquire(False):
            if self.closing:
                raise StopIteration
            raise ContextBusyError(
                "this stream is already being iterated by another thread; "
                "a stream has one consumer at a time"
            )
        self._runner = threading.get_ident()
        try:
            if self.done:
                raise StopIteration
            return self._next_piece()
        finally:
            self._runner = 0
            self._running.release()

    cdef str _next_piece(self):
        cdef Step rc = STEP_TOKEN
        cdef size_t n
        if not self.started:
            self._begin()
        else:
            self.ctx._owner = threading.current_thread()
            self.ctx.core.arm_for_thread()
        with nogil:
            while True:
                rc = _gen_step(&self.g)
                if rc != STEP_TOKEN:
                    break
                n = mullama_ready(self.g.ctl)
                if n > 0:
                    break
        _collect(self.ctx.model, self.g.ctl, self._tokens, self._logprobs)
        if rc == STEP_TOKEN:
            piece = self.g.ctl.text.substr(0, n).decode("utf-8", "replace")
            self.g.ctl.text.erase(0, n)
            return piece
        return self._last_piece(rc)

    cdef int _begin(self) except -1:
        """Claim the context at the first next(), not at creation: an unused stream holds nothing."""
        self.ctx._enter(self.ticket)
        self.ctx._owner = threading.current_thread()
        self.started = True
        if self.cancel_requested:  # cancel() came before the context was ours
            self.ctx.core.cancel_running()
        try:
            self.ctx._prepare(self.prompt)
            self._reused = self.ctx.last_reused_tokens
            self._evaluated = self.ctx.last_evaluated_tokens
        except GenerationCancelled:
            self.finish_reason = "cancelled"
            self._end()
            if self.closing:
                raise StopIteration
            raise
        except BaseException:
            self._end()
            raise
        return 0

    cdef str _last_piece(self, Step rc):
        """The end of the loop: the text still held back, or StopIteration, or the error."""
        try:
            self.ctx._finish_gen(&self.g, rc)
        except GenerationCancelled:
            self.finish_reason = "cancelled"
            self._end()
            if self.closing:       # close() from another thread: end quietly
                raise StopIteration
            raise
        except BaseException:
            self._end()
            raise
        self.finish_reason = self.ctx.last_finish_reason
        rest = self.g.ctl.text.decode("utf-8", "replace")
        self.g.ctl.text.clear()
        self._end()
        if rest:
            return rest
        raise StopIteration

    cdef void _end(self):
        if self.done:
            return
        self.done = True
        if self.started:
            self.ctx._leave()

    def close(self):
        """Stop the generation and release the context (idempotent). From another thread it
        asks the iterating thread to stop and returns once that thread has let go."""
        if self.done:
            return
        self.closing = True
        if self._runner == threading.get_ident():
            # Called inside our own next() (a signal handler): that next() ends the stream.
            self.cancel()
            return
        self.cancel()
        with self._running:        # waits (without the GIL) for a next() in another thread
            self._end()

    def cancel(self):
        """Make the native loop stop within one token, from any thread; the iterator then
        raises GenerationCancelled. Also stops the prompt of a stream still reading it."""
        if self.done:
            return
        self.cancel_requested = True
        if self.started:
            self.ctx.core.cancel_running()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __dealloc__(self):
        # Nothing can be iterating: that thread would hold a reference. ctx is still set
        # (no_gc_clear), so a stream collected open hands its context back cleanly.
        if self.started and not self.done:
            self.done = True
            self.ctx._leave()
