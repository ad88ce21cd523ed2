"""The bounded buffer of text pieces between a producer thread (the engine's, or a worker
running a Context's native loop) and one consumer (a thread, or a task of an event loop), and
the engine request built on it. Pure Python: nothing here needs C."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import TypeVar

from ._completion import Usage
from ._errors import ContextBusyError, InvalidArgumentError

P = TypeVar("P")


def checked_prompt(value: P, text: bool) -> P:
    """value, checked to be what the caller's method name promises: text, or token ids."""
    if text and not isinstance(value, str):
        raise InvalidArgumentError(f"prompt must be a str, got {type(value).__name__} "
                                   "(token ids go to stream_from_tokens)")
    if not text and isinstance(value, (str, bytes)):
        raise InvalidArgumentError(f"tokens must be a sequence of ints, got {type(value).__name__}")
    return value


class PieceBuffer:
    """Pieces of one generation, at most ``capacity`` of them waiting for the consumer.

    A producer that must not block (the engine thread, serving other requests) checks ``full``
    and pauses; ``on_room`` tells it when the consumer has made room. A producer of its own
    (a worker thread) waits in :meth:`push_wait`. A thread consumer waits in
    :meth:`next_blocking`; an event-loop consumer sets ``waker`` (with ``cond`` held) and is
    called once, at the next piece (with ``wake_each`` False: only when the buffer is full or
    the generation has ended).
    """

    __slots__ = ("capacity", "pieces", "cond", "finished", "error", "finish_reason", "waker", "wake_each",
                 "on_room", "closing", "__weakref__")

    def __init__(self, capacity: int, on_room: Callable[[], None] | None = None) -> None:
        self.capacity = capacity
        self.pieces: collections.deque[str] = collections.deque()
        self.cond = threading.Condition()
        self.finished = False
        self.error: BaseException | None = None
        self.finish_reason: str | None = None
        self.waker: Callable[[], None] | None = None
        self.wake_each = True
        self.on_room = on_room
        self.closing = False      # the consumer has gone: a waiting producer gives up

    # -- producer ------------------------------------------------------------------------------

    @property
    def full(self) -> bool:
        return len(self.pieces) >= self.capacity

    def push(self, piece: str) -> None:
        with self.cond:
            self.pieces.append(piece)
            self._notify()

    def push_wait(self, piece: str) -> bool:
        """Append piece once there is room (waiting without the GIL); False if the consumer
        has gone instead."""
        with self.cond:
            while self.full and not self.closing:
                self.cond.wait()
            if self.closing:
                return False
            self.pieces.append(piece)
            self._notify()
            return True

    def finish(self, reason: str | None, error: BaseException | None = None) -> None:
        with self.cond:
            if self.finished:
                return
            self.finished = True
            self.finish_reason = reason
            self.error = error
            self._notify()

    def _notify(self) -> None:
        self.cond.notify_all()
        if not (self.wake_each or self.finished or self.full):   # full: only the consumer can go on
            return
        waker, self.waker = self.waker, None
        if waker is not None:
            waker()

    # -- consumer ------------------------------------------------------------------------------

    def take(self) -> str | None:
        """The next piece, None at the end; raises the generation's error, or BlockingIOError
        when nothing is there yet. Call with cond held."""
        if self.pieces:
            was_full = self.full
            piece = self.pieces.popleft()
            if was_full:
                self.cond.notify_all()   # a producer in push_wait
                if self.on_room is not None:
                    self.on_room()       # a producer that paused
            return piece
        if self.finished:
            if self.error is not None:
                error, self.error = self.error, None
                raise error
            return None
        raise BlockingIOError

    def next_blocking(self) -> str | None:
        with self.cond:
            while True:
                try:
                    return self.take()
                except BlockingIOError:
                    self.cond.wait()

    def wait_finished(self) -> None:
        with self.cond:
            while not self.finished:
                self.cond.wait()

    def leave(self) -> None:
        """The consumer goes: a producer waiting for room stops waiting."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()


class EngineRequest(PieceBuffer):
    """One generation queued on an :class:`Engine` (by :meth:`Engine.submit`): its prompt,
    its piece buffer and its counts. The engine thread produces; one
    :class:`EngineStream` or :class:`mullama.aio.AsyncEngineStream` reads it."""

    __slots__ = ("tokens", "max_tokens", "params", "cancelled", "engine_wake", "slot", "completion_tokens",
                 "generated", "logprobs", "saved", "keep_state", "state", "reused")

    def __init__(self, tokens: list[int], max_tokens: int, params: object, capacity: int,
                 engine_wake: Callable[[], None], want_logprobs: bool = False) -> None:
        super().__init__(capacity, engine_wake)   # the engine paused a full request: it may go on
        self.tokens = tokens      # the prompt
        self.max_tokens = max_tokens
        self.params = params      # the native controls, until the engine lets the request go
        self.cancelled = False
        self.engine_wake = engine_wake
        self.slot = -1            # the engine slot serving it, once admitted
        self.completion_tokens = 0   # set by the engine thread as it generates
        self.generated: list[int] = []   # appended to by the engine thread
        self.logprobs: list[object] | None = [] if want_logprobs else None
        self.saved: object = None     # a parsed state to start from (its tokens begin the prompt)
        self.keep_state = False       # save the sequence's state as the request ends
        self.state: bytes | None = None   # that state, set by the engine thread before finish()
        self.reused = 0               # prompt tokens restored from `saved` instead of decoded

    def usage(self) -> Usage:
        evaluated = len(self.tokens) - self.reused if self.slot >= 0 else 0   # cancelled while waiting: 0
        return Usage(len(self.tokens), self.reused, evaluated, self.completion_tokens)

    def cancel(self) -> None:
        """Stop the request at the engine's next step, from any thread."""
        self.cancelled = True
        self.engine_wake()


