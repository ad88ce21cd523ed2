"""The server's prompt cache: saved engine states of recent requests, so that a request whose
prompt begins with an earlier conversation (a chat resending its history) decodes only what
is new. Pure Python over ``Engine``'s ``keep_state`` / ``state``."""

from __future__ import annotations

import collections
import threading

from . import _state


class PromptCache:
    """States by the tokens they hold, bounded by bytes; the least recently used goes first.
    Prompts shorter than ``min_tokens`` are not kept: copying their cache costs more than
    decoding them again."""

    def __init__(self, max_bytes: int, min_tokens: int = 64) -> None:
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self._entries: collections.OrderedDict[tuple[int, ...], bytes] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def wants(self, prompt: list[int]) -> bool:
        """Whether a request with this prompt should keep its state for later ones."""
        return self.max_bytes > 0 and len(prompt) >= self.min_tokens

    def lookup(self, prompt: list[int], have: int = 0) -> bytes | None:
        """The state holding the longest beginning of `prompt`, or None; None too when it holds
        no more than the `have` tokens the engine's slots already do."""
        if not self.wants(prompt):
            return None
        with self._lock:
            best = max((k for k in self._entries if len(k) <= len(prompt) and tuple(prompt[:len(k)]) == k),
                       key=len, default=None)
            if best is not None and len(best) <= have:
                return None
            if best is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(best)
            return self._entries[best]

    def store(self, state: bytes | None) -> None:
        """Keep a finished request's state. The states it extends stay: a request that repeats an
        earlier prompt (a regenerated reply) needs a state that stops within that prompt."""
        if state is None or self.max_bytes <= 0 or len(state) > self.max_bytes:
            return
        key = tuple(_state.peek_tokens(state))
        with self._lock:
            if key in self._entries:
                self._bytes -= len(self._entries.pop(key))
            self._entries[key] = state
            self._bytes += len(state)
            while self._bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= len(old)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self._bytes, "hits": self.hits, "misses": self.misses}
