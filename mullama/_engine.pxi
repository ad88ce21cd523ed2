# Engine: continuous batching. One llama_context with n_parallel sequence slots, one engine
# thread; each step builds one batch (the next token of every running sequence plus prompt
# chunks of newly admitted ones), decodes it once without the GIL, samples per sequence.

import time as _time
import weakref as _weakref

from ._batching import EngineRequest, EngineStream, checked_prompt
from ._completion import completion_of, read_until_cancelled


def _engine_thread(engine_ref, kick, int nice):
    """The engine thread. It holds the Engine only while there is work, so an Engine that
    its user drops (without close()) is freed, and this thread ends with it."""
    _yield_to_waking_threads()
    if nice > 0:
        # ggml's compute threads are created by this thread and inherit its priority.
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        except (AttributeError, OSError):
            pass
    while True:
        engine = engine_ref()
        if engine is None or not (<Engine> engine)._run():
            return
        engine = None   # idle: let go, so that dropping the Engine frees it
        kick.wait(5.0)

cdef enum SlotState:
    SLOT_FREE = 0
    SLOT_PROMPT = 1
    SLOT_GEN = 2
    SLOT_DONE = 3
    SLOT_FOLLOW = 4           # waiting for another slot to decode the prefix it will copy


# The shortest cached prefix a request starts from. A shorter one (a BOS token, a template's
# first line) saves next to nothing, while decoding the prompt whole keeps a request's text
# independent of what its slot served before (llama.cpp's sums depend on the batch's shape).
cdef enum:
    REUSE_MIN = 32


cdef void _remove_value(vector[int] & v, int x) noexcept:
    cdef size_t k
    for k in range(v.size()):
        if v[k] == x:
            v.erase(v.begin() + k)
            return


def _common_prefix(list a, list b):
    cdef Py_ssize_t n = min(len(a), len(b)), k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


cdef struct ESlot:
    int state
    bint paused               # its consumer's buffer is full: skip it this step
    int n_past                # tokens of this sequence in the cache
    int prompt_pos            # prompt tokens decoded so far
    int n_prompt
    int step_take             # tokens this slot put into the current batch
    mullama_controls * ctl    # borrowed from its request's _Controls; its text is not yet delivered
    int max_tokens
    int n_generated
    llama_token pending       # sampled and delivered, not yet decoded
    int batch_idx             # where its logits are in this batch, -1 if none
    int finish
    bint sampled              # a token was generated this step


cdef int _shortest_prompt(ESlot * slots, vector[int] & admitted) noexcept nogil:
    """The slot still decoding its prompt, and not yet in this step, with the fewest prompt
    tokens left; the earliest admitted among equals. -1 if none."""
    cdef size_t a
    cdef int i, left, best = -1, best_left = 0
    for a in range(admitted.size()):
        i = admitted[a]
        left = slots[i].n_prompt - slots[i].prompt_pos
        if slots[i].state != SLOT_PROMPT or slots[i].step_take > 0 or left <= 0:
            continue
        if best < 0 or left < best_left:
            best, best_left = i, left
    return best


cdef void _fill_batch(NativeState * st, ESlot * slots, int n_slots,
                      vector[vector[llama_token]] & prompts) noexcept nogil:
    """The step's tokens in the order of their sequences: llama.cpp splits a batch into one
    pass per run of consecutive sequence ids (one cache stream per sequence), in batch order."""
    cdef int i, k, n = 0
    cdef ESlot * s
    for i in range(n_slots):
        s = &slots[i]
        if s.step_take == 0:
            continue
        if s.state == SLOT_GEN:
            _batch_put(st, n, s.pending, s.n_past, i, True)
            s.batch_idx = n
            n += 1
            continue
        for k in range(s.step_take):
            _batch_put(st, n + k, prompts[i][s.prompt_pos + k], s.prompt_pos + k, i, False)
        n += s.step_take
        if s.prompt_pos + s.step_take == s.n_prompt:
            st.batch.logits[n - 1] = 1
            s.batch_idx = n - 1