class RequestView:
    """What both engine streams, sync and async, say about their request."""

    _request: EngineRequest

    @property
    def finish_reason(self) -> str | None:
        """"stop", "length", "context", "grammar" or "cancelled" once the request has ended."""
        return self._request.finish_reason

    @property
    def prompt_tokens(self) -> int:
        return len(self._request.tokens)

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far."""
        return self._request.completion_tokens

    @property
    def tokens(self) -> list[int]:
        """The ids of the tokens generated so far (a stop string's tokens included)."""
        return list(self._request.generated)

    @property
    def logprobs(self) -> list[object] | None:
        """A TokenLogprob per generated token so far, or None unless the params asked for them."""
        logprobs = self._request.logprobs
        return None if logprobs is None else list(logprobs)

    @property
    def usage(self) -> Usage:
        """Token counts so far; ``reused_tokens`` came from the request's ``state``."""
        return self._request.usage()

    @property
    def state(self) -> bytes | None:
        """With ``keep_state=True``, once the request has ended: its sequence's saved state (as
        ``Context.get_state`` makes them), to start a later request from; else None."""
        return self._request.state

    def cancel(self) -> None:
        """Stop the request at the engine's next step, from any thread; iterating then ends."""
        self._request.cancel()


class EngineStream(RequestView):
    """Text pieces of one engine request, for a thread: an iterator and a context manager.

    One thread iterates it at a time (a second concurrent ``next()`` raises ContextBusyError);
    ``close()`` may come from any thread and returns once the engine has let the request go.
    """

    def __init__(self, request: EngineRequest, owner: object = None) -> None:
        self._request = request
        self._owner = owner   # the Engine: a stream keeps it alive
        self._running = threading.Lock()

    def read(self) -> str:
        """Wait for the end of the request and return its whole text."""
        return "".join(self)

    def __iter__(self) -> EngineStream:
        return self

    def __next__(self) -> str:
        if not self._running.acquire(blocking=False):
            raise ContextBusyError("this stream is already being iterated by another thread; "
                                   "a stream has one consumer at a time")
        try:
            piece = self._request.next_blocking()
        finally:
            self._running.release()
        if piece is None:
            raise StopIteration
        return piece

    def close(self) -> None:
        """Stop this request and wait until the engine has freed its slot (at its next step)."""
        req = self._request
        if req.finished:
            return
        req.cancel()
        req.wait_finished()

    def __enter__(self) -> EngineStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # No waiting here: this may run in any thread, the engine's own included.
        if not self._request.finished:
            self._request.cancel()
