"""The Python side of one engine request: a bounded buffer of pieces between the engine thread
and one consumer (a thread, or a task of an event loop). Pure Python: nothing here needs C."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from ._completion import Usage
from ._errors import ContextBusyError


class EngineRequest:
    """One generation served by an Engine. The engine thread produces; one consumer takes."""

    __slots__ = ("tokens", "max_tokens", "params", "capacity", "pieces", "cond", "finished", "error",
                 "finish_reason", "cancelled", "waker", "engine_wake", "slot", "wake_each",
                 "completion_tokens", "generated", "logprobs", "saved", "keep_state", "state", "reused",
                 "__weakref__")

    def __init__(self, tokens: list[int], max_tokens: int, params: object, capacity: int,
                 engine_wake: Callable[[], None], want_logprobs: bool = False) -> None:
        self.tokens = tokens      # the prompt
        self.max_tokens = max_tokens
        self.params = params      # the native controls, until the engine lets the request go
        self.capacity = capacity
        self.pieces: collections.deque[str] = collections.deque()
        self.cond = threading.Condition()
        self.finished = False
        self.error: BaseException | None = None
        self.finish_reason: str | None = None
        self.cancelled = False
        self.waker: Callable[[], None] | None = None   # set by an async consumer while it waits
        self.engine_wake = engine_wake
        self.slot = -1            # the engine slot serving it, once admitted
        self.wake_each = True     # False: an async consumer wants one wake-up, at the end
        self.completion_tokens = 0   # set by the engine thread as it generates
        self.generated: list[int] = []   # appended to by the engine thread
        self.logprobs: list[object] | None = [] if want_logprobs else None
        self.saved: object = None     # a parsed state to start from (its tokens begin the prompt)
        self.keep_state = False       # save the sequence's state as the request ends
        self.state: bytes | None = None   # that state, set by the engine thread before finish()
        self.reused = 0               # prompt tokens restored from `saved` instead of decoded

    # -- engine thread -------------------------------------------------------------------------

    @property
    def full(self) -> bool:
        return len(self.pieces) >= self.capacity

    def push(self, piece: str) -> None:
        with self.cond:
            self.pieces.append(piece)
            self._notify()

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
        if not (self.wake_each or self.finished):
            return
        waker, self.waker = self.waker, None
        if waker is not None:
            waker()

    # -- consumer ------------------------------------------------------------------------------

    def usage(self) -> Usage:
        evaluated = len(self.tokens) - self.reused if self.slot >= 0 else 0   # cancelled while waiting: 0
        return Usage(len(self.tokens), self.reused, evaluated, self.completion_tokens)

    def take(self) -> str | None:
        """The next piece, None at the end; raises the request's error. Call with cond held."""
        if self.pieces:
            was_full = self.full
            piece = self.pieces.popleft()
            if was_full:
                self.engine_wake()   # the engine paused this slot; it may go on
            return piece
        if self.finished:
            if self.error is not None:
                error, self.error = self.error, None
                raise error
            return None
        raise BlockingIOError  # nothing yet

    def next_blocking(self) -> str | None:
        with self.cond:
            while True:
                try:
                    return self.take()
                except BlockingIOError:
                    self.cond.wait()

    def cancel(self) -> None:
        self.cancelled = True
        self.engine_wake()


class EngineStream:
    """Text pieces of one engine request, for a thread: an iterator and a context manager.

    One thread iterates it at a time (a second concurrent ``next()`` raises ContextBusyError);
    ``close()`` may come from any thread and returns once the engine has let the request go.
    """

    def __init__(self, request: EngineRequest, owner: object = None) -> None:
        self._request = request
        self._owner = owner   # the Engine: a stream keeps it alive
        self._running = threading.Lock()

    @property
    def finish_reason(self) -> str | None:
        """"stop", "length", "context" or "cancelled" once the request has ended."""
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
        with req.cond:
            while not req.finished:
                req.cond.wait()

    def __enter__(self) -> EngineStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # No waiting here: this may run in any thread, the engine's own included.
        if not self._request.finished:
            self._request.cancel()