cdef int _engine_step(NativeState * st, const llama_vocab * vocab, ESlot * slots, int n_slots,
                      vector[vector[llama_token]] & prompts, vector[int] & admitted, int n_batch,
                      int prompt_chunk, int prompt_group, int n_ctx_seq, Decoded * decoded) noexcept nogil:
    """One decode for all running slots. Returns the batch size (0: nothing to do). A decode
    that does not succeed leaves its status in *decoded and the slots in the batch unchanged."""
    cdef int i, take, n = 0, prompt_n = 0
    cdef ESlot * s
    cdef llama_token tok
    cdef Choice chosen
    for i in range(n_slots):
        s = &slots[i]
        s.batch_idx = -1
        s.step_take = 0
        s.sampled = False
        if s.state != SLOT_GEN or s.paused:
            continue
        if s.n_generated >= s.max_tokens:
            s.finish = FINISH_LENGTH
            s.state = SLOT_DONE
            continue
        if s.n_past >= n_ctx_seq:
            s.finish = FINISH_CONTEXT
            s.state = SLOT_DONE
            continue
        s.step_take = 1
        n += 1
    # Prompt chunks fill what the running sequences leave, so they keep producing tokens: the
    # prompt with the fewest tokens left first (then the oldest), and a further one only if the
    # step's prompt tokens stay within prompt_group (where a step's time grows with its tokens,
    # decoding prompts together only delays the first tokens of the earlier ones).
    while n < n_batch:
        i = _shortest_prompt(slots, admitted)
        if i < 0:
            break
        s = &slots[i]
        take = s.n_prompt - s.prompt_pos
        if take > prompt_chunk:
            take = prompt_chunk
        if take > n_batch - n:
            take = n_batch - n
        if prompt_n > 0 and prompt_n + take > prompt_group:
            break
        s.step_take = take
        n += take
        prompt_n += take
    _fill_batch(st, slots, n_slots, prompts)
    if n == 0:
        return 0
    decoded[0] = _native_decode(st, n)
    if decoded[0] != DECODED:
        for i in range(n_slots):
            if slots[i].step_take > 0:
                _seq_rm(st, i, slots[i].n_past, -1)
        return n
    for i in range(n_slots):
        s = &slots[i]
        if s.step_take == 0:
            continue
        s.n_past += s.step_take
        if s.state == SLOT_PROMPT:
            s.prompt_pos += s.step_take
        if s.batch_idx < 0:
            continue
        if s.n_generated >= s.max_tokens:        # max_tokens=0: the prompt only
            s.finish = FINISH_LENGTH
            s.state = SLOT_DONE
            continue
        chosen = _choose(s.ctl, st.ctx, s.batch_idx, &tok)
        if chosen != CHOICE_TOKEN:
            s.finish = FINISH_NO_LOGITS if chosen == CHOICE_NO_LOGITS else \
                FINISH_NAN if chosen == CHOICE_NAN else FINISH_GRAMMAR
            s.state = SLOT_DONE
            continue
        if llama_vocab_is_eog(vocab, tok):
            s.finish = FINISH_STOP
            s.state = SLOT_DONE
            continue
        s.n_generated += 1
        s.sampled = True
        if mullama_take(s.ctl, vocab, tok):   # a stop string: the text is cut before it
            s.finish = FINISH_STOP
            s.state = SLOT_DONE
            continue
        s.pending = tok
        s.state = SLOT_GEN
    return n


