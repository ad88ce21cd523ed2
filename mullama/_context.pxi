# Context: one llama_context, its KV cache bookkeeping, and the nogil generation loop.

# Why a generation ended.
cdef enum Finish:
    FINISH_NONE = 0
    FINISH_STOP = 1       # an end-of-generation token
    FINISH_LENGTH = 2     # max_tokens reached
    FINISH_CONTEXT = 3    # the context is full
    FINISH_NO_LOGITS = 4  # the model computed no logits to sample from (an error, not a reason)

_FINISH_NAMES = {FINISH_NONE: None, FINISH_STOP: "stop", FINISH_LENGTH: "length", FINISH_CONTEXT: "context"}

# What one _gen_step did. Numbered apart from llama_decode's results, which travel in Gen.error.
cdef enum Step:
    STEP_TOKEN = 1000     # a token was generated
    STEP_DONE = 1001      # the generation ended; Gen.finish says why
    STEP_ABORTED = 1002   # cancel() or a signal stopped it
    STEP_NO_LOGITS = 1003 # the model computed no logits to sample from
    STEP_FAILED = 1004    # llama_decode failed with Gen.error


cdef struct Gen:
    llama_context * ctx
    const llama_vocab * vocab
    llama_sampler * smpl
    llama_batch * batch
    vector[llama_token] * hist    # tokens whose keys/values are in the cache, in order
    Interrupt * interrupt
    int n_ctx
    int max_tokens
    int n_generated
    llama_token pending           # sampled and delivered, not yet decoded (-1: none)
    int finish
    int error                     # the llama_decode result that stopped the loop
    string * out                  # UTF-8 bytes produced and not yet handed to Python
    const mullama_file_guard * guard


cdef int _decode_chunk(llama_context * ctx, llama_batch * batch, vector[llama_token] * hist,
                       const llama_token * toks, int n, bint last_logits, bint all_outputs,
                       const mullama_file_guard * guard) noexcept nogil:
    """Decode n tokens at the end of the sequence 0 cache; on success append them to hist.
    On failure the cache is trimmed back to hist, so hist and the cache always agree."""
    cdef int i
    cdef int pos0 = <int> hist.size()
    cdef int rc
    batch.n_tokens = n
    for i in range(n):
        batch.token[i] = toks[i]
        batch.pos[i] = pos0 + i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = all_outputs
    if last_logits:
        batch.logits[n - 1] = 1
    rc = _decode(ctx, batch, guard)
    if rc != 0:
        llama_memory_seq_rm(llama_get_memory(ctx), 0, pos0, -1)
        return rc
    for i in range(n):
        hist.push_back(toks[i])
    return 0


cdef int _decode_prompt(Gen * g, const llama_token * toks, int n, int n_batch, bint all_outputs) noexcept nogil:
    """Decode the new part of a prompt in chunks of n_batch; logits for its last token."""
    cdef int start = 0
    cdef int chunk, rc
    while start < n:
        chunk = n - start if n - start < n_batch else n_batch
        rc = _decode_chunk(g.ctx, g.batch, g.hist, toks + start, chunk, start + chunk == n, all_outputs,
                           g.guard)
        if rc != 0:
            return rc
        start += chunk
    return 0


cdef Step _gen_step(Gen * g) noexcept nogil:
    """One token: decode the pending token, sample the next, append its text to g.out."""
    cdef llama_token tok
    cdef int rc
    if _poll_interrupt(g.interrupt):
        return STEP_ABORTED
    if g.n_generated >= g.max_tokens:
        g.finish = FINISH_LENGTH
        return STEP_DONE
    if g.pending >= 0:
        if <int> g.hist.size() >= g.n_ctx:
            g.finish = FINISH_CONTEXT
            return STEP_DONE
        tok = g.pending
        rc = _decode_chunk(g.ctx, g.batch, g.hist, &tok, 1, True, False, g.guard)
        if rc == RC_DECODE_ABORTED:
            return STEP_ABORTED
        if rc != 0:
            g.error = rc
            return STEP_FAILED
        g.pending = -1
    if not _sample(g.smpl, g.ctx, -1, &tok):
        return STEP_NO_LOGITS
    if llama_vocab_is_eog(g.vocab, tok):
        g.finish = FINISH_STOP
        return STEP_DONE
    _append_piece(g.vocab, tok, g.out)
    g.pending = tok
    g.n_generated += 1
    return STEP_TOKEN


