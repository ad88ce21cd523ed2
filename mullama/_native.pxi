# _NativeContext: the one owner of a llama_context, its batch and its interrupt flag, and the
# typed nogil layer (batch filling, decode with mullama's own status) that the Context, Engine
# and EmbeddingGenerator loops are written against. None of them touches another's fields.

# What a decode did, in mullama's own numbers; llama_decode's result stays in NativeState.rc
# for the message.
cdef enum Decoded:
    DECODED = 100
    DECODE_ABORTED = 101        # cancel() or a signal, through the abort callback
    DECODE_NO_SLOT = 102        # no room in the memory (llama_decode: 1)
    DECODE_INVALID = 103        # a batch llama.cpp refused (llama_decode: -1)
    DECODE_FILE_CHANGED = 104   # the mapped model file changed: nothing was decoded
    DECODE_FAILED = 105         # any other failure of the backend
    DECODE_RPC_LOST = 106       # an RPC server went away: the model's devices are lost

# The names _errors.decode_failure knows them by.
_DECODE_FAILURES = {DECODE_NO_SLOT: "no_slot", DECODE_INVALID: "invalid",
                    DECODE_FILE_CHANGED: "file_changed", DECODE_FAILED: "failed",
                    DECODE_RPC_LOST: "rpc_lost"}


cdef extern from "ggml-cpu.h" nogil:
    cdef struct ggml_threadpool
    ctypedef struct ggml_threadpool_params:
        int n_threads
        uint32_t poll
    ggml_threadpool_params ggml_threadpool_params_default(int n_threads)
    ggml_threadpool * ggml_threadpool_new(ggml_threadpool_params * params)
    void ggml_threadpool_free(ggml_threadpool * threadpool)


cdef extern from "llama.h" nogil:
    void llama_attach_threadpool(llama_context * ctx, ggml_threadpool * threadpool, ggml_threadpool * batch)


cdef struct NativeState:
    llama_context * ctx
    llama_batch batch
    Interrupt interrupt
    const mullama_file_guard * guard
    int rc                      # llama_decode's result of the last decode
    bint watched                # the model runs on RPC servers: decode through _rpc_watch.h
    ggml_threadpool * pool      # the compute threads, kept between decodes (NULL: none yet)
    int pool_threads            # threads to start it with (0: llama.cpp starts them per decode)
    int pool_pid                # the process that started them (a forked child has none of them)


cdef inline void _batch_put(NativeState * st, int i, llama_token tok, llama_pos pos, llama_seq_id seq,
                            bint logits) noexcept nogil:
    """Put one token at row i of the batch."""
    st.batch.token[i] = tok
    st.batch.pos[i] = pos
    st.batch.n_seq_id[i] = 1
    st.batch.seq_id[i][0] = seq
    st.batch.logits[i] = logits


cdef void _start_pool(NativeState * st) noexcept nogil:
    """Start the context's compute threads for good, from the thread that decodes first: they
    inherit its scheduling (its nice value and time slice: an engine's lower priority). Without
    a pool of its own, llama.cpp starts and joins them on every decode, which measured about 6%
    slower generation here (BENCHMARKS.md)."""
    cdef ggml_threadpool_params tpp = ggml_threadpool_params_default(st.pool_threads)
    st.pool_pid = getpid()
    # Idle threads sleep at once: polling (llama.cpp's tools use 50, about 0.1 s of spinning
    # after every decode) measured no faster here and takes a core from everything else.
    tpp.poll = 0
    st.pool = ggml_threadpool_new(&tpp)
    if st.pool == NULL:
        st.pool_threads = 0   # llama.cpp's own per-decode threads, then
        return
    llama_attach_threadpool(st.ctx, st.pool, st.pool)


