# LoraAdapter: a LoRA adapter file loaded for one model. Contexts and Engines apply adapters
# with a scale each (Context(adapters=[(adapter, scale)]), set_adapters); the adapter holds its
# model alive, and a context that applies it holds the adapter alive.

@cython.no_gc_clear   # __dealloc__ releases the model: the cycle collector must not clear it first
cdef class LoraAdapter:
    """A LoRA adapter (GGUF, ``general.type = "adapter"``) for one model; from
    :meth:`Model.load_adapter`.

    An adapter changes what a context computes only where that context applies it, so one
    model can serve contexts with and without it, or with different scales. All sequences of
    an :class:`Engine` share its context, so they share its adapters.

    >>> adapter = model.load_adapter("style-lora.gguf")                 # doctest: +SKIP
    >>> ctx = Context(model, adapters=[(adapter, 0.8)])                 # doctest: +SKIP
    """

    cdef llama_adapter_lora * ptr
    cdef readonly Model model        # keeps the model alive: llama.cpp frees adapters with it
    cdef readonly str path
    cdef int _users                  # open contexts that apply it; close() refuses while > 0

    def __cinit__(self):
        self.ptr = NULL
        self._users = 0

    def __init__(self):
        raise TypeError("use Model.load_adapter(path) to load a LoRA adapter")

    @staticmethod
    cdef LoraAdapter _load(Model model, str path):
        cdef bytes bpath = os.fsencode(path)
        cdef const char * cpath = bpath
        cdef llama_adapter_lora * ptr
        mark = _log_mark()
        with nogil:
            ptr = llama_adapter_lora_init(model.ptr, cpath)
        if ptr == NULL:
            why = _log_since(mark, logging.ERROR) or _log_since(mark)
            raise AdapterError(f"llama.cpp could not load LoRA adapter {path!r} for model {model.path!r}: "
                               + ("; ".join(why[-3:]) if why else "no reason was logged"))
        cdef LoraAdapter a = LoraAdapter.__new__(LoraAdapter)
        a.ptr = ptr
        a.model = model
        a.path = path
        model._acquire()
        return a

    cdef llama_adapter_lora * _ptr(self) except NULL:
        if self.ptr == NULL:
            raise ClosedError(f"LoRA adapter {self.path!r} is closed")
        return self.ptr

    @property
    def closed(self):
        return self.ptr == NULL

    @property
    def alpha(self):
        """The adapter's ``adapter.lora.alpha`` (0 when the file has none)."""
        cdef char buf[64]
        cdef int32_t n = llama_adapter_meta_val_str(self._ptr(), b"adapter.lora.alpha", buf, sizeof(buf))
        return float(buf[:n].decode()) if n > 0 else 0.0

    def close(self):
        """Free the adapter now (idempotent); refused while an open context applies it."""
        if self.ptr == NULL:
            return
        if self._users > 0:
            raise ContextBusyError(
                f"LoRA adapter {self.path!r} is applied by {self._users} open context(s); "
                "close them or set_adapters([]) on them first"
            )
        self._free()

    cdef void _free(self):
        llama_adapter_lora_free(self.ptr)
        self.ptr = NULL
        self.model._release()

    def __dealloc__(self):
        # Contexts that apply it hold it alive, so none is left here; no_gc_clear keeps model.
        if self.ptr != NULL:
            self._free()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<LoraAdapter {self.path!r}{' closed' if self.ptr == NULL else ''}>"


cdef tuple _check_adapters(Model model, object adapters):
    """[(LoraAdapter, scale), ...] checked by name: adapters of this model, finite scales."""
    if adapters is None:
        return ()
    if isinstance(adapters, (str, bytes, LoraAdapter)) or not hasattr(adapters, "__iter__"):
        raise InvalidArgumentError("adapters must be a list of (LoraAdapter, scale) pairs")
    out = []
    seen = set()
    for item in adapters:
        if not isinstance(item, tuple) or len(item) != 2 or not isinstance(item[0], LoraAdapter):
            raise InvalidArgumentError(f"adapters: {item!r} is not a (LoraAdapter, scale) pair")
        a, scale = item
        if (<LoraAdapter> a).model is not model:
            raise AdapterError(f"LoRA adapter {a.path!r} was loaded for model {a.model.path!r}, "
                               f"not {model.path!r}; load it with this model's load_adapter")
        (<LoraAdapter> a)._ptr()
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise InvalidArgumentError(f"adapter scale {scale!r} for {a.path!r} must be a finite number")
        if id(a) in seen:
            raise InvalidArgumentError(f"LoRA adapter {a.path!r} is listed twice")
        seen.add(id(a))
        out.append((a, float(scale)))
    return tuple(out)


cdef LoraAdapter _load_adapter(Model model, str path):
    return LoraAdapter._load(model, path)
