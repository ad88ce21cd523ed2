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

import collections
import os
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import anyio
import sniffio

from ._errors import GenerationCancelled
from ._batching import EngineRequest
from ._llama import Context, EmbeddingGenerator, Engine, Model, TokenStream

__all__ = ["load_model", "AsyncContext", "AsyncTokenStream", "AsyncEmbeddingGenerator", "AsyncEngine", "AsyncEngineStream"]

T = TypeVar("T")


def _loop_waker() -> Callable[[Callable[[], object]], None]:
    """A thread-safe, non-blocking way to run a callback in the current event loop's thread."""
    lib = sniffio.current_async_library()
    call: Callable[[Callable[[], object]], object]
    if lib == "asyncio":
        import asyncio

        call = asyncio.get_running_loop().call_soon_threadsafe
    elif lib == "trio":
        import trio

        call = trio.lowlevel.current_trio_token().run_sync_soon
    else:  # pragma: no cover - anyio only supports the two
        raise RuntimeError(f"mullama.aio does not support the {lib!r} event loop")

    def wake(fn: Callable[[], object]) -> None:
        try:
            call(fn)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    return wake


#: How many nice steps the worker threads of this module drop below the event loop's thread.
#: The native loop keeps every core busy (ggml's compute threads, created by the worker, inherit
#: its priority); without this the event loop waits for a time slice (measured here on 2 cores:
#: p99 lag 3.9 ms at 0, 1.6 ms at 10, the same tokens/s). Set to 0 to leave priorities alone.
WORKER_NICE = 10


def _yield_cpu_to_the_event_loop() -> None:
    """Lower this worker thread's priority by WORKER_NICE (Linux; elsewhere nothing happens)."""
    if WORKER_NICE <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + WORKER_NICE))
    except (AttributeError, OSError):
        pass


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
    wake = _loop_waker()
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


