# EmbeddingGenerator: many texts per decode, pooled as the model declares.

cdef int _declared_pooling(Model model):
    """The pooling a model declares in its metadata (LLAMA_POOLING_TYPE_NONE if none), read
    before a context is made, so that it is made once."""
    arch = model.architecture
    declared = model._meta(f"{arch}.pooling_type") if arch and not model._vocab_only else None
    try:
        return int(declared) if declared is not None else LLAMA_POOLING_TYPE_NONE
    except ValueError:
        return LLAMA_POOLING_TYPE_NONE


_RANKER = "this is a reranking model (rank pooling); it gives scores, not embeddings: use Reranker"


cdef int _seqs_dividing(int n_batch, int n_seq_max) noexcept:
    """The most sequences per decode, at most n_seq_max, that divide n_batch: what a pooled
    context needs (see _context_params). n_seq_max only caps how many texts share a decode, so
    it is lowered rather than refused."""
    cdef int n = min(n_seq_max, n_batch)
    while n_batch % n:
        n -= 1
    return n


@cython.no_gc_clear   # its native context is freed by its owner
cdef class _Pooled:
    """One context that pools each sequence of a decode into a row of ``width`` floats: the
    native half of EmbeddingGenerator and Reranker."""

    cdef _NativeContext core           # owns the llama_context; keeps the model alive
    cdef int width
    cdef object lock                   # one batch at a time

    @staticmethod
    cdef _Pooled open(Model model, object n_ctx, object n_threads, object n_seq_max, object flash_attn,
                      object pooling, int width):
        _check_int(n_ctx, "n_ctx", 8, 1 << 20)
        _check_int(n_seq_max, "n_seq_max", 1, llama_max_parallel_sequences())
        cdef _Pooled p = _Pooled.__new__(_Pooled)
        p.core = _NativeContext.open(model, n_ctx, n_ctx, n_threads, True, _seqs_dividing(n_ctx, n_seq_max),
                                     flash_attn, {}, pooling)
        p.width = width
        p.lock = threading.Lock()
        return p

    cdef void close(self):
        """Free the context (idempotent); a batch running in another thread is cancelled first."""
        if not self.lock.acquire(blocking=False):
            self.core.cancel_running()
            self.lock.acquire()
        try:
            self.core.free()
        finally:
            self.lock.release()

    cdef int check_length(self, list ids, str what) except -1:
        if not ids:
            raise InvalidArgumentError(f"{what} gives no tokens; give a non-empty text")
        if len(ids) > self.core.n_batch:
            raise ContextOverflowError(
                f"{what} is {len(ids)} tokens; this context holds {self.core.n_batch} per sequence "
                "(create it with a larger n_ctx)"
            )
        return 0

    cdef object run(self, long long ticket, list seqs, bint normalize, str what):
        """The pooled rows of token sequences, in their order, as a float32 array."""
        import numpy as np
        out = np.zeros((len(seqs), self.width), dtype=np.float32)
        if not seqs:
            return out
        with self.lock:
            self.core.check()
            self.core.arm(ticket)
            self._pack_into(seqs, out, normalize, what)
        return out

    cdef int _pack_into(self, list seqs, object out, bint normalize, str what) except -1:
        """Pack sequences into decodes (longest first packs them tightly) and write each row
        back in the caller's order."""
        cdef float[:, ::1] view = out
        # Texts of one decode attend over the whole micro-batch (masked). Without flash attention
        # (which skips masked cells) 256 tokens per decode beat 512 by ~10% here; with it they
        # are even (BENCHMARKS.md).
        cdef int per_decode = max(min(self.core.n_batch, 256), 1)
        order = sorted(range(len(seqs)), key=lambda k: -len(seqs[k]))
        cdef vector[llama_token] toks
        cdef vector[int] starts
        cdef vector[int] rows
        cdef int used, d
        pos = 0
        while pos < len(order):
            toks.clear()
            starts.clear()
            rows.clear()
            used = 0
            while pos < len(order) and <int> rows.size() < self.core.n_seq_max \
                    and (used == 0 or used + len(seqs[order[pos]]) <= per_decode):
                starts.push_back(used)
                rows.push_back(order[pos])
                for t in seqs[order[pos]]:
                    toks.push_back(t)
                used += len(seqs[order[pos]])
                pos += 1
            starts.push_back(used)
            with nogil:
                d = _embed_batch(&self.core.st, toks, starts, rows, &view[0, 0], self.width, normalize)
            if d == DECODE_NO_POOLED:
                raise InvalidArgumentError("llama.cpp returned no pooled output for a sequence")
            self.core.raise_for(<Decoded> d, f"{what} ({rows.size()} sequences in one decode)")
        return 0


