# Model: the one owner of a llama_model pointer.

from . import _hparams


cdef object _gguf_metadata(const char * cpath):
    """The scalar numbers and strings, the integer arrays and the token strings of a GGUF
    file's metadata, read with ggml's own GGUF reader, and the share of its tensor bytes that
    are F16; None where it refuses the file (llama.cpp then says why)."""
    cdef gguf_init_params ip
    ip.no_alloc = True
    ip.ctx = NULL
    cdef gguf_context * g
    cdef int64_t i
    cdef size_t k, n
    cdef gguf_type t, at
    cdef const int32_t * i32
    cdef const uint32_t * u32
    with nogil:
        g = gguf_init_from_file(cpath, ip)
    if g == NULL:
        return None
    kv = {}
    try:
        for i in range(gguf_get_n_kv(g)):
            key = gguf_get_key(g, i).decode("utf-8", "replace")
            t = gguf_get_kv_type(g, i)
            if t == GGUF_TYPE_UINT8:
                kv[key] = gguf_get_val_u8(g, i)
            elif t == GGUF_TYPE_INT8:
                kv[key] = gguf_get_val_i8(g, i)
            elif t == GGUF_TYPE_UINT16:
                kv[key] = gguf_get_val_u16(g, i)
            elif t == GGUF_TYPE_INT16:
                kv[key] = gguf_get_val_i16(g, i)
            elif t == GGUF_TYPE_UINT32:
                kv[key] = gguf_get_val_u32(g, i)
            elif t == GGUF_TYPE_INT32:
                kv[key] = gguf_get_val_i32(g, i)
            elif t == GGUF_TYPE_UINT64:
                kv[key] = gguf_get_val_u64(g, i)
            elif t == GGUF_TYPE_INT64:
                kv[key] = gguf_get_val_i64(g, i)
            elif t == GGUF_TYPE_FLOAT32:
                kv[key] = <double> gguf_get_val_f32(g, i)
            elif t == GGUF_TYPE_FLOAT64:
                kv[key] = gguf_get_val_f64(g, i)
            elif t == GGUF_TYPE_STRING:
                kv[key] = gguf_get_val_str(g, i).decode("utf-8", "replace")
            elif t == GGUF_TYPE_ARRAY:
                at = gguf_get_arr_type(g, i)
                n = gguf_get_arr_n(g, i)
                if at == GGUF_TYPE_INT32 and n <= 4096:
                    i32 = <const int32_t *> gguf_get_arr_data(g, i)
                    kv[key] = [i32[k] for k in range(n)]
                elif at == GGUF_TYPE_UINT32 and n <= 4096:
                    u32 = <const uint32_t *> gguf_get_arr_data(g, i)
                    kv[key] = [u32[k] for k in range(n)]
                elif at == GGUF_TYPE_STRING and key == "tokenizer.ggml.tokens":
                    kv[key] = [<bytes> gguf_get_arr_str(g, i, k) for k in range(n)]
        return kv, _f16_share(g)
    finally:
        gguf_free(g)


cdef double _f16_share(const gguf_context * g) noexcept:
    cdef size_t total = 0, f16 = 0, size
    cdef int64_t i
    for i in range(gguf_get_n_tensors(g)):
        size = gguf_get_tensor_size(g, i)
        total += size
        if gguf_get_tensor_type(g, i) == GGML_TYPE_F16:
            f16 += size
    return <double> f16 / total if total else 0.0


cdef bint _use_extra_buffers(double f16_share) noexcept:
    """Whether weights may go to ggml's extra CPU buffer types (repacked layouts, AMX). Not for
    a model of mostly F16 weights where the build has AMX: ggml's AMX buffer takes F16 weights
    too, but multiplies them with AVX-512 code at about half the speed of the CPU's own f16
    GEMM (prompt processing of the f16 embedding model, 1204 against 2292 tokens/s); only
    quantized weights gain from AMX."""
    return not (ggml_cpu_has_amx_int8() and f16_share > 0.5)


cdef cbool _load_progress(float progress, void * data) noexcept with gil:
    """llama.cpp's load progress callback: calls the user's progress(fraction). An exception it
    raises (KeyboardInterrupt included) is kept in data[1] and stops the load."""
    cdef list state = <list> data
    try:
        state[0](min(1.0, max(0.0, <double> progress)))
        return True
    except BaseException as exc:
        state[1] = exc
        return False

