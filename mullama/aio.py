"""The async API: the sync core driven from asyncio (uvloop included) or trio, through anyio.

Names and parameters mirror the sync API. Each call runs the native loop in one worker thread;
a stream hands its pieces to the event loop through a bounded buffer, so a slow consumer pauses
the native loop (which waits without the GIL) instead of growing memory. Leaving a stream early
(``break``, ``aclose()``, cancellation, a timeout, garbage collection) stops the native loop
within one token and frees the context for the next caller.

>>> async def main():                                                    # doctest: +SKIP
...     model = await mullama.aio.load_model(mullama.models.fetch())
...     async with mullama.aio.AsyncContext(model, n_ctx=2048) as actx:
...         async with actx.stream("Once upon a time", max_tokens=64) as stream:
...             async for piece in stream:
...                 print(piece, end="")
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import anyio
import sniffio

from ._errors import ContextBusyError, GenerationCancelled, InvalidArgumentError, WrongEventLoopError
from ._batching import EngineRequest, PieceBuffer, RequestView, checked_prompt
from ._completion import Completion, TokenLogprob, Usage, completion_of, read_until_cancelled
from ._llama import (Context, EmbeddingGenerator, Engine, LoraAdapter, Model, Reranker, TokenStream,
                     _yield_to_waking_threads)

__all__ = ["load_model", "AsyncContext", "AsyncTokenStream", "AsyncEmbeddingGenerator", "AsyncReranker", "AsyncEngine",
           "AsyncEngineStream"]

T = TypeVar("T")


def _running_loop() -> Any:
    """The running event loop: an asyncio loop or a trio run's token."""
    try:
        lib = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        raise WrongEventLoopError("mullama.aio is used from async code: no event loop is running here") from None
    if lib == "asyncio":
        return asyncio.get_running_loop()
    if lib == "trio":
        import trio

        return trio.lowlevel.current_trio_token()
    raise WrongEventLoopError(f"mullama.aio does not support the {lib!r} event loop")  # pragma: no cover


def _loop_finished(loop: Any) -> bool:
    """True once nothing can be waiting on loop any more (closed, stopped, run over)."""
    if hasattr(loop, "is_closed"):
        return bool(loop.is_closed() or not loop.is_running())
    import trio

    try:
        loop.run_sync_soon(lambda: None)
    except trio.RunFinishedError:
        return True
    return False


class _LoopBound:
    """Bound to the event loop that first uses it. Its turnstile and events belong to that
    loop: another loop's thread setting them would deadlock, so use from a second loop raises
    at once. Once the first loop is over (asyncio.run returned), the next loop takes over."""

    _loop: Any = None
    _loop_lock = threading.Lock()

    def _bind_loop(self) -> None:
        if self._loop is not None and self._loop is asyncio._get_running_loop():
            return   # the asyncio loop it is bound to: checked without looking up the library
        loop = _running_loop()
        with self._loop_lock:
            if self._loop is None or self._loop is loop or _loop_finished(self._loop):
                self._loop = loop
                return
        raise WrongEventLoopError(
            f"this {type(self).__name__} belongs to another event loop that is still running "
            "(in another thread?); create one per event loop"
        )


def _check_buffer(buffer: object) -> int:
    if isinstance(buffer, bool) or not isinstance(buffer, int) or not 1 <= buffer <= 1 << 30:
        raise InvalidArgumentError(f"buffer={buffer!r} must be an int in [1, {1 << 30}] (pieces held for the consumer)")
    return buffer


class _Waker:
    """A thread-safe, non-blocking way to run a callback in the current event loop's thread,
    and the cheapest event of that loop for a task to wait on (an asyncio loop's own: anyio's
    looks up the running library every time it is made, once per piece of a stream)."""

    __slots__ = ("_call", "event")

    def __init__(self) -> None:
        loop = _running_loop()
        if hasattr(loop, "call_soon_threadsafe"):
            self._call = loop.call_soon_threadsafe
            self.event: Callable[[], Any] = asyncio.Event
        else:
            self._call = loop.run_sync_soon
            self.event = anyio.Event

    def __call__(self, fn: Callable[[], object]) -> None:
        try:
            self._call(fn)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _yield_cpu_to_the_event_loop() -> None:
    """Let the event loop's thread preempt this worker's native loop the moment it wakes.

    Not by a lower priority: llama.cpp's compute threads (started by the worker, inheriting its
    scheduling) wait for each other at every step, so a worker niced below a busy process
    starved them all (measured on 2 cores: 45 s against 0.28 s for 16 tokens). A long time
    slice keeps their share of the CPU and lets waking threads in first (Linux 6.12+)."""
    _yield_to_waking_threads()