@cython.no_gc_clear   # its native context is freed by its owner
cdef class EmbeddingGenerator:
    """Sentence embeddings from a model, with the pooling the model declares (mean if none).

    >>> gen = EmbeddingGenerator(model)            # doctest: +SKIP
    >>> gen.embed_batch(["a cat", "a dog"]).shape  # doctest: +SKIP
    (2, 384)
    """

    cdef _Pooled pooled
    cdef readonly bint normalize

    def __init__(self, Model model not None, n_ctx=512, normalize=True, *, n_threads=0, n_seq_max=64,
                 flash_attn=None):
        model._check()
        cdef int kind = _declared_pooling(model)
        if kind == LLAMA_POOLING_TYPE_RANK:
            raise InvalidArgumentError(_RANKER)
        pooling = LLAMA_POOLING_TYPE_MEAN if kind == LLAMA_POOLING_TYPE_NONE and not model._vocab_only else None
        self.pooled = _Pooled.open(model, n_ctx, n_threads, n_seq_max, flash_attn, pooling,
                                   llama_model_n_embd_out(model.ptr))
        if self.pooled.core.pooling == LLAMA_POOLING_TYPE_RANK:
            self.pooled.core.free()
            raise InvalidArgumentError(_RANKER)
        self.normalize = bool(normalize)

    @property
    def n_embd(self):
        """Width of each embedding."""
        return self.pooled.width

    @property
    def model(self):
        return self.pooled.core.model

    @property
    def closed(self):
        return self.pooled.core.st.ctx == NULL

    def cancel(self):
        """Stop an embed_batch running in another thread (it raises GenerationCancelled)."""
        self.pooled.core.cancel()

    def close(self):
        """Free the context (idempotent); an embed_batch running in another thread is cancelled first."""
        self.pooled.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def embed(self, text):
        """One text -> a 1-D float32 array of ``n_embd`` values."""
        return self._embed([text], True)[0]

    def embed_batch(self, texts):
        """Many texts -> a 2-D float32 array, one row per text, several texts per decode."""
        if isinstance(texts, (str, bytes)) or not hasattr(texts, "__iter__"):
            raise InvalidArgumentError("texts must be a list of str; for one text use embed()")
        return self._embed(texts, False)

    cdef object _embed(self, object texts, bint one):
        """The rows of texts; an error names ``text`` (one) or ``texts[i]``."""
        self.pooled.core.check()
        cdef long long ticket = self.pooled.core.ticket()
        cdef Model model = self.pooled.core.model
        seqs = []
        for i, text in enumerate(texts):
            where = "text" if one else f"texts[{i}]"
            if not isinstance(text, str):
                raise InvalidArgumentError(f"{where} is {type(text).__name__}, not str")
            ids = model._tokenize_bytes(_utf8(text, where), True, False)
            self.pooled.check_length(ids, where)
            seqs.append(ids)
        return self.pooled.run(ticket, seqs, self.normalize, "embedding texts")