cdef class Model:
    """A GGUF model loaded into memory. Load with :meth:`Model.load`.

    >>> model = Model.load("SmolLM2-135M-Instruct.Q4_1.gguf")   # doctest: +SKIP
    >>> model.tokenize("Hello")                                 # doctest: +SKIP
    [19556]
    """

    cdef llama_model * ptr
    cdef const llama_vocab * vocab
    cdef readonly str path
    cdef int _n_vocab
    cdef int _users             # open contexts that use ptr; close() waits for them
    cdef bint _close_requested
    cdef bint _vocab_only       # loaded without weights: no Context can compute with it
    cdef mullama_file_guard guard   # the mapped file as loaded; checked before every decode
    cdef object _chat           # its _ChatTemplates, made at the first use
    cdef bint _rpc              # some layers are on RPC servers (their loss ends its use)
    cdef bint _offloaded        # some layers are on a GPU or an RPC server, not this CPU

    def __cinit__(self):
        self.ptr = NULL
        self.vocab = NULL
        self._users = 0
        self._close_requested = False
        self.guard.fd = -1
        self._chat = None

    def __init__(self):
        raise TypeError("use Model.load(path) to load a model")

    @staticmethod
    def load(path, *, n_gpu_layers=None, bint use_mmap=True, bint use_mlock=False, bint vocab_only=False,
             rpc=None, progress=None, repack=None):
        """Load a GGUF file.

        ``n_gpu_layers`` layers go to the GPU when the build has one (-1 means all; the
        default is none, or all when ``rpc`` is given).

        ``rpc=["host:port", ...]`` spreads the offloaded layers over ``mullama rpc-server``
        processes (llama.cpp's RPC backend), in proportion to the memory each reports, ahead of
        this machine's own GPUs. An endpoint that does not accept a connection within 5
        seconds raises ModelLoadError naming it. A server that dies while in use ends the
        generation with RPCServerLostError; llama.cpp's client cannot reconnect, so models on
        RPC servers cannot be used or loaded again in this process (README, "Scaling out").

        ``progress``, if given, is called with the fraction of the weights loaded so far (0.0 to
        1.0, ending with 1.0) from the loading thread; an exception it raises stops the load
        and propagates. Nothing is reported without it.

        ``repack`` lets weights kept on this CPU go to ggml's extra buffer types: layouts repacked
        for its kernels and, where the build has them, ggml's AMX kernels (llama.cpp's
        ``--repack`` / ``--no-repack``). By default they do, except a model of mostly F16
        weights on a build with AMX, which the AMX buffer multiplies more slowly. With
        ``repack=False`` every product runs in ggml's plain CPU kernels, as on an rpc-server.

        Raises ModelNotFoundError for a missing path or a directory, InvalidModelError for a file
        that is not a loadable GGUF model; the message carries llama.cpp's own reason.

        With ``use_mmap=True`` the weights are read from the file for as long as the model
        lives. Replacing the file by rename (``os.replace``, package managers, ``mv``) is safe:
        the model keeps the old file. Truncating or rewriting it in place (``cp new old``,
        ``truncate``) is detected before every decode, which then raises
        ModelFileChangedError; a change that lands during a decode cannot be caught and kills
        the process with SIGBUS, as for any program that maps the file. Load with
        ``use_mmap=False`` where model files may be rewritten in place.
        """
        try:
            fspath = os.fspath(path)
        except TypeError:
            raise InvalidArgumentError(f"path must be a str or os.PathLike, got {type(path).__name__}") from None
        if isinstance(fspath, bytes):
            fspath = os.fsdecode(fspath)
        if not fspath:
            raise ModelNotFoundError("model path is empty; pass the path of a .gguf file")
        if "\0" in fspath:
            raise InvalidArgumentError(f"model path {fspath!r} contains a NUL character")
        if not os.path.exists(fspath):
            raise ModelNotFoundError(f"model file not found: {fspath!r}")
        if os.path.isdir(fspath):
            raise ModelNotFoundError(f"model path is a directory, not a .gguf file: {fspath!r}")
        try:
            with open(fspath, "rb") as f:
                magic = f.read(4)
        except OSError as exc:
            raise ModelLoadError(f"cannot read model file {fspath!r}: {exc.strerror}") from exc
        if magic != b"GGUF":
            raise InvalidModelError(
                f"{fspath!r} is not a GGUF file (it starts with {magic!r}, expected b'GGUF')"
            )
        if n_gpu_layers is None:
            n_gpu_layers = 0 if rpc is None else -1
        _check_int(n_gpu_layers, "n_gpu_layers", -1, 1 << 20)   # -1 offloads all layers

        if progress is not None and not callable(progress):
            raise InvalidArgumentError(f"progress must be a callable taking a float, got {type(progress).__name__}")

        cdef llama_model_params params = llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        cdef vector[ggml_backend_dev_t] devices
        if rpc is not None:
            if mullama_rpc_lost():
                raise ModelLoadError(_RPC_LOST_EARLIER)
            _rpc_devices(_rpc_endpoints(rpc), devices)
            params.devices = devices.data()
        cdef list progress_state = [progress, None]   # the callable, then what it raised
        if progress is not None:
            params.progress_callback = _load_progress
            params.progress_callback_user_data = <void *> progress_state
        params.vocab_only = vocab_only
        if use_mmap and use_mlock:
            params.load_mode = LLAMA_LOAD_MODE_MMAP_MLOCK
        elif use_mmap:
            params.load_mode = LLAMA_LOAD_MODE_MMAP
        elif use_mlock:
            params.load_mode = LLAMA_LOAD_MODE_MLOCK
        else:
            params.load_mode = LLAMA_LOAD_MODE_NONE
        cdef bytes bpath = os.fsencode(fspath)
        cdef const char * cpath = bpath
        cdef llama_model * ptr
        cdef int guard_fd = -1
        read = _gguf_metadata(cpath)
        if read is not None:
            kv, f16_share = read
            params.use_extra_bufts = _use_extra_buffers(f16_share) if repack is None else bool(repack)
            arch = kv.get("general.architecture")
            bad = _hparams.vocab_problems(kv)
            if not vocab_only and isinstance(arch, str):
                bad += _hparams.problems(kv, arch)
            if bad:
                raise InvalidModelError(f"{fspath!r} has metadata llama.cpp would abort on: {'; '.join(bad)}")
        if use_mmap and not vocab_only and llama_supports_mmap():
            try:
                guard_fd = os.open(fspath, os.O_RDONLY)   # not inherited by children (PEP 446)
            except OSError as exc:
                raise ModelLoadError(f"cannot read model file {fspath!r}: {exc.strerror}") from exc
        mark = _log_mark()
        with nogil:
            ptr = llama_model_load_from_file(cpath, params)
        if ptr == NULL:
            if guard_fd >= 0:
                os.close(guard_fd)
            if progress_state[1] is not None:
                raise progress_state[1]
            why = _log_since(mark, logging.ERROR) or _log_since(mark)
            detail = "; ".join(why[-4:]) if why else "no reason was logged"
            raise InvalidModelError(f"llama.cpp could not load {fspath!r}: {detail}")
        cdef Model model = Model.__new__(Model)
        if guard_fd >= 0:
            st = os.fstat(guard_fd)
            model.guard.fd = guard_fd
            model.guard.size = st.st_size
            model.guard.mtime_ns = st.st_mtime_ns
        model.ptr = ptr
        model._vocab_only = vocab_only
        model._rpc = rpc is not None
        cdef vector[ggml_backend_dev_t] gpus
        if rpc is None:
            _local_gpus(gpus)
        model._offloaded = n_gpu_layers != 0 and (rpc is not None or gpus.size() > 0)
        model.vocab = llama_model_get_vocab(ptr)
        model._n_vocab = llama_vocab_n_tokens(model.vocab)
        model.path = fspath
        return model

    def load_adapter(self, path):
        """Load a LoRA adapter (GGUF) made for this model; apply it per context with
        ``Context(model, adapters=[(adapter, scale)])`` or ``set_adapters``. AdapterError for a
        file that is not an adapter or was made for another model."""
        self._check()
        try:
            fspath = os.fsdecode(os.fspath(path))
        except TypeError:
            raise InvalidArgumentError(f"path must be a str or os.PathLike, got {type(path).__name__}") from None
        if not os.path.isfile(fspath):
            raise AdapterError(f"LoRA adapter file not found: {fspath!r}")
        return _load_adapter(self, fspath)

    def close(self):
        """Free the model. Contexts still open on it keep the weights alive until they close."""
        self._close_requested = True
        self._free_if_unused()

    cdef void _free_if_unused(self):
        if self._close_requested and self._users == 0 and self.ptr != NULL:
            self._free_native()

    cdef bint _lost(self):
        """Some of its layers are on RPC servers, and those are lost (_rpc_watch.h): nothing may
        touch its native state again."""
        return self._rpc and mullama_rpc_lost()

    @property
    def _rpc_lost(self):
        return self._lost()

    cdef void _free_native(self):
        # The weights of a lost model stay: freeing their remote buffers would wait for good.
        if not self._lost():
            llama_model_free(self.ptr)
        self.ptr = NULL
        self.vocab = NULL
        self._close_guard()

    cdef void _close_guard(self) noexcept:
        if self.guard.fd >= 0:
            close(self.guard.fd)
            self.guard.fd = -1

    cdef void _acquire(self):
        self._users += 1

    cdef void _release(self):
        self._users -= 1
        self._free_if_unused()

    def __dealloc__(self):
        if self.ptr != NULL:
            self._free_native()
        self._close_guard()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    cdef object _no_logits_error(self):
        return InvalidArgumentError(
            f"model {self.path!r} computed no logits, so it cannot generate text "
            "(an embedding model? use EmbeddingGenerator)"
        )

    cdef object _nan_logits_error(self):
        return DecodeError(
            f"model {self.path!r} computed NaN logits, so no token can be chosen: its weights, or the "
            "cache the prompt attends to (a loaded state?), hold values that are not numbers"
        )

    cdef inline int _check(self) except -1:
        if self.ptr == NULL or self._close_requested:
            raise ClosedError("this Model is closed")
        return 0

    @property
    def closed(self):
        return self.ptr == NULL or self._close_requested

    def __repr__(self):
        if self.closed:
            return "<mullama.Model closed>"
        return f"<mullama.Model {self.description!r} from {self.path!r}>"

    # -- properties -----------------------------------------------------------------------------

    @property
    def n_ctx_train(self):
        """The context length the model was trained with."""
        self._check()
        return <uint32_t> llama_model_n_ctx_train(self.ptr)   # a uint32 in GGUF and in llama.cpp

    @property
    def n_embd(self):
        """Embedding width (hidden size)."""
        self._check()
        return llama_model_n_embd(self.ptr)

    @property
    def n_vocab(self):
        """Number of tokens in the vocabulary."""
        self._check()
        return self._n_vocab

    @property
    def n_layer(self):
        self._check()
        return llama_model_n_layer(self.ptr)

    @property
    def n_head(self):
        self._check()
        return llama_model_n_head(self.ptr)

    @property
    def token_bos(self):
        """The beginning-of-sequence token id (-1 if the model has none)."""
        self._check()
        return llama_vocab_bos(self.vocab)

    @property
    def token_eos(self):
        """The end-of-sequence token id (-1 if the model has none)."""
        self._check()
        return llama_vocab_eos(self.vocab)

    @property
    def size(self):
        """Total size of the model's tensors in bytes."""
        self._check()
        return llama_model_size(self.ptr)

    @property
    def n_params(self):
        """Number of parameters."""
        self._check()
        return llama_model_n_params(self.ptr)

    @property
    def description(self):
        """A short description such as ``'llama ?B Q4_1'``."""
        self._check()
        cdef char buf[256]
        cdef int32_t n = llama_model_desc(self.ptr, buf, sizeof(buf))
        return buf[:max(0, min(n, 255))].decode("utf-8", "replace")

    @property
    def architecture(self):
        """The ``general.architecture`` metadata value, e.g. ``'llama'`` (None if absent)."""
        return self._meta("general.architecture")

    @property
    def name(self):
        """The ``general.name`` metadata value (None if the file has none)."""
        return self._meta("general.name")

    @property
    def has_encoder(self):
        self._check()
        return bool(llama_model_has_encoder(self.ptr))

    @property
    def chat_template(self):
        """The chat template stored in the model, or None."""
        self._check()
        cdef const char * t = llama_model_chat_template(self.ptr, NULL)
        return None if t == NULL else t.decode("utf-8", "replace")

    def _meta(self, str key):
        self._check()
        cdef bytes bkey = key.encode()
        cdef int32_t n = llama_model_meta_val_str(self.ptr, bkey, NULL, 0)
        if n < 0:
            return None
        cdef bytearray buf = bytearray(n + 1)
        llama_model_meta_val_str(self.ptr, bkey, <char *> buf, n + 1)
        return bytes(buf[:n]).decode("utf-8", "replace")

    def metadata(self):
        """All scalar GGUF metadata as ``{key: value}`` strings (arrays are not included)."""
        self._check()
        cdef int32_t count = llama_model_meta_count(self.ptr)
        cdef int32_t i, n
        cdef bytearray buf
        out = {}
        for i in range(count):
            n = llama_model_meta_key_by_index(self.ptr, i, NULL, 0)
            if n < 0:
                continue
            buf = bytearray(n + 1)
            llama_model_meta_key_by_index(self.ptr, i, <char *> buf, n + 1)
            key = bytes(buf[:n]).decode("utf-8", "replace")
            n = llama_model_meta_val_str_by_index(self.ptr, i, NULL, 0)
            if n < 0:
                continue
            buf = bytearray(n + 1)
            llama_model_meta_val_str_by_index(self.ptr, i, <char *> buf, n + 1)
            out[key] = bytes(buf[:n]).decode("utf-8", "replace")
        return out

    # -- vocabulary -----------------------------------------------------------------------------

    def tokenize(self, text, add_bos=True, special=False):
        """Text to token ids.

        ``add_bos`` adds the model's BOS (and EOS) token where the model asks for it;
        ``special`` parses special-token text such as ``<|im_start|>`` into their ids.
        """
        self._check()
        if not isinstance(text, str):
            raise InvalidArgumentError(f"text must be a str, got {type(text).__name__}")
        cdef bytes data = _utf8(text, "text")
        return self._tokenize_bytes(data, add_bos, special)

    cdef list _tokenize_bytes(self, bytes data, bint add_bos, bint special):
        cdef const char * cdata = data
        if len(data) > 0x7FFFFFFF // 2:
            raise InvalidArgumentError(f"text of {len(data)} bytes is too long to tokenize")
        cdef int32_t length = <int32_t> len(data)
        cdef int32_t cap = length + 8
        cdef vector[llama_token] toks
        cdef int32_t n
        toks.resize(cap)
        with nogil:
            n = llama_tokenize(self.vocab, cdata, length, toks.data(), cap, add_bos, special)
            if n < 0 and n != -2147483648:
                cap = -n
                toks.resize(cap)
                n = llama_tokenize(self.vocab, cdata, length, toks.data(), cap, add_bos, special)
        if n < 0:
            raise InvalidArgumentError(f"text of {length} bytes could not be tokenized (result too large)")
        return [toks[i] for i in range(n)]

    cdef int _prompt_tokens(self, object prompt, vector[llama_token] & toks) except -1:
        """A prompt's tokens (BOS added, special tokens parsed), checked to be a non-empty str."""
        if not isinstance(prompt, str):
            raise InvalidArgumentError(f"prompt must be a str, got {type(prompt).__name__}")
        if not prompt:
            raise InvalidArgumentError("prompt is empty; give some text to complete")
        cdef list ids = self._tokenize_bytes(_utf8(prompt, "prompt"), True, True)
        toks.clear()
        for t in ids:
            toks.push_back(t)
        return 0

    cdef int _prompt_or_tokens(self, object prompt, vector[llama_token] & toks) except -1:
        """A prompt given as text (a str) or as token ids."""
        if isinstance(prompt, str):
            return self._prompt_tokens(prompt, toks)
        return self._tokens_to_vector(prompt, toks)

    cdef int _tokens_to_vector(self, object tokens, vector[llama_token] & out) except -1:
        """Validate token ids against the vocabulary and copy them into a C vector."""
        if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__"):
            raise InvalidArgumentError(f"tokens must be a sequence of ints, got {type(tokens).__name__}")
        cdef Py_ssize_t i = 0
        try:
            items = iter(tokens)
        except TypeError:   # a 0-d numpy array, say
            raise InvalidArgumentError(f"tokens must be a 1-D sequence of ints, got {tokens!r}") from None
        out.clear()
        for tok in items:
            if isinstance(tok, bool) or not isinstance(tok, int):
                try:
                    if isinstance(tok, bool):
                        raise TypeError
                    tok = tok.__index__()   # numpy integers; not floats, not arrays
                except (AttributeError, TypeError):
                    raise InvalidArgumentError(
                        f"token at index {i} is {tok!r}, not an int token id (tokens must be 1-D)"
                    ) from None
            if tok < 0 or tok >= self._n_vocab:
                raise InvalidArgumentError(
                    f"token id {tok} at index {i} is outside the vocabulary [0, {self._n_vocab})"
                )
            out.push_back(<llama_token> tok)
            i += 1
        return 0

    def detokenize(self, tokens, remove_special=False, unparse_special=False):
        """Token ids to text. ``unparse_special`` renders special tokens as their text."""
        self._check()
        cdef vector[llama_token] toks
        self._tokens_to_vector(tokens, toks)
        if toks.size() == 0:
            return ""
        cdef int32_t cap = <int32_t> toks.size() * 8 + 16
        cdef string buf
        cdef int32_t n
        cdef bint rm = remove_special, unparse = unparse_special
        buf.resize(cap)
        with nogil:
            n = llama_detokenize(self.vocab, toks.data(), <int32_t> toks.size(), &buf[0], cap, rm, unparse)
            if n < 0:
                cap = -n
                buf.resize(cap)
                n = llama_detokenize(self.vocab, toks.data(), <int32_t> toks.size(), &buf[0], cap, rm, unparse)
        if n < 0:
            raise InvalidArgumentError("tokens could not be detokenized")
        return buf.substr(0, n).decode("utf-8", "replace")

    def token_is_eog(self, token):
        """True if ``token`` ends generation (EOS, EOT, ...)."""
        self._check()
        _check_int(token, "token", 0, self._n_vocab - 1)
        return bool(llama_vocab_is_eog(self.vocab, token))

    def apply_chat_template(self, messages, add_generation_prompt=True, *, chat_template=None, tools=None):
        """Format a chat with the model's chat template, or with ``chat_template`` (a Jinja
        template given as text).

        ``messages`` are ``(role, content)`` tuples or OpenAI-shaped dicts (``role``,
        ``content``, and for tool use ``tool_calls``, ``tool_call_id``, ``name``). ``tools`` is
        a list of OpenAI tool definitions (``{"type": "function", "function": {...}}``) that the
        template shows the model. Templates are rendered by llama.cpp's Jinja engine, so any
        template in a GGUF works; plain messages on a template that llama.cpp's built-in
        formats know give the text those formats give. ChatTemplateError when there is no
        template, it fails, or it cannot show ``tools``.

        >>> model.apply_chat_template([("user", "Hi")])   # doctest: +SKIP
        '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
        """
        self._check()
        msgs, plain = _chat_messages(messages)
        if tools is not None:
            tools = _chat_tools(tools)
        if chat_template is None and tools is None and plain:
            text = self._builtin_chat(msgs, add_generation_prompt)
            if text is not None:
                return text
        templates = self._templates() if chat_template is None else _ChatTemplates(self, chat_template)
        if tools and not templates.supports_tools:
            raise ChatTemplateError("this chat template cannot show the model tools; give one that can "
                                    "(chat_template=, --chat-template)")
        return templates.apply(msgs, tools=tools or None, add_generation_prompt=add_generation_prompt)["prompt"]

    cdef object _templates(self):
        """The model's own templates for llama.cpp's chat layer, parsed once."""
        if self._chat is None:
            self._chat = _ChatTemplates(self)
        return self._chat

    cdef object _builtin_chat(self, list msgs, bint add_generation_prompt):
        """llama_chat_apply_template's text, or None where it does not know the template."""
        cdef const char * tmpl = llama_model_chat_template(self.ptr, NULL)
        if tmpl == NULL:
            raise ChatTemplateError(f"model {self.path!r} has no chat template; format the prompt yourself "
                                    "or give one (chat_template=)")
        encoded = [(_utf8(m["role"], f"message {i} role").replace(b"\0", b""),
                    _utf8(m["content"], f"message {i} content").replace(b"\0", b"")) for i, m in enumerate(msgs)]
        cdef Py_ssize_t n_msg = len(encoded)
        cdef llama_chat_message * chat = <llama_chat_message *> malloc(n_msg * sizeof(llama_chat_message))
        if chat == NULL:
            raise MemoryError()
        cdef int32_t total = 64
        cdef int32_t n
        cdef bytearray buf
        try:
            for i in range(n_msg):
                chat[i].role = <const char *> encoded[i][0]
                chat[i].content = <const char *> encoded[i][1]
                total += len(encoded[i][0]) + len(encoded[i][1])
            buf = bytearray(total * 2)
            n = llama_chat_apply_template(tmpl, chat, n_msg, add_generation_prompt, <char *> buf, len(buf))
            if n > len(buf):
                buf = bytearray(n + 1)
                n = llama_chat_apply_template(tmpl, chat, n_msg, add_generation_prompt, <char *> buf, len(buf))
        finally:
            free(chat)
        if n < 0:
            return None
        return bytes(buf[:n]).decode("utf-8", "replace")