class _Channel:
    """What the worker thread and the consumer share. The worker holds only this, never the
    AsyncTokenStream, so a stream dropped by its consumer can be garbage collected (and its
    __del__ can stop the worker)."""

    def __init__(self, gate: _Turnstile, source: Callable[[], TokenStream], capacity: int) -> None:
        self.gate = gate
        self.source = source
        self.capacity = capacity
        self.pieces: collections.deque[str] = collections.deque()
        self.cond = threading.Condition()
        self.sync: TokenStream | None = None
        self.finished = False        # the worker has ended (pieces may remain)
        self.error: BaseException | None = None
        self.closing = False
        self.waiter: anyio.Event | None = None
        self.ended = anyio.Event()
        self.wake = _loop_waker()
        self.finish_reason: str | None = None

    def work(self) -> None:
        _yield_cpu_to_the_event_loop()
        try:
            stream = self.sync = self.source()
            if self.closing:
                stream.cancel()
            with stream:
                for piece in stream:
                    with self.cond:
                        while len(self.pieces) >= self.capacity and not self.closing:
                            self.cond.wait()   # backpressure: the native loop waits here, GIL released
                        if self.closing:
                            break
                        self.pieces.append(piece)
                        self.notify_consumer()
                self.finish_reason = stream.finish_reason
        except GenerationCancelled as exc:
            if not self.closing:
                self.error = exc
        except BaseException as exc:  # noqa: BLE001 - crosses to the awaiting task unchanged
            self.error = exc
        finally:
            with self.cond:
                self.finished = True
                self.notify_consumer()
            self.wake(self.hand_back)

    def hand_back(self) -> None:
        # One callback in the loop thread: whoever wakes on `ended` finds the context free.
        self.gate.release()
        self.ended.set()

    def notify_consumer(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            self.wake(waiter.set)

    def cancel(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        if self.sync is not None:
            self.sync.cancel()


class AsyncTokenStream:
    """Pieces of one generation, as an async iterator and an async context manager.

    The native loop runs in a worker thread and fills a buffer of ``buffer`` pieces; when the
    buffer is full it waits (without the GIL) until the consumer takes one.
    """

    def __init__(self, actx: AsyncContext, source: Callable[[], TokenStream], buffer: int) -> None:
        if buffer < 1:
            raise ValueError(f"buffer={buffer} must be >= 1")
        self._actx = actx  # keeps the context (and its model) alive
        self._source = source
        self._capacity = buffer
        self._chan: _Channel | None = None
        self._closed = False

    @property
    def finish_reason(self) -> str | None:
        """"stop", "length" or "context" once the stream has ended by itself."""
        return self._chan.finish_reason if self._chan is not None else None

    async def _start(self) -> _Channel:
        if self._chan is not None:
            return self._chan
        chan = _Channel(self._actx._gate, self._source, self._capacity)
        await self._actx._gate.acquire()
        try:
            threading.Thread(target=chan.work, name="mullama-stream", daemon=True).start()
        except BaseException:
            self._actx._gate.release()
            raise
        self._chan = chan
        return chan

    def __aiter__(self) -> AsyncTokenStream:
        return self

    async def __anext__(self) -> str:
        if self._closed:
            raise StopAsyncIteration
        chan = await self._start()
        while True:
            with chan.cond:
                if chan.pieces:
                    piece = chan.pieces.popleft()
                    chan.cond.notify()
                    return piece
                if chan.finished:
                    error, chan.error = chan.error, None
                    if error is not None:
                        raise error
                    raise StopAsyncIteration
                waiter = chan.waiter = anyio.Event()
            try:
                await waiter.wait()
            except BaseException:
                await self.aclose()
                raise

    async def aclose(self) -> None:
        """Stop the native loop (within one token) and wait until the context is free again."""
        self._closed = True
        if self._chan is not None:
            self._chan.cancel()
            with anyio.CancelScope(shield=True):
                await self._chan.ended.wait()

    async def __aenter__(self) -> AsyncTokenStream:
        await self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Dropped without aclose(): stop the worker; it hands the context back by itself.
        if self._chan is not None and not self._chan.finished:
            self._chan.cancel()


class AsyncContext:
    """The async twin of :class:`mullama.Context`: the same methods, awaitable.

    Calls on one AsyncContext wait their turn in arrival order; use several contexts (or the
    batching engine) to serve requests at the same time.
    """

    def __init__(self, model: Model, **context_params: Any) -> None:
        self.context = Context(model, **context_params)
        self._gate = _Turnstile()

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
    def busy(self) -> bool:
        """True while a call or a stream owns the context (or is queued for it)."""
        return self._gate.busy or self.context.busy

    async def _call(self, fn: Callable[[], T], cancel: Callable[[], None] | None = None) -> T:
        async with self._gate:
            return await _run_in_thread(fn, cancel)

    async def _joined(self, source: Callable[[], TokenStream]) -> str:
        # The sync stream joined inside the worker: no event-loop hop per token, and a
        # cancel reaches the native loop even before the worker has started it.
        holder: list[TokenStream] = []
        cancelled: list[bool] = []

        def run() -> str:
            stream = source()
            holder.append(stream)
            if cancelled:
                stream.cancel()
            with stream:
                return "".join(stream)

        def cancel() -> None:
            cancelled.append(True)
            if holder:
                holder[0].cancel()

        return await self._call(run, cancel)

    async def generate(self, prompt: str, max_tokens: int = 100, params: Any = None) -> str:
        """Complete ``prompt``; cancelling the awaiting task stops the native loop."""
        return await self._joined(lambda: self.context.generate_stream(prompt, max_tokens, params))

    async def generate_from_tokens(self, tokens: Sequence[int], max_tokens: int = 100, params: Any = None) -> str:
        return await self._joined(lambda: self.context.generate_stream_from_tokens(tokens, max_tokens, params))

    def stream(self, prompt: str, max_tokens: int = 100, params: Any = None, *, buffer: int = 8) -> AsyncTokenStream:
        """Pieces of a completion as they are generated: ``async for`` it, or ``async with`` it."""
        return AsyncTokenStream(self, lambda: self.context.generate_stream(prompt, max_tokens, params), buffer)

    def stream_from_tokens(self, tokens: Sequence[int], max_tokens: int = 100, params: Any = None, *,
                           buffer: int = 8) -> AsyncTokenStream:
        return AsyncTokenStream(
            self, lambda: self.context.generate_stream_from_tokens(tokens, max_tokens, params), buffer
        )

    async def clear_cache(self) -> None:
        await self._call(self.context.clear_cache)

    async def get_embeddings(self) -> Any:
        return await self._call(self.context.get_embeddings)

    async def aclose(self) -> None:
        async with self._gate:
            self.context.close()

    async def __aenter__(self) -> AsyncContext:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncEmbeddingGenerator:
    """The async twin of :class:`mullama.EmbeddingGenerator`."""

    def __init__(self, model: Model, n_ctx: int = 512, normalize: bool = True, **params: Any) -> None:
        self.generator = EmbeddingGenerator(model, n_ctx, normalize, **params)
        self._gate = _Turnstile()

    @property
    def n_embd(self) -> int:
        return self.generator.n_embd

    async def embed(self, text: str) -> Any:
        return (await self.embed_batch([text]))[0]

    async def embed_batch(self, texts: Sequence[str]) -> Any:
        async with self._gate:
            return await _run_in_thread(lambda: self.generator.embed_batch(texts), self.generator.context.cancel)

    async def aclose(self) -> None:
        async with self._gate:
            self.generator.close()

    async def __aenter__(self) -> AsyncEmbeddingGenerator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncEngineStream:
    """Pieces of one engine request: an async iterator and an async context manager, like
    :class:`AsyncTokenStream`. Leaving early cancels the request; its slot is freed at the
    engine's next step, without disturbing the other requests."""

    def __init__(self, submit: Callable[[], EngineRequest]) -> None:
        self._submit = submit
        self._request: EngineRequest | None = None
        self._wake: Callable[[Callable[[], object]], None] | None = None

    @property
    def finish_reason(self) -> str | None:
        return self._request.finish_reason if self._request is not None else None

    def _start(self) -> EngineRequest:
        if self._request is None:
            self._wake = _loop_waker()
            self._request = self._submit()
        return self._request

    def __aiter__(self) -> AsyncEngineStream:
        return self

    def _arm(self, req: EngineRequest) -> anyio.Event:
        """An event the engine sets at its next notice for req. Call with req.cond held."""
        event = anyio.Event()
        wake = self._wake
        assert wake is not None
        req.waker = lambda: wake(event.set)
        return event

    async def _next_piece(self) -> str | None:
        """The next piece, None at the end; leaving early (an error, cancellation) cancels."""
        req = self._start()
        try:
            while True:
                with req.cond:
                    try:
                        return req.take()
                    except BlockingIOError:
                        event = self._arm(req)
                await event.wait()
        except BaseException:
            await self.aclose()
            raise

    async def __anext__(self) -> str:
        piece = await self._next_piece()
        if piece is None:
            raise StopAsyncIteration
        return piece

    async def aread(self) -> str:
        """Wait for the end of the request (one event-loop wake-up, not one per piece) and
        return the text not yet taken."""
        req = self._start()
        with req.cond:
            req.wake_each = False
        pieces: list[str] = []
        while (piece := await self._next_piece()) is not None:
            pieces.append(piece)
        return "".join(pieces)

    async def aclose(self) -> None:
        """Cancel the request and wait until the engine has let it go."""
        req = self._request
        if req is None or req.finished:
            return
        req.cancel()
        with anyio.CancelScope(shield=True):
            while True:
                with req.cond:
                    if req.finished:
                        return
                    event = self._arm(req)
                await event.wait()

    async def __aenter__(self) -> AsyncEngineStream:
        self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if self._request is not None and not self._request.finished:
            self._request.cancel()


class AsyncEngine:
    """The async front of :class:`mullama.Engine`: many concurrent streams over one model."""

    def __init__(self, model: Model, **engine_params: Any) -> None:
        engine_params.setdefault("nice", WORKER_NICE)   # the engine thread yields to the event loop
        self.engine = Engine(model, **engine_params)

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def stream(self, prompt: str, max_tokens: int = 100, params: Any = None, *, buffer: int = 8) -> AsyncEngineStream:
        return AsyncEngineStream(
            lambda: self.engine._submit(prompt, None, max_tokens, params, buffer))

    def stream_from_tokens(self, tokens: Sequence[int], max_tokens: int = 100, params: Any = None, *,
                           buffer: int = 8) -> AsyncEngineStream:
        return AsyncEngineStream(
            lambda: self.engine._submit(None, tokens, max_tokens, params, buffer))

    async def generate(self, prompt: str, max_tokens: int = 100, params: Any = None) -> str:
        async with self.stream(prompt, max_tokens, params, buffer=1 << 30) as s:
            return await s.aread()

    async def generate_from_tokens(self, tokens: Sequence[int], max_tokens: int = 100, params: Any = None) -> str:
        async with self.stream_from_tokens(tokens, max_tokens, params, buffer=1 << 30) as s:
            return await s.aread()

    async def aclose(self) -> None:
        await _run_in_thread(self.engine.close)

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