@cython.no_gc_clear   # its native context is freed by its owner
cdef class Reranker:
    """Relevance scores of documents for a query, from a reranking model (one that declares
    rank pooling: a cross-encoder such as bge-reranker). Each (query, document) pair is read
    together, as llama.cpp's server builds it: the model's ``rerank`` template if it has one,
    else BOS, query, EOS, SEP, document, EOS as its vocabulary asks. Higher is more relevant.

    >>> Reranker(model).rank("what is a cat?", ["a small feline", "a tax form"])  # doctest: +SKIP
    [4.2, -7.9]
    """

    cdef _Pooled pooled

    def __init__(self, Model model not None, n_ctx=512, *, n_threads=0, n_seq_max=64, flash_attn=None):
        model._check()
        if model._vocab_only or _declared_pooling(model) != LLAMA_POOLING_TYPE_RANK:
            raise InvalidArgumentError(
                f"model {model.path!r} is not a reranking model (its metadata declares no rank pooling); "
                "use EmbeddingGenerator for embeddings"
            )
        self.pooled = _Pooled.open(model, n_ctx, n_threads, n_seq_max, flash_attn, None,
                                   max(1, llama_model_n_cls_out(model.ptr)))

    @property
    def model(self):
        return self.pooled.core.model

    @property
    def closed(self):
        return self.pooled.core.st.ctx == NULL

    def cancel(self):
        """Stop a rank running in another thread (it raises GenerationCancelled)."""
        self.pooled.core.cancel()

    def close(self):
        """Free the context (idempotent); a rank running in another thread is cancelled first."""
        self.pooled.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def rank(self, query, documents):
        """One score per document, in their order (several pairs per decode)."""
        if not isinstance(query, str):
            raise InvalidArgumentError(f"query must be a str, got {type(query).__name__}")
        if isinstance(documents, (str, bytes)) or not hasattr(documents, "__iter__"):
            raise InvalidArgumentError("documents must be a list of str")
        self.pooled.core.check()
        cdef long long ticket = self.pooled.core.ticket()
        seqs = []
        for i, doc in enumerate(documents):
            if not isinstance(doc, str):
                raise InvalidArgumentError(f"documents[{i}] is {type(doc).__name__}, not str")
            ids = self._pair(query, doc, i)
            self.pooled.check_length(ids, f"the query with documents[{i}]")
            seqs.append(ids)
        return [float(row[0]) for row in self.pooled.run(ticket, seqs, False, "ranking documents")]

    cdef list _pair(self, str query, str doc, Py_ssize_t i):
        cdef Model model = self.pooled.core.model
        cdef const llama_vocab * vocab = model.vocab
        cdef const char * tmpl = llama_model_chat_template(model.ptr, b"rerank")
        if tmpl != NULL:
            text = tmpl.decode("utf-8", "replace").replace("{query}", query).replace("{document}", doc)
            return model._tokenize_bytes(_utf8(text, f"documents[{i}]"), False, True)
        cdef llama_token eos = llama_vocab_eos(vocab)
        if eos == LLAMA_TOKEN_NULL:
            eos = llama_vocab_sep(vocab)
        ids = [llama_vocab_bos(vocab)] if llama_vocab_get_add_bos(vocab) else []
        ids += model._tokenize_bytes(_utf8(query, "query"), False, False)
        if llama_vocab_get_add_eos(vocab):
            ids.append(eos)
        if llama_vocab_get_add_sep(vocab):
            ids.append(llama_vocab_sep(vocab))
        ids += model._tokenize_bytes(_utf8(doc, f"documents[{i}]"), False, False)
        if llama_vocab_get_add_eos(vocab):
            ids.append(eos)
        return ids


cdef enum:
    # _embed_batch's own result beside the decode statuses: the decode gave no pooled vector.
    DECODE_NO_POOLED = 200


cdef int _embed_batch(NativeState * st, vector[llama_token] & toks, vector[int] & starts, vector[int] & rows,
                      float * out, int n_embd, bint normalize) noexcept nogil:
    cdef int s, i, k
    cdef int n_seq = <int> rows.size()
    cdef const float * e
    cdef double norm
    cdef Decoded d
    for s in range(n_seq):
        for i in range(starts[s], starts[s + 1]):
            _batch_put(st, i, toks[i], i - starts[s], s, True)
    llama_memory_clear(llama_get_memory(st.ctx), True)
    d = _native_decode(st, <int> toks.size())
    if d != DECODED:
        return d
    for s in range(n_seq):
        e = llama_get_embeddings_seq(st.ctx, s)
        if e == NULL:
            return DECODE_NO_POOLED
        norm = 0
        if normalize:
            for k in range(n_embd):
                norm += e[k] * e[k]
            norm = norm ** 0.5
        if norm <= 0:
            norm = 1
        for k in range(n_embd):
            out[rows[s] * n_embd + k] = <float> (e[k] / norm)
    return DECODED