class _Turnstile:
    """A FIFO lock for one context: callers get their turn in arrival order.

    Unlike anyio.Lock it can be released from a plain callback in the loop thread, which is
    how a worker thread hands the context back when its stream was dropped without aclose().
    """

    def __init__(self) -> None:
        self._busy = False
        self._waiters: collections.deque[anyio.Event] = collections.deque()

    @property
    def busy(self) -> bool:
        return self._busy

    async def acquire(self) -> None:
        if not self._busy and not self._waiters:
            self._busy = True
            return
        turn = anyio.Event()
        self._waiters.append(turn)
        try:
            await turn.wait()
        except BaseException:
            if turn in self._waiters:
                self._waiters.remove(turn)
            else:  # the turn was handed to us as we were cancelled: pass it on
                self.release()
            raise

    def release(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()  # busy stays True: handed over
        else:
            self._busy = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


async def _run_in_thread(fn: Callable[[], T], cancel: Callable[[], None] | None = None) -> T:
    """Run fn in a new worker thread; on cancellation call cancel() and wait for the thread."""
    wake = _Waker()
    done = anyio.Event()
    box: dict[str, Any] = {}

    def work() -> None:
        _yield_cpu_to_the_event_loop()
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the awaiting task
            box["error"] = exc
        finally:
            wake(done.set)

    threading.Thread(target=work, name="mullama-worker", daemon=True).start()
    try:
        await done.wait()
    except BaseException:
        if cancel is not None:
            cancel()
        with anyio.CancelScope(shield=True):
            await done.wait()
        raise
    if "error" in box:
        raise box["error"]
    return box["result"]


async def load_model(path: Any, **params: Any) -> Model:
    """``Model.load`` in a worker thread: loading takes seconds and must not block the loop."""
    return await _run_in_thread(lambda: Model.load(path, **params))


async def _next_from(buf: PieceBuffer, wake: _Waker) -> str | None:
    """The next piece of buf, None at the end, awaiting the producer's notice when it has none."""
    while True:
        with buf.cond:
            try:
                return buf.take()
            except BlockingIOError:
                event = wake.event()
                buf.waker = lambda: wake(event.set)
        await event.wait()


class _StreamWorker:
    """A worker thread running one TokenStream into a PieceBuffer. It holds only this, never
    the AsyncTokenStream, so a stream dropped by its consumer can be garbage collected (and its
    __del__ can stop the worker)."""

    def __init__(self, owner: AsyncContext, stream: TokenStream, buf: PieceBuffer) -> None:
        self.owner = owner
        self.sync = stream
        self.buf = buf
        self.ended = anyio.Event()
        self.wake = _Waker()

    def work(self) -> None:
        _yield_cpu_to_the_event_loop()
        stream, buf = self.sync, self.buf
        error: BaseException | None = None
        try:
            with stream:
                for piece in stream:
                    if not buf.push_wait(piece):   # backpressure: the native loop waits here
                        break
        except GenerationCancelled as exc:
            if not buf.closing:
                error = exc
        except BaseException as exc:  # noqa: BLE001 - crosses to the awaiting task unchanged
            error = exc
        finally:
            buf.finish(stream.finish_reason, error)
            self.wake(self.hand_back)

    def hand_back(self) -> None:
        # One callback in the loop thread: whoever wakes on `ended` finds the context free.
        self.owner._streams.discard(self)
        self.owner._gate.release()
        self.ended.set()

    def cancel(self) -> None:
        self.buf.leave()
        self.sync.cancel()


class AsyncTokenStream:
    """Pieces of one generation, as an async iterator and an async context manager.

    The native loop runs in a worker thread and fills a buffer of ``buffer`` pieces; when the
    buffer is full it waits (without the GIL) until the consumer takes one. One task iterates
    it at a time; ``aclose()`` may come from any task of the same event loop.
    """

    _worker: _StreamWorker | None = None
    _closed = True

    def __init__(self, actx: AsyncContext, stream: TokenStream, buffer: int) -> None:
        self._actx = actx  # keeps the context (and its model) alive
        self._sync = stream  # validated and numbered; it claims the context only in the worker
        self._buf = PieceBuffer(buffer)
        self._closed = False
        self._reading = False

    @property
    def finish_reason(self) -> str | None:
        """"stop", "length", "context" or "cancelled" once the stream has ended."""
        return self._sync.finish_reason

    @property
    def prompt_tokens(self) -> int:
        return self._sync.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far."""
        return self._sync.completion_tokens

    @property
    def tokens(self) -> list[int]:
        """The ids of the tokens generated so far."""
        return self._sync.tokens

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        """A TokenLogprob per generated token so far, or None unless the params asked for them."""
        return self._sync.logprobs

    @property
    def usage(self) -> Usage:
        return self._sync.usage

    def cancel(self) -> None:
        """Stop the native loop within one token; iterating then raises GenerationCancelled."""
        self._sync.cancel()

    async def aread(self) -> str:
        """The rest of the text, once the generation has ended (an event-loop wake-up per
        ``buffer`` pieces, not per piece)."""
        with self._buf.cond:
            self._buf.wake_each = False
        return "".join([piece async for piece in self])

    async def _start(self) -> _StreamWorker:
        if self._worker is not None:
            return self._worker
        actx = self._actx
        actx._bind_loop()
        worker = _StreamWorker(actx, self._sync, self._buf)
        await actx._gate.acquire()
        try:
            threading.Thread(target=worker.work, name="mullama-stream", daemon=True).start()
        except BaseException:
            actx._gate.release()
            raise
        actx._streams.add(worker)
        self._worker = worker
        return worker

    def __aiter__(self) -> AsyncTokenStream:
        return self

    async def __anext__(self) -> str:
        if self._closed:
            raise StopAsyncIteration
        if self._reading:
            raise ContextBusyError("another task is already awaiting this stream's next piece")
        self._reading = True
        try:
            piece = await self._next_piece()
        finally:
            self._reading = False
        if piece is None:
            self._closed = True
            raise StopAsyncIteration
        return piece

    async def _next_piece(self) -> str | None:
        self._actx._bind_loop()
        worker = await self._start()
        try:
            return await _next_from(self._buf, worker.wake)
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Stop the native loop (within one token) and wait until the context is free again."""
        self._actx._bind_loop()
        self._closed = True
        if self._worker is None:
            self._sync.close()   # never started: it holds nothing, but its sampler goes now
            return
        self._worker.cancel()
        with anyio.CancelScope(shield=True):
            await self._worker.ended.wait()

    async def __aenter__(self) -> AsyncTokenStream:
        await self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Dropped without aclose(): stop the worker; it hands the context back by itself.
        if self._worker is not None and not self._buf.finished:
            self._worker.cancel()


class AsyncContext(_LoopBound):
    """The async twin of :class:`mullama.Context`: the same methods, awaitable.

    Calls on one AsyncContext wait their turn in arrival order; use several contexts (or the
    batching engine) to serve requests at the same time. Leaving ``async with`` (or
    ``aclose()``) stops any stream still open on it first.
    """

    def __init__(self, model: Model, *, n_ctx: int = 0, n_batch: int = 2048, n_threads: int = 0,
                 embeddings: bool = False, n_seq_max: int = 1, flash_attn: bool | None = None,
                 rope_scaling: str | None = None, rope_freq_base: float | None = None,
                 rope_freq_scale: float | None = None, yarn_ext_factor: float | None = None,
                 yarn_attn_factor: float | None = None, yarn_beta_fast: float | None = None,
                 yarn_beta_slow: float | None = None, yarn_orig_ctx: int | None = None,
                 adapters: Iterable[tuple[LoraAdapter, float]] | None = None) -> None:
        self.context = Context(
            model, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, embeddings=embeddings, n_seq_max=n_seq_max,
            flash_attn=flash_attn, rope_scaling=rope_scaling, rope_freq_base=rope_freq_base,  # type: ignore[arg-type]
            rope_freq_scale=rope_freq_scale, yarn_ext_factor=yarn_ext_factor, yarn_attn_factor=yarn_attn_factor,
            yarn_beta_fast=yarn_beta_fast, yarn_beta_slow=yarn_beta_slow, yarn_orig_ctx=yarn_orig_ctx,
            adapters=adapters)
        self._gate = _Turnstile()
        self._streams: set[_StreamWorker] = set()   # started and not yet handed back

    @property
    def model(self) -> Model:
        return self.context.model

    @property
    def n_ctx(self) -> int:
        return self.context.n_ctx

    @property
    def n_batch(self) -> int:
        return self.context.n_batch

    @property
    def n_threads(self) -> int:
        return self.context.n_threads

    @property
    def n_past(self) -> int:
        return self.context.n_past

    @property
    def cached_tokens(self) -> list[int]:
        return self.context.cached_tokens

    @property
    def closed(self) -> bool:
        return self.context.closed

    @property
    def last_finish_reason(self) -> str | None:
        return self.context.last_finish_reason

    @property
    def last_reused_tokens(self) -> int:
        return self.context.last_reused_tokens

    @property
    def last_evaluated_tokens(self) -> int:
        return self.context.last_evaluated_tokens

    @property
    def total_evaluated_tokens(self) -> int:
        return self.context.total_evaluated_tokens

    @property
    def busy(self) -> bool:
        """True while a call or a stream owns the context (or is queued for it)."""
        return self._gate.busy or self.context.busy

    def cancel(self) -> None:
        """Stop the generations started on this context (see :meth:`mullama.Context.cancel`)."""
        self.context.cancel()

    async def _call(self, fn: Callable[[], T], cancel: Callable[[], None] | None = None) -> T:
        self._bind_loop()
        async with self._gate:
            return await _run_in_thread(fn, cancel)

    async def _joined(self, stream: TokenStream) -> str:
        # The sync stream joined inside the worker: no event-loop hop per token, and a
        # cancel reaches the native loop even before the worker has started it.
        def run() -> str:
            with stream:
                return "".join(stream)

        return await self._call(run, stream.cancel)

    async def generate(self, prompt: str, max_tokens: int = 100, params: Any = None) -> str:
        """Complete ``prompt``; cancelling the awaiting task stops the native loop."""
        return await self._joined(self.context.generate_stream(prompt, max_tokens, params))

    async def generate_from_tokens(self, tokens: Sequence[int], max_tokens: int = 100, params: Any = None) -> str:
        return await self._joined(self.context.generate_stream_from_tokens(tokens, max_tokens, params))

    async def complete(self, prompt: str | Sequence[int], max_tokens: int = 100, params: Any = None) -> Completion:
        """A :class:`Completion` of ``prompt`` (text or token ids), as :meth:`mullama.Context.complete`."""
        if isinstance(prompt, str):
            stream = self.context.generate_stream(prompt, max_tokens, params)
        else:
            stream = self.context.generate_stream_from_tokens(prompt, max_tokens, params)

        def run() -> Completion:
            with stream:
                return completion_of(stream, read_until_cancelled(stream))

        return await self._call(run, stream.cancel)

    def stream(self, prompt: str, max_tokens: int = 100, params: Any = None, *, buffer: int = 8) -> AsyncTokenStream:
        """Pieces of a completion as they are generated: ``async for`` it, or ``async with`` it.
        Bad arguments raise here, before any iteration."""
        _check_buffer(buffer)
        return AsyncTokenStream(self, self.context.generate_stream(prompt, max_tokens, params), buffer)

    def stream_from_tokens(self, tokens: Sequence[int], max_tokens: int = 100, params: Any = None, *,
                           buffer: int = 8) -> AsyncTokenStream:
        _check_buffer(buffer)
        return AsyncTokenStream(self, self.context.generate_stream_from_tokens(tokens, max_tokens, params), buffer)

    # The names of the original API, as on Context.
    generate_stream = stream
    generate_stream_from_tokens = stream_from_tokens

    async def clear_cache(self) -> None:
        await self._call(self.context.clear_cache)

    async def get_embeddings(self) -> Any:
        return await self._call(self.context.get_embeddings)

    async def get_logits(self) -> Any:
        return await self._call(self.context.get_logits)

    @property
    def adapters(self) -> tuple[tuple[LoraAdapter, float], ...]:
        return self.context.adapters

    async def set_adapters(self, adapters: Iterable[tuple[LoraAdapter, float]] | None) -> None:
        await self._call(lambda: self.context.set_adapters(adapters))

    async def get_state(self) -> bytes:
        return await self._call(self.context.get_state)

    async def set_state(self, data: bytes | bytearray | memoryview) -> None:
        await self._call(lambda: self.context.set_state(data))

    async def save_state(self, path: str | os.PathLike[str]) -> None:
        await self._call(lambda: self.context.save_state(path))

    async def load_state(self, path: str | os.PathLike[str]) -> None:
        await self._call(lambda: self.context.load_state(path))

    async def aclose(self) -> None:
        """Stop the streams still open on this context, then free it."""
        self._bind_loop()
        for worker in list(self._streams):
            worker.cancel()
        async with self._gate:
            self.context.close()

    async def __aenter__(self) -> AsyncContext:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _AsyncPooled(_LoopBound):
    """What AsyncEmbeddingGenerator and AsyncReranker share: one sync object, called in a
    worker thread in arrival order."""

    _sync: EmbeddingGenerator | Reranker

    def __init__(self) -> None:
        self._gate = _Turnstile()

    @property
    def model(self) -> Model:
        return self._sync.model

    @property
    def closed(self) -> bool:
        return self._sync.closed

    def cancel(self) -> None:
        """Stop the batch running now (it raises GenerationCancelled)."""
        self._sync.cancel()

    async def _call(self, fn: Callable[[], T]) -> T:
        self._bind_loop()
        async with self._gate:
            return await _run_in_thread(fn, self._sync.cancel)

    async def aclose(self) -> None:
        self._bind_loop()
        async with self._gate:
            self._sync.close()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncEmbeddingGenerator(_AsyncPooled):
    """The async twin of :class:`mullama.EmbeddingGenerator`."""

    def __init__(self, model: Model, n_ctx: int = 512, normalize: bool = True, *, n_threads: int = 0,
                 n_seq_max: int = 64, flash_attn: bool | None = None) -> None:
        super().__init__()
        self.generator = self._sync = EmbeddingGenerator(model, n_ctx, normalize, n_threads=n_threads,
                                                         n_seq_max=n_seq_max, flash_attn=flash_attn)

    @property
    def n_embd(self) -> int:
        return self.generator.n_embd

    @property
    def normalize(self) -> bool:
        return self.generator.normalize

    async def embed(self, text: str) -> Any:
        return (await self.embed_batch([text]))[0]

    async def embed_batch(self, texts: Sequence[str]) -> Any:
        return await self._call(lambda: self.generator.embed_batch(texts))

    async def __aenter__(self) -> AsyncEmbeddingGenerator:
        return self


class AsyncReranker(_AsyncPooled):
    """The async twin of :class:`mullama.Reranker`."""

    def __init__(self, model: Model, n_ctx: int = 512, *, n_threads: int = 0, n_seq_max: int = 64,
                 flash_attn: bool | None = None) -> None:
        super().__init__()
        self.reranker = self._sync = Reranker(model, n_ctx, n_threads=n_threads, n_seq_max=n_seq_max,
                                              flash_attn=flash_attn)

    async def rank(self, query: str, documents: Sequence[str]) -> list[float]:
        return await self._call(lambda: self.reranker.rank(query, documents))

    async def __aenter__(self) -> AsyncReranker:
        return self


class AsyncEngineStream(RequestView):
    """Pieces of one engine request: an async iterator and an async context manager, like
    :class:`AsyncTokenStream`. Leaving early cancels the request; its slot is freed at the
    engine's next step, without disturbing the other requests."""

    def __init__(self, request: EngineRequest, owner: AsyncEngine) -> None:
        self._request = request   # submitted: the engine works on it from now on
        self._owner = owner       # keeps the engine alive; its event loop is this stream's
        self._wake = _Waker()
        self._reading = False

    def __aiter__(self) -> AsyncEngineStream:
        return self

    async def _next_piece(self) -> str | None:
        """The next piece, None at the end; leaving early (an error, cancellation) cancels."""
        self._owner._bind_loop()
        if self._reading:
            raise ContextBusyError("another task is already awaiting this stream's next piece")
        self._reading = True
        try:
            return await _next_from(self._request, self._wake)
        except BaseException:
            await self.aclose()
            raise
        finally:
            self._reading = False

    async def __anext__(self) -> str:
        piece = await self._next_piece()
        if piece is None:
            raise StopAsyncIteration
        return piece

    async def aread(self) -> str:
        """Wait for the end of the request (one event-loop wake-up, not one per piece) and
        return the text not yet taken."""
        req = self._request
        with req.cond:
            req.wake_each = False
        pieces: list[str] = []
        while (piece := await self._next_piece()) is not None:
            pieces.append(piece)
        return "".join(pieces)

    async def aclose(self) -> None:
        """Cancel the request and wait until the engine has let it go."""
        req = self._request
        if req.finished:
            return
        self._owner._bind_loop()
        req.cancel()
        with anyio.CancelScope(shield=True):
            while True:
                with req.cond:
                    if req.finished:
                        return
                    event = anyio.Event()
                    req.waker = lambda: self._wake(event.set)
                await event.wait()

    async def __aenter__(self) -> AsyncEngineStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if not self._request.finished:
            self._request.cancel()


class AsyncEngine(_LoopBound):
    """The async front of :class:`mullama.Engine`: many concurrent streams over one model."""

    def __init__(self, model: Model, *, n_parallel: int = 8, n_ctx: int | None = None, n_batch: int = 512,
                 n_threads: int = 0, prompt_chunk: int | None = None, prompt_group: int | None = None,
                 nice: int = 0, adapters: Iterable[tuple[LoraAdapter, float]] | None = None,
                 flash_attn: bool | None = None) -> None:
        self.engine = Engine(model, n_parallel=n_parallel, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                             prompt_chunk=prompt_chunk, prompt_group=prompt_group, nice=nice, adapters=adapters,
                             flash_attn=flash_attn)

    @property
    def adapters(self) -> tuple[tuple[LoraAdapter, float], ...]:
        return self.engine.adapters

    @property
    def model(self) -> Model:
        return self.engine.model

    @property
    def n_parallel(self) -> int:
        return self.engine.n_parallel

    @property
    def n_ctx_per_sequence(self) -> int:
        return self.engine.n_ctx_per_sequence

    @property
    def closed(self) -> bool:
        return self.engine.closed

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def cached_prefix(self, prompt: str | Sequence[int]) -> int:
        """As :meth:`mullama.Engine.cached_prefix` (no await: it reads, it never waits)."""
        return self.engine.cached_prefix(prompt)

    def submit(self, prompt: str | Sequence[int], max_tokens: int = 100, params: Any = None, *, buffer: int = 8,
               state: bytes | None = None, keep_state: bool = False) -> EngineRequest:
        """Queue a completion, as :meth:`mullama.Engine.submit`; read it with ``AsyncEngineStream``."""
        return self.engine.submit(prompt, max_tokens, params, buffer=buffer, state=state, keep_state=keep_state)

    def stream(self, prompt: str, max_tokens: int = 100, params: Any = None, *, buffer: int = 8,
               state: bytes | None = None, keep_state: bool = False) -> AsyncEngineStream:
        """Pieces of one completion; the request is checked and queued here, before iteration
        (``state`` and ``keep_state`` as for :meth:`mullama.Engine.stream`)."""
        self._bind_loop()
        request = self.submit(checked_prompt(prompt, True), max_tokens, params, buffer=buffer, state=state,
                              keep_state=keep_state)
        return AsyncEngineStream(request, self)

    def stream_from_tokens(self, tokens: Sequence[int], max_tokens: int = 100, params: Any = None, *,
                           buffer: int = 8, state: bytes | None = None, keep_state: bool = False) -> AsyncEngineStream:
        self._bind_loop()
        request = self.submit(checked_prompt(tokens, False), max_tokens, params, buffer=buffer, state=state,
                              keep_state=keep_state)
        return AsyncEngineStream(request, self)

    async def generate(self, prompt: str, max_tokens: int = 100, params: Any = None) -> str:
        async with self.stream(prompt, max_tokens, params, buffer=1 << 30) as s:
            return await s.aread()

    async def generate_from_tokens(self, tokens: Sequence[int], max_tokens: int = 100, params: Any = None) -> str:
        async with self.stream_from_tokens(tokens, max_tokens, params, buffer=1 << 30) as s:
            return await s.aread()

    async def complete(self, prompt: str | Sequence[int], max_tokens: int = 100, params: Any = None, *,
                       state: bytes | None = None, keep_state: bool = False) -> Completion:
        """A :class:`Completion` of ``prompt`` (text or token ids), as :meth:`mullama.Engine.complete`."""
        self._bind_loop()
        request = self.submit(prompt, max_tokens, params, buffer=1 << 30, state=state, keep_state=keep_state)
        async with AsyncEngineStream(request, self) as s:
            try:
                text = await s.aread()
            except GenerationCancelled:
                text = ""
            return completion_of(s, text)

    async def aclose(self) -> None:
        await _run_in_thread(self.engine.close)

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