cdef class Engine:
    """Continuous batching: one model, many concurrent requests, one decode per step.

    ``n_parallel`` requests run at once, each in its own sequence of ``n_ctx // n_parallel``
    tokens; more wait in arrival order. Prompts are decoded beside the running sequences' next
    tokens, in chunks of at most ``prompt_chunk`` tokens, the prompt with the fewest tokens left
    first; a step takes in a further prompt only if its prompt tokens stay within
    ``prompt_group`` (default 16 on a CPU, where decoding prompts together only delays the
    first tokens of the earlier ones, and ``n_batch`` when the model's layers are on a GPU).
    ``nice`` lowers the engine thread's priority (and that of its compute threads) so that an
    event loop in the same process stays responsive. ``flash_attn`` as for :class:`Context`
    (None: llama.cpp's choice, on for the CPU; there, off is faster for short turns deep into
    long chats, and slower for long prompts and for many streams: see BENCHMARKS.md).
    ``generate`` and ``stream`` may be called from many threads at once;
    :class:`mullama.aio.AsyncEngine` is the async front.

    >>> with Engine(model, n_parallel=4) as engine:                    # doctest: +SKIP
    ...     print(engine.generate("The capital of France is", 8))
    """

    cdef _NativeContext core          # owns the llama_context; keeps the model alive
    cdef ESlot * slots
    cdef int n_slots
    cdef vector[vector[llama_token]] prompts
    cdef vector[int] admitted        # the busy slots, in the order their requests were admitted
    cdef list requests               # the request in each slot, or None
    cdef list cached                 # the tokens a free slot's sequence still holds
    cdef list stuck                  # per slot: holds cells only a whole-cache clear removes
    cdef list follow                 # per slot: (leader slot, leader request, prefix length) or None
    cdef int share_min               # the fewest extra tokens worth copying another sequence for
    cdef object waiting              # deque of EngineRequest, arrival order
    cdef object qlock                # guards waiting; never held while taking a request's lock
    cdef object kick                 # set when there is something for the engine thread to do
    cdef object thread
    cdef bint closing
    cdef int prompt_chunk
    cdef int prompt_group
    cdef int _n_ctx_seq
    cdef readonly int n_parallel
    cdef object _done_times          # (time, n_tokens) of recent steps, for tokens/s
    cdef long long _generated_total
    cdef long long _reused_total      # prompt tokens found in the cache instead of decoded
    cdef long long _prompt_decoded_total
    cdef long long _steps
    cdef int _nice
    cdef object __weakref__

    def __cinit__(self):
        self.slots = NULL

    def __init__(self, Model model not None, *, n_parallel=8, n_ctx=None, n_batch=512, n_threads=0,
                 prompt_chunk=None, prompt_group=None, nice=0, adapters=None, flash_attn=None):
        model._check()
        applied = _check_adapters(model, adapters)
        _check_int(n_parallel, "n_parallel", 1, llama_max_parallel_sequences())
        if n_ctx is None:
            n_ctx = n_parallel * min(2048, max(8, model.n_ctx_train))
        _check_int(n_ctx, "n_ctx", n_parallel * 8, 1 << 24)
        _check_int(n_batch, "n_batch", max(n_parallel, 8), 1 << 16)
        self.core = _NativeContext.open(model, n_ctx, n_batch, n_threads, False, n_parallel, flash_attn, {}, None)
        if not self.core.has_memory():   # encoder-only: no logits to sample
            self.core.free()
            raise model._no_logits_error()
        self.core.set_adapters(applied)   # one context: every sequence shares them
        self.n_parallel = n_parallel
        self.n_slots = n_parallel
        self._n_ctx_seq = llama_n_ctx_seq(self.core.st.ctx)
        if prompt_chunk is None:
            prompt_chunk = max(32, n_batch // 2)
        self.prompt_chunk = _check_int(prompt_chunk, "prompt_chunk", 1, n_batch)
        if prompt_group is None:
            # On a CPU a decode's time grows about linearly with its tokens: prompts decoded
            # together all wait for the last of them. A GPU decodes a few hundred tokens in
            # about the time of one, so there they share steps.
            prompt_group = n_batch if model._offloaded else 16
        self.prompt_group = _check_int(prompt_group, "prompt_group", 1, 1 << 30)
        self._nice = _check_int(nice, "nice", 0, 19)
        self.slots = <ESlot *> malloc(n_parallel * sizeof(ESlot))
        if self.slots == NULL:
            raise MemoryError()
        for i in range(n_parallel):
            self.slots[i].state = SLOT_FREE
            self.slots[i].ctl = NULL
        self.prompts.resize(n_parallel)
        self.requests = [None] * n_parallel
        self.cached = [[] for _ in range(n_parallel)]
        self.stuck = [False] * n_parallel
        self.follow = [None] * n_parallel
        # Copying a sequence copies its whole cache stream: worth it for a long shared prefix.
        self.share_min = max(64, self._n_ctx_seq // 16)
        self.waiting = collections.deque()
        self.qlock = threading.Lock()
        self.kick = threading.Event()
        self.closing = False
        self._done_times = collections.deque(maxlen=256)
        self._generated_total = 0
        self._steps = 0
        self.thread = threading.Thread(target=_engine_thread, args=(_weakref.ref(self), self.kick, self._nice),
                                       name="mullama-engine", daemon=True)
        self.thread.start()

    @property
    def adapters(self):
        """The (LoraAdapter, scale) pairs every sequence of this engine computes with."""
        return self.core.adapters

    @property
    def n_ctx_per_sequence(self):
        return self._n_ctx_seq

    @property
    def model(self):
        return self.core.model

    @property
    def closed(self):
        return self.thread is None

    # -- submission (any thread) ---------------------------------------------------------------

    def submit(self, prompt, max_tokens=100, params=None, *, buffer=8, state=None, keep_state=False):
        """Queue a completion of ``prompt`` (text or token ids) and return its
        :class:`EngineRequest` at once; read it with ``EngineStream(request, engine)`` or
        ``mullama.aio.AsyncEngineStream``. Everything is checked here, before it is queued.
        :meth:`stream` and :meth:`complete` are the usual ways in."""
        if self.core.lost():
            raise self.core.failure(DECODE_RPC_LOST, "this Engine")
        if self.closing:
            raise ClosedError("this Engine is closed")
        # buffer=0 would pause the request for good: its consumer waits for a piece that the
        # engine never produces while the buffer is "full".
        _check_int(buffer, "buffer", 1, 1 << 30)
        cdef vector[llama_token] toks
        self.core.model._prompt_or_tokens(prompt, toks)
        if toks.size() == 0:
            raise InvalidArgumentError("prompt is empty; give at least one token of text")
        if <int> toks.size() > self._n_ctx_seq:
            raise ContextOverflowError(
                f"prompt is {toks.size()} tokens but each engine sequence holds {self._n_ctx_seq} "
                "(n_ctx // n_parallel); use a larger n_ctx or a shorter prompt"
            )
        _check_int(max_tokens, "max_tokens", 0, 1 << 30)
        # Made here, so that a bad grammar, stop or bias raises in the caller, not in a stream.
        controls = _Controls.make(params, self.core.model, self._n_ctx_seq)
        req = EngineRequest([toks[i] for i in range(toks.size())], max_tokens, controls, buffer, self.kick.set,
                            (<_Controls> controls).c.want_logprobs)
        req.saved = self._check_state(state, req.tokens)
        req.keep_state = bool(keep_state)
        with self.qlock:
            if self.closing:
                raise ClosedError("this Engine is closed")
            self.waiting.append(req)
        self.kick.set()
        return req

    cdef object _check_state(self, object state, list prompt):
        """A request's starting state, parsed and checked against the model, the sequence size
        and the prompt (whose beginning its tokens must be), or None."""
        if state is None:
            return None
        saved = _state.load(state, self.core.model, *self.core.state_layout(), "the state")
        if not saved.tokens or prompt[:len(saved.tokens)] != saved.tokens:
            raise InvalidArgumentError(
                f"the state holds {len(saved.tokens)} tokens that are not the beginning of this "
                f"prompt ({len(prompt)} tokens): send the conversation it was saved from, continued"
            )
        return saved

    def stream(self, prompt, max_tokens=100, params=None, *, buffer=8, state=None, keep_state=False):
        """Pieces of one completion, as an iterator; closing it (or leaving ``with``) cancels it.

        ``state`` (from an earlier request's ``keep_state=True`` on an engine of the same
        ``n_parallel`` and ``n_ctx``, or ``Context.get_state`` of a Context with those as
        ``n_seq_max`` and ``n_ctx``) starts the sequence from a saved conversation whose
        tokens begin ``prompt``: only the rest is decoded. ``keep_state=True`` saves the
        sequence as the request ends (``stream.state``), so a server can persist a long
        conversation between requests or restarts."""
        return EngineStream(self.submit(checked_prompt(prompt, True), max_tokens, params, buffer=buffer, state=state,
                                        keep_state=keep_state), self)

    def stream_from_tokens(self, tokens, max_tokens=100, params=None, *, buffer=8, state=None, keep_state=False):
        return EngineStream(self.submit(checked_prompt(tokens, False), max_tokens, params, buffer=buffer, state=state,
                                        keep_state=keep_state), self)

    def generate(self, prompt, max_tokens=100, params=None):
        """Complete ``prompt`` alongside the other requests; returns the new text."""
        with self.stream(prompt, max_tokens, params, buffer=1 << 30) as s:
            return "".join(s)

    def generate_from_tokens(self, tokens, max_tokens=100, params=None):
        with self.stream_from_tokens(tokens, max_tokens, params, buffer=1 << 30) as s:
            return "".join(s)

    def complete(self, prompt, max_tokens=100, params=None, *, state=None, keep_state=False):
        """Like :meth:`Context.complete`: a :class:`Completion` of ``prompt`` (text or token
        ids), decoded alongside the other requests in a sequence of its own. ``state`` and
        ``keep_state`` as for :meth:`stream`; the saved state is ``Completion.state``."""
        req = self.submit(prompt, max_tokens, params, buffer=1 << 30, state=state, keep_state=keep_state)
        with EngineStream(req, self) as s:
            return completion_of(s, read_until_cancelled(s))

    def cached_prefix(self, prompt):
        """How many leading tokens of ``prompt`` (text or token ids) a free slot's cache holds
        now (0 below the 32 a slot is reused for), so that a request for it admitted at once
        decodes only the rest, and its ``state=`` is not restored unless it holds more. A hint
        for a caller keeping its own states (checking one reads megabytes): slots change as
        requests come and go."""
        cdef vector[llama_token] toks
        self.core.model._prompt_or_tokens(prompt, toks)
        cdef size_t k
        cdef int held = 0
        self._cached_slot([toks[k] for k in range(toks.size())], &held)   # what the request would start from
        return held if held >= REUSE_MIN else 0

    def stats(self):
        """Running and waiting requests, slot use, recent generated tokens per second, and
        the prompt tokens decoded and those found in the cache (a slot's earlier request, a
        running request's shared prefix, or a ``state``) since the engine started."""
        now = _time.monotonic()
        recent = [(t, n) for t, n in list(self._done_times) if now - t <= 5.0]
        tps = 0.0
        if len(recent) >= 2 and recent[-1][0] > recent[0][0]:
            tps = sum(n for _, n in recent[1:]) / (recent[-1][0] - recent[0][0])
        running = sum(1 for r in self.requests if r is not None)
        return {
            "running": running,
            "waiting": sum(1 for r in list(self.waiting) if not r.cancelled),
            "slots": self.n_slots,
            "slot_use": running / self.n_slots,
            "tokens_per_second": tps,
            "generated_tokens": self._generated_total,
            "prompt_tokens_decoded": self._prompt_decoded_total,
            "reused_tokens": self._reused_total,
            "steps": self._steps,
        }

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self):
        """Serve requests until there are none (returns True) or the engine closes (False)."""
        cdef int rc, i
        cdef Decoded decoded = DECODED
        cdef NativeState * st = &self.core.st
        cdef const llama_vocab * vocab = self.core.model.vocab
        cdef int n_batch = self.core.n_batch
        self.core.arm_for_thread()   # this thread polls no signals: only the main thread gets them
        while not self.closing:
            if self.core.lost():   # lost by another context of its servers: touch nothing
                self._lose_all()
                return False
            self.kick.clear()   # before looking for work: a later set() wakes the thread's wait
            self._advance_followers()   # first: a new request may take a leader's freed slot
            self._admit()
            self._reap_cancelled()
            self._sweep_waiting()
            if all(r is None for r in self.requests):
                if not self._unstick():
                    return True
                continue   # the slots are usable again: admit what waited for them
            for i in range(self.n_slots):
                r = self.requests[i]
                self.slots[i].paused = r is not None and r.full
            with nogil:
                rc = _engine_step(st, vocab, self.slots, self.n_slots, self.prompts, self.admitted, n_batch,
                                  self.prompt_chunk, self.prompt_group, self._n_ctx_seq, &decoded)
            self._steps += 1
            if decoded == DECODE_RPC_LOST:
                self._lose_all()
                return False
            if decoded != DECODED:
                self._fail_batch(decoded)
                decoded = DECODED
                continue
            self._deliver()
            if rc == 0:
                self.kick.wait(0.05)   # every running slot is paused by its consumer
        for i in range(self.n_slots):
            if self.requests[i] is not None:
                self._free_slot(i, None, ClosedError("the Engine was closed"))
        with self.qlock:
            left = list(self.waiting)
            self.waiting.clear()
        for r in left:
            r.finish(None, ClosedError("the Engine was closed"))
        return False

    cdef void _admit(self):
        """Give waiting requests the free slots that keep the busy ones consecutive, each
        starting from the longest beginning of its prompt that a free slot's cache holds
        (copied over when it is another slot's); a longer one being decoded by another slot
        is copied once decoded."""
        cdef int i, src, common = 0
        while any(self._usable(i) for i in range(self.n_slots)):
            req = self._next_waiting()
            if req is None:
                return
            src = self._cached_slot(req.tokens, &common)
            if common < REUSE_MIN:
                src = -1
            i = self._place(src)
            if src < 0:
                src = i
            held = self.cached[src]
            self.cached[i] = []
            self._start_slot(i, req)
            if req.saved is not None and not REUSE_MIN <= len(req.saved.tokens) <= _common_prefix(held, req.tokens):
                self._restore_slot(i, req)
                continue
            req.saved = None   # no state, or the cache holds at least as much as it
            if src != i:
                self.core.copy_sequence(src, i)   # a stream's copy: a few MB, less than a decode
            self._reuse_prefix(i, req, held)

    cdef object _next_waiting(self):
        while True:
            with self.qlock:
                req = self.waiting.popleft() if self.waiting else None
            if req is None or not req.cancelled:
                return req
            req.finish("cancelled", GenerationCancelled("the request was cancelled"))

    cdef bint _usable(self, int i):
        """Whether slot i can take a request now."""
        return self.requests[i] is None and not self.stuck[i]

    cdef bint _unstick(self):
        """With no request running, clear the whole cache if a failed restore left cells
        that nothing else removes; whether it did."""
        if not any(self.stuck):
            return False
        self.core.clear()
        self.cached = [[] for _ in range(self.n_slots)]
        self.stuck = [False] * self.n_slots
        return True

    cdef int _cached_slot(self, list toks, int * prefix):
        """The free slot whose cache holds the longest beginning of toks (its length in
        *prefix); among equals, the least cached."""
        cdef int i, best = -1, best_common = -1
        for i in range(self.n_slots):
            if not self._usable(i):
                continue
            common = _common_prefix(self.cached[i], toks)
            if common > best_common or (common == best_common and len(self.cached[i]) < len(self.cached[best])):
                best, best_common = i, common
        prefix[0] = best_common
        return best

    cdef int _runs_with(self, int i):
        """How many runs of consecutive busy slots there are with slot i busy too."""
        cdef int j, runs = 0
        cdef bint busy, before = False
        for j in range(self.n_slots):
            busy = j == i or self.requests[j] is not None
            if busy and not before:
                runs += 1
            before = busy
        return runs

    cdef int _place(self, int cached):
        """The free slot for a new request. With one cache stream per sequence, llama.cpp
        decodes a batch in one pass per run of consecutive sequence ids, so the slot that keeps
        the busy ones in the fewest runs; among equals, the one holding the request's cached
        prefix (``cached``, or -1), then the least cached."""
        cdef int i, best = -1
        best_key = None
        for i in range(self.n_slots):
            if not self._usable(i):
                continue
            key = (self._runs_with(i), i != cached, len(self.cached[i]))
            if best_key is None or key < best_key:
                best, best_key = i, key
        return best

    cdef void _start_slot(self, int i, object req):
        cdef ESlot * s = &self.slots[i]
        self.slots[i].ctl = (<_Controls> req.params).c
        self.prompts[i].clear()
        for t in req.tokens:
            self.prompts[i].push_back(t)
        s.state = SLOT_PROMPT
        s.paused = False
        s.n_past = 0
        s.prompt_pos = 0
        s.n_prompt = <int> self.prompts[i].size()
        s.max_tokens = req.max_tokens
        s.n_generated = 0
        s.pending = -1
        s.finish = FINISH_NONE
        req.slot = i
        self.requests[i] = req
        self.admitted.push_back(i)

    cdef void _reuse_prefix(self, int i, object req, list held):
        """Keep what slot i's cache shares with the prompt, or follow a busy slot that holds
        (or is decoding) a longer part of it. The prompt's last token is always decoded."""
        toks = req.tokens
        cdef int limit = len(toks) - 1
        cdef int own = min(_common_prefix(held, toks), limit)
        if own < REUSE_MIN:
            own = 0   # saves next to nothing, and the text then never depends on the slot's past
        cdef int j, leader = -1, longest = own + self.share_min - 1
        for j in range(self.n_slots):
            r = self.requests[j]
            if j == i or r is None or self.slots[j].state == SLOT_FOLLOW:
                continue
            common = min(_common_prefix(r.tokens, toks), limit)
            if common > longest:
                leader, longest = j, common
        if leader >= 0:
            self.slots[i].state = SLOT_FOLLOW
            self.follow[i] = (leader, self.requests[leader], longest)
            return
        self._resume_at(i, self.core.keep_prefix(i, own))

    cdef void _resume_at(self, int i, int keep):
        self.slots[i].n_past = keep
        self.slots[i].prompt_pos = keep
        self.requests[i].reused = keep
        self._reused_total += keep
        self._prompt_decoded_total += self.slots[i].n_prompt - keep

    cdef void _advance_followers(self):
        """Followers whose leader has decoded the shared prefix copy its sequence; a follower
        whose leader ended early decodes its prompt itself."""
        cdef int i, leader, upto
        for i in range(self.n_slots):
            if self.follow[i] is None or self.requests[i] is None:
                continue
            leader, leader_req, upto = self.follow[i]
            running = self.requests[leader] is leader_req
            if running and self.slots[leader].n_past < upto:
                continue   # not decoded that far yet
            self.follow[i] = None
            self.slots[i].state = SLOT_PROMPT
            toks = self.requests[i].tokens
            if running or (self.requests[leader] is None and _common_prefix(self.cached[leader], toks) >= upto):
                self.core.copy_sequence(leader, i)
                self._resume_at(i, self.core.keep_prefix(i, upto))
            else:
                self._resume_at(i, self.core.keep_prefix(i, 0))

    cdef void _restore_slot(self, int i, object req):
        """Start slot i from the request's saved state: its tokens begin the prompt (checked at
        submission); the prompt's last token is decoded again, for its logits."""
        saved, req.saved = req.saved, None
        cdef int n = len(saved.tokens)
        cdef SeqRestore restored = self.core.set_seq_state(i, saved.blob, n)
        if restored == SEQ_STUCK:
            # Its sequence would see those cells: the slot waits for the engine to be idle.
            self.stuck[i] = True
        if restored != SEQ_RESTORED:
            self._free_slot(i, None, StateError(
                "the state could not be loaded into an engine sequence: llama.cpp refused its cache "
                "(another cache type or layout?), or its cells are not at the positions of its tokens"))
            return
        self._resume_at(i, self.core.keep_prefix(i, min(n, self.slots[i].n_prompt - 1)))

    cdef object _saved_state(self, int i, object r):
        """The state of slot i's sequence as request r ends: its cache and the tokens in it."""
        try:
            return _state.pack(self.core.model, *self.core.state_layout(), self._held_tokens(i, r),
                               self.core.seq_state(i))
        except StateError:
            logging.getLogger("mullama").warning("could not save the state of an engine sequence")
            return None

    cdef void _sweep_waiting(self):
        """Finish waiting requests that were cancelled before they got a slot."""
        with self.qlock:
            if not any(r.cancelled for r in self.waiting):
                return
            gone = [r for r in self.waiting if r.cancelled]
            kept = [r for r in self.waiting if not r.cancelled]
            self.waiting.clear()
            self.waiting.extend(kept)
        for r in gone:
            r.finish("cancelled", GenerationCancelled("the request was cancelled"))

    cdef void _reap_cancelled(self):
        cdef int i
        for i in range(self.n_slots):
            r = self.requests[i]
            if r is not None and r.cancelled:
                self._free_slot(i, "cancelled", None)

    cdef void _free_slot(self, int i, object reason, object error):
        """Let slot i's request go. Its sequence stays in the cache for a later prompt that
        begins the same way, unless the request failed."""
        r = self.requests[i]
        if r is not None and r.keep_state and error is None and reason != "cancelled":
            r.state = self._saved_state(i, r)
        self.requests[i] = None
        self.follow[i] = None
        self.slots[i].ctl = NULL
        self.slots[i].state = SLOT_FREE
        _remove_value(self.admitted, i)
        if r is None or error is not None:
            _seq_rm(&self.core.st, i, -1, -1)
            self.cached[i] = []
        else:
            self.cached[i] = self._held_tokens(i, r)
        self.prompts[i].clear()
        if r is not None:
            r.params = None   # the controls: their candidate array is n_vocab entries long
            r.finish(reason, error)

    cdef list _held_tokens(self, int i, object r):
        """The tokens slot i's sequence holds: the prompt, then what was generated, n_past in all."""
        cdef int n_past = self.slots[i].n_past
        held = list(r.tokens[:n_past])
        if n_past > len(r.tokens):
            held += r.generated[:n_past - len(r.tokens)]
        return held

    cdef void _deliver(self):
        cdef int i, produced = 0
        cdef size_t n
        cdef ESlot * s
        for i in range(self.n_slots):
            r = self.requests[i]
            if r is None:
                continue
            s = &self.slots[i]
            if r.cancelled:
                self._free_slot(i, "cancelled", None)
                continue
            if s.sampled:
                produced += 1
                r.completion_tokens = s.n_generated
                _collect(self.core.model, s.ctl, r.generated, r.logprobs)
            if s.state == SLOT_DONE and s.finish == FINISH_NO_LOGITS:
                self._free_slot(i, None, self.core.model._no_logits_error())
                continue
            if s.state == SLOT_DONE and s.finish == FINISH_NAN:
                self._free_slot(i, None, self.core.model._nan_logits_error())
                continue
            if s.state == SLOT_DONE:
                if s.ctl.text.size():
                    r.push(s.ctl.text.decode("utf-8", "replace"))
                self._free_slot(i, _FINISH_NAMES.get(s.finish), None)
                continue
            n = mullama_ready(s.ctl)
            if n > 0:
                r.push(s.ctl.text.substr(0, n).decode("utf-8", "replace"))
                s.ctl.text.erase(0, n)
        self._generated_total += produced
        self._done_times.append((_time.monotonic(), produced))

    cdef void _lose_all(self):
        """The model's RPC servers are lost: every request ends with the error, new ones are
        refused, and nothing touches the context again (not even to clear a sequence)."""
        error = self.core.failure(DECODE_RPC_LOST, "decoding an engine batch")
        with self.qlock:
            self.closing = True
            left = list(self.waiting)
            self.waiting.clear()
        for i in range(self.n_slots):
            r, self.requests[i] = self.requests[i], None
            if r is not None:
                r.finish(None, error)
        for r in left:
            r.finish(None, error)

    cdef void _fail_batch(self, Decoded decoded):
        cdef int i
        for i in range(self.n_slots):
            if self.requests[i] is not None and self.slots[i].step_take > 0:
                if decoded == DECODE_ABORTED:
                    # Only close() aborts an engine decode: the requests end as the close says.
                    error = ClosedError("the Engine was closed")
                else:
                    error = self.core.failure(decoded, "decoding an engine batch")
                self._free_slot(i, None, error)

    # -- lifetime --------------------------------------------------------------------------------

    def close(self):
        """Stop the engine thread (running requests end with ClosedError) and free the context."""
        if self.thread is None:
            return
        with self.qlock:
            self.closing = True
        self.core.cancel_running()   # a long prompt decode stops within one ggml node, not at its end
        self.kick.set()
        if self.thread is not threading.current_thread():
            self.thread.join()
        self.thread = None
        self.core.free()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __dealloc__(self):
        cdef int i
        if self.kick is not None:
            try:
                self.kick.set()   # dropped without close(): the idle engine thread sees it and ends
            except AttributeError:
                pass   # the garbage collector cleared the event with this engine: no thread holds it
        if self.slots != NULL:   # the controls belong to the requests
            free(self.slots)
            self.slots = NULL