_ROPE_SCALING = {"none": LLAMA_ROPE_SCALING_TYPE_NONE, "linear": LLAMA_ROPE_SCALING_TYPE_LINEAR,
                 "yarn": LLAMA_ROPE_SCALING_TYPE_YARN, "longrope": LLAMA_ROPE_SCALING_TYPE_LONGROPE}


cdef int _set_rope(llama_context_params * p, dict rope) except -1:
    """RoPE scaling settings (each None = the model's own) into p, checked by name."""
    for name, value in rope.items():
        if name == "rope_scaling":
            if value not in _ROPE_SCALING:
                raise InvalidArgumentError(f"rope_scaling={value!r} must be one of {sorted(_ROPE_SCALING)} or None")
            p.rope_scaling_type = <llama_rope_scaling_type> <int> _ROPE_SCALING[value]
        elif name == "yarn_orig_ctx":
            p.yarn_orig_ctx = _check_int(value, name, 0, 1 << 24)
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or (value <= 0 and name in ("rope_freq_base", "rope_freq_scale")):
                raise InvalidArgumentError(f"{name}={value!r} must be a finite number (> 0 for rope_freq_*)")
            if name == "rope_freq_base":
                p.rope_freq_base = value
            elif name == "rope_freq_scale":
                p.rope_freq_scale = value
            elif name == "yarn_ext_factor":
                p.yarn_ext_factor = value
            elif name == "yarn_attn_factor":
                p.yarn_attn_factor = value
            elif name == "yarn_beta_fast":
                p.yarn_beta_fast = value
            else:
                p.yarn_beta_slow = value
    return 0


cdef int _check_fits_training(Model model, long per_seq, bint rope_set) except -1:
    """A sequence longer than the model was trained on gives garbage unless RoPE is scaled on
    purpose (the original docs' "Context too large" error)."""
    cdef long train = model.n_ctx_train
    if per_seq > train and not rope_set:
        raise ContextOverflowError(
            f"a context of {per_seq} tokens per sequence is larger than the {train} tokens model "
            f"{model.path!r} was trained with; reduce n_ctx to within n_ctx_train, or extend the "
            "context on purpose with rope_scaling / rope_freq_scale (and the yarn_* settings)"
        )
    return 0