_MESSAGE_KEYS = {"role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content"}


cdef tuple _chat_messages(object messages):
    """Messages as OpenAI-shaped dicts, checked; and whether all are plain (role, content str)."""
    if isinstance(messages, (str, bytes, dict)) or not hasattr(messages, "__iter__"):
        raise ChatTemplateError("messages must be a list of (role, content) tuples or dicts")
    out = []
    plain = True
    for i, m in enumerate(messages):
        if isinstance(m, dict):
            if "role" not in m or ("content" not in m and "tool_calls" not in m):
                raise ChatTemplateError(f"message {i} needs 'role' and 'content' keys, got {sorted(m)}")
            unknown = sorted(set(m) - _MESSAGE_KEYS)
            if unknown:
                raise ChatTemplateError(f"message {i}: unknown key(s) {unknown}; a message has {sorted(_MESSAGE_KEYS)}")
            msg = {k: str.__str__(v) if k == "role" and isinstance(v, str) else v for k, v in m.items()}
        elif isinstance(m, (tuple, list)) and len(m) == 2:
            msg = {"role": m[0], "content": m[1]}
        else:
            raise ChatTemplateError(f"message {i} must be a (role, content) tuple or a dict, got {m!r}")
        role, content = msg["role"], msg.get("content")
        if not isinstance(role, str):
            raise ChatTemplateError(f"message {i}: role must be str, got {type(role).__name__}")
        if not role:
            raise ChatTemplateError(f"message {i} has an empty role")
        if isinstance(content, str):
            msg["content"] = str.__str__(content)   # a str subclass (numpy.str_, a str Enum) as its text
        elif content is not None and not isinstance(content, list):
            raise ChatTemplateError(f"message {i}: role and content must be str (content may also be a list of "
                                    f"text parts), got {type(role).__name__} and {type(content).__name__}")
        plain = plain and set(msg) == {"role", "content"} and isinstance(msg["content"], str)
        _check_json(msg, f"message {i}")
        out.append(msg)
    if not out:
        raise ChatTemplateError("messages is empty; give at least one message")
    return out, plain


cdef list _chat_tools(object tools):
    if not isinstance(tools, (list, tuple)):
        raise ChatTemplateError(f"tools must be a list of OpenAI tool definitions, got {type(tools).__name__}")
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(f, dict) \
                or not isinstance(f.get("name"), str) or not f["name"]:
            raise ChatTemplateError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                                    "'parameters': {...}}}}")
        if f.get("parameters") is not None and not isinstance(f["parameters"], dict):
            raise ChatTemplateError(f"tools[{i}].function.parameters must be a JSON schema object")
        if f.get("description") is not None and not isinstance(f["description"], str):
            raise ChatTemplateError(f"tools[{i}].function.description must be a str")
        _check_json(t, f"tools[{i}]")
    return list(tools)


cdef int _check_json(object value, str where) except -1:
    try:
        _jsonlib.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ChatTemplateError(f"{where} is not JSON: {exc}") from None
    return 0