cdef Decoded _native_decode(NativeState * st, int n) noexcept nogil:
    """Decode the first n rows of the batch, unless the model's mapped file has changed."""
    st.batch.n_tokens = n
    st.rc = 0
    if mullama_file_changed(st.guard):
        return DECODE_FILE_CHANGED
    if st.pool != NULL and st.pool_pid != getpid():
        st.pool = NULL   # a forked child's copy: its threads stayed in the parent (leave it be)
    if st.pool == NULL and st.pool_threads > 0:
        _start_pool(st)
    if st.watched:
        if mullama_decode_watched(st.ctx, st.batch, &st.rc) != 0:
            return DECODE_RPC_LOST
    else:
        st.rc = llama_decode(st.ctx, st.batch)
    mullama_set_decode_aborted(0)
    if st.rc == 0:
        return DECODED
    if st.rc == 2:
        return DECODE_ABORTED
    if st.rc == 1:
        return DECODE_NO_SLOT
    if st.rc == -1:
        return DECODE_INVALID
    return DECODE_FAILED


cdef enum SeqRestore:
    SEQ_RESTORED = 0
    SEQ_REFUSED = 1          # the sequence is empty
    SEQ_STUCK = 2            # cells of the sequence are left that only a whole-cache clear removes


cdef inline void _seq_rm(NativeState * st, int seq, int p0, int p1) noexcept nogil:
    llama_memory_seq_rm(llama_get_memory(st.ctx), seq, p0, p1)