@cython.no_gc_clear   # __dealloc__ releases the model: the cycle collector must not clear it first
cdef class Context:
    """A llama.cpp context: a KV cache of ``n_ctx`` tokens over a :class:`Model`.

    ``generate`` reuses whatever the cache holds that is a token prefix of the new prompt,
    so a chat that resends its growing history only decodes the new turn.

    ``n_ctx=0`` takes the model's training context; ``n_threads=0`` the cores this process may
    use; ``flash_attn`` None keeps llama.cpp's choice (auto), True/False force it.

    >>> ctx = Context(model, n_ctx=2048)                              # doctest: +SKIP
    >>> ctx.generate("The capital of France is", max_tokens=8)        # doctest: +SKIP
    """

    cdef llama_context * ptr
    cdef readonly Model model        # keeps the model (and its vocabulary) alive
    cdef llama_batch batch
    cdef bint batch_ready
    cdef int _n_batch
    cdef int _n_ctx
    cdef int _n_threads
    cdef bint _embeddings
    cdef int _pooling
    cdef vector[llama_token] hist
    cdef Interrupt interrupt
    cdef object _lock                # one call (or open stream) at a time
    cdef object _owner               # the thread whose stream holds _lock
    cdef long long _calls            # generations started so far (each takes the next number)
    cdef long long _cancel_upto      # cancel() covers the generations numbered up to this
    cdef readonly int last_reused_tokens
    cdef readonly int last_evaluated_tokens
    cdef readonly object last_finish_reason
    cdef readonly long long total_evaluated_tokens

    def __cinit__(self):
        self.ptr = NULL
        self.batch_ready = False

    def __init__(self, Model model not None, *, n_ctx=0, n_batch=2048, n_threads=0, embeddings=False,
                 n_seq_max=1, flash_attn=None, rope_scaling=None, rope_freq_base=None, rope_freq_scale=None,
                 yarn_ext_factor=None, yarn_attn_factor=None, yarn_beta_fast=None, yarn_beta_slow=None,
                 yarn_orig_ctx=None, _pooling=None):
        model._check()
        if model._vocab_only:
            raise InvalidArgumentError(
                f"model {model.path!r} was loaded with vocab_only=True: it has no weights to compute "
                "with, so it cannot have a Context; load it again without vocab_only"
            )
        _check_int(n_ctx, "n_ctx", 0, 1 << 24)
        if n_ctx == 0 and not 0 < model.n_ctx_train <= 1 << 24:
            raise ContextCreateError(
                f"n_ctx=0 takes the model's training context, {model.n_ctx_train} tokens, "
                f"outside the 1..{1 << 24} a Context can hold; pass n_ctx"
            )
        _check_int(n_batch, "n_batch", 1, 1 << 20)
        _check_int(n_threads, "n_threads", 0, 1024)
        _check_int(n_seq_max, "n_seq_max", 1, llama_max_parallel_sequences())
        cdef llama_context_params p = llama_context_default_params()
        rope = dict(rope_scaling=rope_scaling, rope_freq_base=rope_freq_base, rope_freq_scale=rope_freq_scale,
                    yarn_ext_factor=yarn_ext_factor, yarn_attn_factor=yarn_attn_factor,
                    yarn_beta_fast=yarn_beta_fast, yarn_beta_slow=yarn_beta_slow, yarn_orig_ctx=yarn_orig_ctx)
        _set_rope(&p, {k: v for k, v in rope.items() if v is not None})
        # Each sequence has n_ctx / n_seq_max cells, unless they share them (embeddings).
        _check_fits_training(model, n_ctx if embeddings else n_ctx // n_seq_max, any(v is not None for v in rope.values()))
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_seq_max = n_seq_max
        self._n_threads = n_threads or _default_threads()
        p.n_threads = self._n_threads
        p.n_threads_batch = self._n_threads
        p.embeddings = bool(embeddings)
        p.no_perf = True
        if flash_attn is not None:
            # llama.cpp's default (auto) turns it on for the CPU: faster on long prompts, slower
            # on batches of a few tokens (a chat's new turn); see BENCHMARKS.md.
            p.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else LLAMA_FLASH_ATTN_TYPE_DISABLED
        if embeddings:
            # Non-causal models must see a whole sequence in one micro-batch, and the texts of
            # one embedding batch share the cache cells instead of n_ctx / n_seq_max each.
            p.n_ubatch = n_batch
            p.kv_unified = True
        if _pooling is not None:
            p.pooling_type = <llama_pooling_type> <int> _pooling
        p.abort_callback = _abort_callback
        p.abort_callback_data = &self.interrupt
        _arm_interrupt(&self.interrupt, False)
        mark = _log_mark()
        cdef llama_context * ptr
        with nogil:
            ptr = llama_init_from_model(model.ptr, p)
        if ptr == NULL:
            why = _log_since(mark, logging.ERROR) or _log_since(mark)
            raise ContextCreateError(
                f"llama.cpp could not create a context with n_ctx={n_ctx}, n_batch={n_batch}: "
                + ("; ".join(why[-3:]) if why else "no reason was logged")
                + "; try a smaller n_ctx or n_batch"
            )
        self.ptr = ptr
        self.model = model
        model._acquire()
        cdef float * rows = llama_get_logits(ptr)
        if rows != NULL and not embeddings:
            for i in range(n_seq_max):
                mullama_logits_used(rows + <size_t> i * model._n_vocab)
        self._n_ctx = llama_n_ctx(ptr)
        self._n_batch = llama_n_batch(ptr)
        self._embeddings = bool(embeddings)
        self._pooling = <int> llama_get_pooling_type(ptr)
        self.batch = llama_batch_init(self._n_batch, 0, 1)
        self.batch_ready = True
        self._lock = threading.Lock()
        self._owner = None
        self._calls = 0
        self._cancel_upto = 0
        self.last_reused_tokens = 0
        self.last_evaluated_tokens = 0
        self.total_evaluated_tokens = 0
        self.last_finish_reason = None

    def close(self):
        """Free the context now (idempotent). A generation running in another thread is
        cancelled first; a stream another thread keeps open makes this raise ContextBusyError."""
        if self.ptr == NULL:
            return
        if self._owner is threading.current_thread():
            raise ContextBusyError("close the open generate_stream of this Context before closing it")
        if not self._lock.acquire(blocking=False):
            mullama_atomic_store(&self.interrupt.cancel, 1)
            if not self._lock.acquire(timeout=5.0):
                raise ContextBusyError(
                    "another thread keeps a generate_stream of this Context open; close that stream first"
                )
        try:
            self._free()
        finally:
            self._lock.release()

    cdef void _free(self):
        if self.ptr != NULL:
            llama_free(self.ptr)
            self.ptr = NULL
            self.hist.clear()
            self.model._release()
        if self.batch_ready:
            llama_batch_free(self.batch)
            self.batch_ready = False

    def __dealloc__(self):
        if self.ptr != NULL:
            llama_free(self.ptr)
            self.ptr = NULL
            if self.model is not None:
                self.model._release()
        if self.batch_ready:
            llama_batch_free(self.batch)
            self.batch_ready = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def closed(self):
        return self.ptr == NULL

    @property
    def n_ctx(self):
        """Tokens the cache can hold."""
        return self._n_ctx

    @property
    def n_batch(self):
        """Most tokens decoded in one llama_decode call."""
        return self._n_batch

    @property
    def n_threads(self):
        return self._n_threads

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
        if self.ptr != NULL:
            self._cancel_upto = self._calls
            mullama_atomic_store(&self.interrupt.cancel, 1)

    cdef long long _ticket(self):
        """Number a generation as it starts, so that a cancel() from then on covers it."""
        self._calls += 1
        return self._calls

    cdef void _arm_for_thread(self):
        """Ready signal polling for a native loop in the calling thread."""
        _arm_signals(&self.interrupt)

    cdef int _check(self) except -1:
        if self.ptr == NULL:
            raise ClosedError("this Context is closed")
        return 0

    # -- locking -----------------------------------------------------------------------------

    cdef int _enter(self, long long ticket) except -1:
        self._check()
        if self._owner is threading.current_thread():
            raise ContextBusyError(
                "a generate_stream on this Context is still open in this thread; "
                "exhaust it or call its close() before starting another generation"
            )
        self._lock.acquire()
        if self.ptr == NULL:
            self._lock.release()
            raise ClosedError("this Context was closed while waiting for it")
        _arm_interrupt(&self.interrupt, ticket <= self._cancel_upto)
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
            llama_memory_seq_rm(llama_get_memory(self.ptr), 0, keep, -1)
            self.hist.resize(keep)
        cdef Gen g
        self._init_gen(&g, NULL, 0)
        cdef int rc
        cdef bint all_out = self._embeddings and self._pooling != LLAMA_POOLING_TYPE_NONE
        with nogil:
            rc = _decode_prompt(&g, toks.data() + keep, n - keep, self._n_batch, all_out)
        self.last_reused_tokens = keep
        self.last_evaluated_tokens = <int> self.hist.size() - keep
        self.total_evaluated_tokens += self.last_evaluated_tokens
        if rc == RC_DECODE_ABORTED:
            self.last_finish_reason = "cancelled"
            _raise_interrupt(&self.interrupt)
            raise GenerationCancelled("prompt processing was aborted")
        if rc != 0:
            raise decode_error(rc, f"decoding a prompt of {n} tokens")
        return 0

    cdef int _check_fits(self, size_t n) except -1:
        if n == 0:
            raise InvalidArgumentError("prompt is empty; give at least one token of text")
        if n > <size_t> self._n_ctx:
            raise ContextOverflowError(
                f"prompt is {n} tokens but the context holds {self._n_ctx}; "
                "use a larger n_ctx or a shorter prompt"
            )
        return 0

    cdef void _init_gen(self, Gen * g, llama_sampler * smpl, int max_tokens):
        g.ctx = self.ptr
        g.vocab = self.model.vocab
        g.smpl = smpl
        g.batch = &self.batch
        g.hist = &self.hist
        g.interrupt = &self.interrupt
        g.n_ctx = self._n_ctx
        g.max_tokens = max_tokens
        g.n_generated = 0
        g.pending = -1
        g.finish = FINISH_NONE
        g.error = 0
        g.out = NULL
        g.guard = &self.model.guard

    cdef int _prompt_tokens(self, prompt, vector[llama_token] & toks) except -1:
        if not isinstance(prompt, str):
            raise InvalidArgumentError(f"prompt must be a str, got {type(prompt).__name__}")
        if not prompt:
            raise InvalidArgumentError("prompt is empty; give some text to complete")
        cdef list ids = self.model._tokenize_bytes(_utf8(prompt, "prompt"), True, True)
        toks.clear()
        for t in ids:
            toks.push_back(t)
        return 0

    # -- generation --------------------------------------------------------------------------

    def generate(self, prompt, max_tokens=100, params=None):
        """Complete ``prompt`` and return the new text only.

        Stops at an end-of-generation token, after ``max_tokens`` tokens, or when the context
        is full (see ``last_finish_reason``). The whole loop runs without the GIL.
        """
        cdef vector[llama_token] toks
        cdef long long ticket = self._ticket()
        self._check()
        self._prompt_tokens(prompt, toks)
        return self._generate(toks, max_tokens, params, ticket)

    def generate_from_tokens(self, tokens, max_tokens=100, params=None):
        """Like :meth:`generate`, from token ids (checked against the vocabulary)."""
        cdef vector[llama_token] toks
        cdef long long ticket = self._ticket()
        self._check()
        self.model._tokens_to_vector(tokens, toks)
        return self._generate(toks, max_tokens, params, ticket)

    cdef str _generate(self, vector[llama_token] & toks, object max_tokens, object params, long long ticket):
        _check_int(max_tokens, "max_tokens", 0, 1 << 30)
        cdef llama_sampler * smpl = _make_sampler(params, self.model._n_vocab, self._n_ctx)
        cdef string out
        cdef Gen g
        cdef Step rc = STEP_TOKEN
        self._enter(ticket)
        try:
            self._prepare(toks)
            self._init_gen(&g, smpl, max_tokens)
            g.out = &out
            with nogil:
                while True:
                    rc = _gen_step(&g)
                    if rc != STEP_TOKEN:
                        break
            self._finish_gen(&g, rc)
            return out.decode("utf-8", "replace")
        finally:
            llama_sampler_free(smpl)
            self._leave()

    cdef int _finish_gen(self, Gen * g, Step rc) except -1:
        self.last_finish_reason = _FINISH_NAMES.get(g.finish)
        if rc == STEP_ABORTED:
            self.last_finish_reason = "cancelled"
            _raise_interrupt(&self.interrupt)
            raise GenerationCancelled("generation was aborted")
        if rc == STEP_NO_LOGITS:
            raise self.model._no_logits_error()
        if rc == STEP_FAILED:
            raise decode_error(g.error, "decoding a generated token")
        return 0

    def generate_stream(self, prompt, max_tokens=100, params=None):
        """Complete ``prompt`` lazily: an iterator of text pieces, each produced as it is generated.

        Pieces never end inside a UTF-8 character. The stream owns the context until it is
        exhausted or closed; use it as a context manager (or call ``close()``) to stop early.

        >>> with ctx.generate_stream("Once upon a time") as stream:   # doctest: +SKIP
        ...     for piece in stream:
        ...         print(piece, end="")
        """
        cdef vector[llama_token] toks
        cdef long long ticket = self._ticket()
        self._check()
        self._prompt_tokens(prompt, toks)
        _check_int(max_tokens, "max_tokens", 0, 1 << 30)
        return TokenStream._start(self, toks, max_tokens, params, ticket)

    def generate_stream_from_tokens(self, tokens, max_tokens=100, params=None):
        """Like :meth:`generate_stream`, from token ids."""
        cdef vector[llama_token] toks
        cdef long long ticket = self._ticket()
        self._check()
        self.model._tokens_to_vector(tokens, toks)
        _check_int(max_tokens, "max_tokens", 0, 1 << 30)
        return TokenStream._start(self, toks, max_tokens, params, ticket)

    def clear_cache(self):
        """Forget everything the context holds; the next prompt is decoded from scratch."""
        self._enter(self._ticket())
        try:
            llama_memory_clear(llama_get_memory(self.ptr), True)
            self.hist.clear()
        finally:
            self._leave()

    def get_embeddings(self):
        """The embedding of the last decoded prompt (pooled if the model pools, else the last
        token's), as a float32 numpy array. Needs ``embeddings=True``; decode a prompt first,
        for example with ``generate(prompt, max_tokens=0)``."""
        import numpy as np
        self._check()
        if not self._embeddings:
            raise EmbeddingsDisabledError(
                "this Context was created without embeddings=True; create it with "
                "Context(model, embeddings=True) or use EmbeddingGenerator"
            )
        cdef const float * e
        self._enter(self._ticket())
        try:
            if self.hist.size() == 0:
                raise InvalidArgumentError("nothing has been decoded yet; call generate(prompt, max_tokens=0) first")
            if self._pooling != LLAMA_POOLING_TYPE_NONE:
                e = llama_get_embeddings_seq(self.ptr, 0)
            else:
                e = llama_get_embeddings_ith(self.ptr, -1)
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
    cdef llama_sampler * smpl
    cdef Gen g
    cdef string out
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
        self.smpl = NULL
        self.done = True
        self._runner = 0

    @staticmethod
    cdef TokenStream _start(Context ctx, vector[llama_token] & toks, int max_tokens, object params,
                            long long ticket):
        ctx._check_fits(toks.size())   # bad prompts raise here, not at the first next()
        cdef TokenStream s = TokenStream.__new__(TokenStream)
        s._running = threading.Lock()
        s.smpl = _make_sampler(params, ctx.model._n_vocab, ctx._n_ctx)
        s.ctx = ctx
        s.prompt = toks
        s.ticket = ticket
        s.started = False
        s.cancel_requested = False
        s.closing = False
        ctx._init_gen(&s.g, s.smpl, max_tokens)
        s.g.out = &s.out
        s.done = False
        return s

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
            self.ctx._arm_for_thread()
        with nogil:
            while True:
                rc = _gen_step(&self.g)
                if rc != STEP_TOKEN:
                    break
                n = mullama_utf8_complete(self.out.data(), self.out.size())
                if n > 0:
                    break
        if rc == STEP_TOKEN:
            piece = self.out.substr(0, n).decode("utf-8", "replace")
            self.out.erase(0, n)
            return piece
        return self._last_piece(rc)

    cdef int _begin(self) except -1:
        """Claim the context at the first next(), not at creation: an unused stream holds nothing."""
        self.ctx._enter(self.ticket)
        self.ctx._owner = threading.current_thread()
        self.started = True
        if self.cancel_requested:  # cancel() came before the context was ours
            mullama_atomic_store(&self.ctx.interrupt.cancel, 1)
        try:
            self.ctx._prepare(self.prompt)
        except GenerationCancelled:
            self.finish_reason = "cancelled"
            self._end()
            if self.closing:
                raise StopIteration
            raise
        except BaseException:
            self._end()
            raise
        self.g.interrupt = &self.ctx.interrupt
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
        rest = self.out.decode("utf-8", "replace")
        self.out.clear()
        self._end()
        if rest:
            return rest
        raise StopIteration

    cdef void _end(self):
        if self.done:
            return
        self.done = True
        if self.smpl != NULL:
            llama_sampler_free(self.smpl)
            self.smpl = NULL
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
            mullama_atomic_store(&self.ctx.interrupt.cancel, 1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __dealloc__(self):
        # Nothing can be iterating: that thread would hold a reference. ctx is still set
        # (no_gc_clear), so a stream collected open hands its context back cleanly.
        if self.smpl != NULL:
            llama_sampler_free(self.smpl)
            self.smpl = NULL
        if self.started and not self.done:
            self.done = True
            self.ctx._leave()
