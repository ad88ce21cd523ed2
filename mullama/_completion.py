"""What a completion returns: the text, its tokens, why it ended, log-probabilities and usage.
The same types come from Context, Engine and their async mirrors (pure Python)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._errors import GenerationCancelled

__all__ = ["Completion", "TokenLogprob", "TopLogprob", "Usage", "completion_of", "read_until_cancelled"]


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at a position: its id, text, bytes and log-probability."""

    token: int
    text: str
    bytes: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token with its log-probability (a log-softmax of the raw logits, before any
    sampler changed them) and the ``n_probs`` most likely tokens at its position, best first."""

    token: int
    text: str
    bytes: bytes
    logprob: float
    top: tuple[TopLogprob, ...]


@dataclass(frozen=True)
class Usage:
    """Token counts of one completion. ``reused_tokens`` of the prompt were already in the
    cache; ``evaluated_tokens`` were decoded for it."""

    prompt_tokens: int
    reused_tokens: int
    evaluated_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Completion:
    """The result of ``complete``: ``finish_reason`` is ``"stop"`` (an end-of-generation token
    or a stop string), ``"length"`` (max_tokens), ``"context"`` (the context is full),
    ``"grammar"`` (the grammar allows no further token) or ``"cancelled"``. ``logprobs`` is
    None unless ``SamplerParams.logprobs`` or ``n_probs`` asked for them. ``state`` is the
    saved state of an Engine request made with ``keep_state=True``, else None."""

    text: str
    tokens: tuple[int, ...]
    finish_reason: str | None
    logprobs: tuple[TokenLogprob, ...] | None
    usage: Usage
    state: bytes | None = None

    def __str__(self) -> str:
        return self.text


def completion_of(stream: Any, text: str) -> Completion:
    """The Completion of a stream that has ended (any of the four stream classes), given its text."""
    logprobs = stream.logprobs
    return Completion(text, tuple(stream.tokens), stream.finish_reason,
                      None if logprobs is None else tuple(logprobs), stream.usage, getattr(stream, "state", None))


def read_until_cancelled(stream: Any) -> str:
    """The text of a sync stream; what there is so far if it is cancelled (complete() reports a
    cancel as finish_reason "cancelled", not as an exception)."""
    pieces = []
    try:
        for piece in stream:
            pieces.append(piece)
    except GenerationCancelled:
        pass
    return "".join(pieces)