@cython.no_gc_clear   # __dealloc__ releases the model: the cycle collector must not clear it first
cdef class _NativeContext:
    """Owns one llama_context with its batch and interrupt; freed once, by close() or collection."""

    cdef NativeState st
    cdef readonly Model model        # keeps the model (its weights, vocabulary, file guard) alive
    cdef bint batch_ready
    cdef int n_ctx
    cdef int n_batch
    cdef int n_seq_max
    cdef int n_threads
    cdef int pooling
    cdef bint embeddings
    cdef long long calls             # generations started so far (each takes the next number)
    cdef long long cancel_upto       # cancel() covers the generations numbered up to this
    cdef tuple adapters              # (LoraAdapter, scale) pairs applied; holds them alive
    cdef size_t empty_seq_state      # bytes of an empty sequence's state: how emptiness is proven

    def __cinit__(self):
        self.st.ctx = NULL
        self.batch_ready = False
        self.st.pool = NULL
        self.adapters = ()

    @staticmethod
    cdef _NativeContext open(Model model, object n_ctx, object n_batch, object n_threads, bint embeddings,
                            object n_seq_max, object flash_attn, dict rope, object pooling):
        """Check the settings by name and create the context; ContextCreateError if llama.cpp can't."""
        cdef llama_context_params p = _context_params(model, n_ctx, n_batch, n_threads, embeddings, n_seq_max,
                                                      flash_attn, rope, pooling)
        cdef _NativeContext c = _NativeContext.__new__(_NativeContext)
        p.abort_callback = _abort_callback
        p.abort_callback_data = &c.st.interrupt
        _arm_interrupt(&c.st.interrupt, False)
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
        c.st.ctx = ptr
        c.st.pool_threads = p.n_threads
        c.st.watched = model._rpc
        c.st.guard = &model.guard
        c.model = model
        model._acquire()
        c.n_ctx = llama_n_ctx(ptr)
        c.n_batch = llama_n_batch(ptr)
        c.n_seq_max = p.n_seq_max
        c.n_threads = p.n_threads
        c.embeddings = embeddings
        if llama_get_memory(ptr) != NULL:
            c.empty_seq_state = llama_state_seq_get_size(ptr, 0)   # every sequence is empty now
        c.pooling = <int> llama_get_pooling_type(ptr)
        cdef float * rows = llama_get_logits(ptr)
        if rows != NULL and not embeddings:
            for i in range(c.n_seq_max):
                mullama_logits_used(rows + <size_t> i * model._n_vocab)
        c.st.batch = llama_batch_init(c.n_batch, 0, 1)
        c.batch_ready = True
        return c

    # -- cancels and signals -----------------------------------------------------------------

    cdef long long ticket(self):
        """Number a generation as it starts, so that a cancel() from then on covers it."""
        self.calls += 1
        return self.calls

    cdef void arm(self, long long ticket):
        """Ready the interrupt for generation `ticket`, cancelled already if a cancel() covers it."""
        _arm_interrupt(&self.st.interrupt, ticket <= self.cancel_upto)

    cdef void arm_for_thread(self):
        """Ready signal polling for a native loop in the calling thread; a cancel stays."""
        _arm_signals(&self.st.interrupt)

    cdef void cancel(self):
        """Stop every generation started so far, within one token (any thread)."""
        if self.st.ctx != NULL:
            self.cancel_upto = self.calls
            mullama_atomic_store(&self.st.interrupt.cancel, 1)

    cdef void cancel_running(self):
        """Stop the generation running now, and only it."""
        mullama_atomic_store(&self.st.interrupt.cancel, 1)

    # -- decoding ----------------------------------------------------------------------------

    cdef bint has_memory(self):
        """False for an encoder-only model: its decode runs the encoder and leaves no logits."""
        return llama_get_memory(self.st.ctx) != NULL

    cdef void clear(self):
        llama_memory_clear(llama_get_memory(self.st.ctx), True)

    cdef int keep_prefix(self, int seq, int keep):
        """Trim sequence seq to its first keep positions; returns how many it still holds
        usable (0, and the sequence emptied, when llama.cpp cannot cut it there, or when
        positions the next token attends to are gone: a sliding window lets old ones go)."""
        cdef llama_memory_t mem = llama_get_memory(self.st.ctx)
        cdef int window = llama_model_n_swa(self.model.ptr)
        cdef int oldest_needed = max(0, keep - window) if window > 0 else 0
        if keep > 0 and llama_memory_seq_rm(mem, seq, keep, -1) \
                and llama_memory_seq_pos_max(mem, seq) == keep - 1 \
                and llama_memory_seq_pos_min(mem, seq) <= oldest_needed:
            return keep
        llama_memory_seq_rm(mem, seq, -1, -1)
        return 0

    cdef void copy_sequence(self, int src, int dst):
        """Make sequence dst a copy of sequence src (its cells, or with one cache stream per
        sequence its whole stream, copied at the next decode)."""
        cdef llama_memory_t mem = llama_get_memory(self.st.ctx)
        llama_memory_seq_rm(mem, dst, -1, -1)
        llama_memory_seq_cp(mem, src, dst, -1, -1)

    cdef int raise_for(self, Decoded d, str what) except -1:
        """The one place a decode status becomes an exception (the table is in _errors)."""
        if d == DECODED:
            return 0
        if d == DECODE_ABORTED:
            _raise_interrupt(&self.st.interrupt)
            raise GenerationCancelled(f"{what} was cancelled")
        raise self.failure(d, what)

    cdef object failure(self, Decoded d, str what):
        """The exception for a failed (not aborted) decode."""
        return decode_failure(_DECODE_FAILURES[d], self.st.rc, what)

    # -- saved state and adapters ------------------------------------------------------------

    cdef tuple state_layout(self):
        """(cells per sequence, sequences): what a saved state must be read back into."""
        return (<int> llama_n_ctx_seq(self.st.ctx), self.n_seq_max)

    cdef bytes seq_state(self, int seq):
        """llama.cpp's own bytes for one sequence's cache (positions, keys, values)."""
        cdef size_t n, got
        with nogil:
            n = llama_state_seq_get_size(self.st.ctx, seq)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
        cdef uint8_t * dst = <uint8_t *> PyBytes_AS_STRING(out)
        with nogil:
            got = llama_state_seq_get_data(self.st.ctx, dst, n, seq)
        if got != n:
            raise StateError(f"llama.cpp wrote {got} of the {n} bytes of the sequence's state")
        return out

    cdef SeqRestore set_seq_state(self, int seq, const uint8_t[::1] blob, int n_tokens):
        """Replace sequence `seq` with a saved one of n_tokens positions (0 to n_tokens - 1).
        SEQ_REFUSED, the sequence left empty, when llama.cpp refuses it or its cells are at
        positions its tokens cannot have (a state made to pass the checksum); SEQ_STUCK when
        llama.cpp left cells where llama_memory_seq_rm cannot reach them (below position 0, or
        at the largest): only clearing the whole cache removes those."""
        cdef size_t n = blob.shape[0], got = 0
        cdef const uint8_t * src = &blob[0] if n > 0 else NULL
        cdef llama_memory_t mem = llama_get_memory(self.st.ctx)
        _seq_rm(&self.st, seq, -1, -1)
        if n > 0:
            with nogil:
                got = llama_state_seq_set_data(self.st.ctx, src, n, seq)
        if got != 0 and llama_memory_seq_pos_max(mem, seq) == n_tokens - 1 and \
                (llama_memory_seq_pos_min(mem, seq) >= 0 if n_tokens > 0 else self.seq_empty(seq)):
            return SEQ_RESTORED
        _seq_rm(&self.st, seq, -1, -1)
        return SEQ_REFUSED if self.seq_empty(seq) else SEQ_STUCK

    cdef bint seq_empty(self, int seq):
        """Whether the sequence holds no cell at all (its positions cannot tell: an empty
        sequence and one cell at position -1 both have -1 as their first and last)."""
        return llama_state_seq_get_size(self.st.ctx, seq) == self.empty_seq_state

    cdef int set_adapters(self, tuple adapters) except -1:
        """Apply (LoraAdapter, scale) pairs to every later decode; () removes them all."""
        cdef vector[llama_adapter_lora *] ptrs
        cdef vector[float] scales
        cdef LoraAdapter a
        for a, scale in adapters:
            ptrs.push_back(a._ptr())
            scales.push_back(scale)
        for a, _ in adapters:
            a._users += 1
        for a, _ in self.adapters:
            a._users -= 1
        self.adapters = adapters
        llama_set_adapters_lora(self.st.ctx, ptrs.data() if ptrs.size() else NULL, ptrs.size(),
                                scales.data() if scales.size() else NULL)
        return 0

    # -- lifetime ----------------------------------------------------------------------------

    cdef int check(self) except -1:
        if self.st.ctx == NULL:
            raise ClosedError("this context is closed")
        if self.lost():
            raise self.failure(DECODE_RPC_LOST, "this context")
        return 0

    cdef bint lost(self):
        """Its model's RPC devices are lost: nothing may touch its native state again."""
        return self.st.watched and mullama_rpc_lost()

    cdef void free(self):
        cdef LoraAdapter a
        if self.lost():
            # A helper thread may still wait inside this context and read its batch; freeing
            # either would ask the lost servers: both stay, as the model does.
            if self.st.ctx != NULL:
                self.st.ctx = NULL
                self.model._release()
            self.batch_ready = False
            return
        if self.st.ctx != NULL:
            for a, _ in self.adapters:
                a._users -= 1
            self.adapters = ()
            llama_free(self.st.ctx)
            self.st.ctx = NULL
            if self.st.pool != NULL and self.st.pool_pid == getpid():
                ggml_threadpool_free(self.st.pool)   # joins its threads: none in a forked child
            self.st.pool = NULL
            self.model._release()
        if self.batch_ready:
            llama_batch_free(self.st.batch)
            self.batch_ready = False

    def __dealloc__(self):
        self.free()    # no_gc_clear: model is still set here


cdef llama_context_params _context_params(Model model, object n_ctx, object n_batch, object n_threads,
                                          bint embeddings, object n_seq_max, object flash_attn, dict rope,
                                          object pooling) except *:
    """The llama_context_params for these settings, each checked by name."""
    model._check()
    if model._lost():
        raise decode_failure(_DECODE_FAILURES[DECODE_RPC_LOST], 0, "a new context")
    if model._vocab_only:
        raise InvalidArgumentError(
            f"model {model.path!r} was loaded with vocab_only=True: it has no weights to compute "
            "with, so it cannot have a context; load it again without vocab_only"
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
    _check_batch_fits_sequences(n_ctx or model.n_ctx_train, n_batch, n_seq_max, embeddings)
    cdef llama_context_params p = llama_context_default_params()
    rope = {k: v for k, v in rope.items() if v is not None}   # None: the model's own
    _set_rope(&p, rope)
    # Each sequence has n_ctx / n_seq_max cells, unless they share them (embeddings).
    _check_fits_training(model, (n_ctx or model.n_ctx_train) // (1 if embeddings else n_seq_max), bool(rope))
    p.n_ctx = n_ctx
    p.n_batch = n_batch
    p.n_seq_max = n_seq_max
    p.n_threads = n_threads or _default_threads()
    p.n_threads_batch = p.n_threads
    p.embeddings = embeddings
    p.no_perf = True
    if flash_attn is not None:
        if not isinstance(flash_attn, bool):
            raise InvalidArgumentError(f"flash_attn must be None (llama.cpp's choice), True or False, "
                                       f"got {flash_attn!r}")
        # llama.cpp's default (auto) turns it on for the CPU: faster on long prompts, slower
        # on batches of a few tokens (a chat's new turn); see BENCHMARKS.md.
        p.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else LLAMA_FLASH_ATTN_TYPE_DISABLED
    if embeddings:
        # Non-causal models must see a whole sequence in one micro-batch, and the texts of
        # one embedding batch share the cache cells instead of n_ctx / n_seq_max each.
        p.n_ubatch = n_batch
        p.kv_unified = True
    if pooling is not None:
        p.pooling_type = <llama_pooling_type> <int> pooling
    return p


cdef int _check_batch_fits_sequences(int n_ctx, int n_batch, int n_seq_max, bint embeddings) except -1:
    """llama.cpp sizes a context for a micro-batch of n_batch tokens (at most n_ctx, for a causal
    model) from n_seq_max sequences, and aborts the process while creating one where that cannot
    be: fewer tokens than sequences (an output row each), or, for pooled embeddings, tokens that
    do not divide evenly among the sequences (it rounds the tokens up, past the pooling matrix
    it built)."""
    cdef int batch = min(n_batch, n_ctx)
    what = f"n_batch={n_batch}" if batch == n_batch else f"n_batch={n_batch} (at most n_ctx={n_ctx})"
    if n_seq_max > batch:
        raise InvalidArgumentError(
            f"n_seq_max={n_seq_max} is more than {what}: a batch needs room for a token of every "
            "sequence; raise n_batch and n_ctx, or lower n_seq_max"
        )
    if embeddings and batch % n_seq_max:
        raise InvalidArgumentError(
            f"with embeddings, {what} must be a multiple of n_seq_max={n_seq_max} (llama.cpp pools "
            "a micro-batch of n_batch tokens shared evenly among n_seq_max sequences)"
        )
    return 0


_ROPE_SCALING = {"none": LLAMA_ROPE_SCALING_TYPE_NONE, "linear": LLAMA_ROPE_SCALING_TYPE_LINEAR,
                 "yarn": LLAMA_ROPE_SCALING_TYPE_YARN, "longrope": LLAMA_ROPE_SCALING_TYPE_LONGROPE}


cdef int _set_rope(llama_context_params * p, dict rope) except -1:
    """RoPE scaling settings (absent = the model's own) into p, checked by name."""
    for name, value in rope.items():
        if name == "rope_scaling":
            if value not in _ROPE_SCALING:
                raise InvalidArgumentError(f"rope_scaling={value!r} must be one of {sorted(_ROPE_SCALING)} or None")
            p.rope_scaling_type = <llama_rope_scaling_type> <int> _ROPE_SCALING[value]
            continue
        if name == "yarn_orig_ctx":
            p.yarn_orig_ctx = _check_int(value, name, 0, 1 << 24)
            continue
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
