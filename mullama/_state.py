"""The saved-state format of a Context or an Engine sequence (pure Python; the C side only
hands over llama.cpp's own bytes for one sequence).

A state is, in order::

    MAGIC (8 bytes) | header length (u32 LE) | header (JSON) | tokens (i32 LE each)
    | llama.cpp's sequence state (llama_state_seq_get_data) | sha256 of all that (32 bytes)

The header names the model and the context size it was saved with, so loading it elsewhere
says what differs instead of handing llama.cpp a cache it would misread; the checksum turns
a truncated or garbled file into a StateError before llama.cpp sees a byte of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ._errors import InvalidArgumentError, StateError

MAGIC = b"MULSTATE"
VERSION = 1
_DIGEST = 32


def model_fingerprint(model: Any) -> dict[str, Any]:
    """What identifies a model's weights well enough for its cache to be reused."""
    meta = model.metadata()
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    return {"description": model.description, "name": model.name, "n_params": model.n_params,
            "size": model.size, "n_vocab": model.n_vocab, "metadata_sha256": digest}


@dataclass(frozen=True)
class SavedState:
    """A parsed state: where it came from, its tokens and llama.cpp's bytes for the sequence."""

    header: dict[str, Any]
    tokens: list[int]
    blob: memoryview   # llama.cpp's bytes, a view into the state they were read from


def pack(model: Any, n_ctx: int, n_seq: int, tokens: Sequence[int], blob: bytes) -> bytes:
    """`n_ctx`: cells per sequence; `n_seq`: sequences of the context (llama.cpp's cache keeps
    one stream per sequence, and its state must be read back into as many)."""
    header = {"version": VERSION, "model": model_fingerprint(model), "n_ctx": n_ctx, "n_seq": n_seq,
              "n_tokens": len(tokens), "blob_len": len(blob)}
    head = json.dumps(header, sort_keys=True).encode()
    parts = [MAGIC, struct.pack("<I", len(head)), head, struct.pack(f"<{len(tokens)}i", *tokens), blob]
    digest = hashlib.sha256()
    for part in parts:   # hashed in place: the blob (megabytes of cache) is copied once, by the join
        digest.update(part)
    return b"".join([*parts, digest.digest()])


def _header(data: bytes, what: str) -> tuple[dict[str, Any], int]:
    """A state's JSON header, and where its tokens start."""
    (n_head,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(data[start:start + n_head])
        int(header["n_tokens"]), int(header["blob_len"])
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"{what} has an unreadable header ({exc})") from None
    return header, start + n_head


def unpack(data: bytes | bytearray | memoryview, what: str) -> SavedState:
    """Parse and check a state's framing and checksum; StateError naming `what` otherwise.
    The blob is a view into `data` (bytes: copied first otherwise), not a copy of it."""
    data = data if isinstance(data, bytes) else bytes(data)
    if len(data) < len(MAGIC) + 4 + _DIGEST or not data.startswith(MAGIC):
        raise StateError(f"{what} is not a mullama state (no {MAGIC.decode()} header)")
    view = memoryview(data)
    body = view[:-_DIGEST]
    if hashlib.sha256(body).digest() != view[-_DIGEST:]:
        raise StateError(f"{what} is truncated or corrupted (its checksum does not match)")
    header, tok_start = _header(data, what)
    n_tokens, blob_len = int(header["n_tokens"]), int(header["blob_len"])
    if header.get("version") != VERSION:
        raise StateError(f"{what} has state format version {header.get('version')!r}; "
                         f"this mullama reads version {VERSION}")
    if n_tokens < 0 or tok_start + 4 * n_tokens + blob_len != len(body):
        raise StateError(f"{what} is truncated or corrupted (its sizes do not add up)")
    tokens = list(struct.unpack_from(f"<{n_tokens}i", data, tok_start))
    return SavedState(header, tokens, body[tok_start + 4 * n_tokens:])


def peek_tokens(data: bytes) -> list[int]:
    """The tokens of a state made by this process (no checksum: for indexing, not loading)."""
    header, tok_start = _header(data, "a state of this process")
    return list(struct.unpack_from(f"<{int(header['n_tokens'])}i", data, tok_start))


def load(data: object, model: Any, n_ctx: int, n_seq: int, what: str) -> SavedState:
    """A state given by a caller, parsed and checked against this model and context layout:
    the one entry for Context.set_state/load_state and an Engine request's ``state``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidArgumentError(f"state must be bytes, got {type(data).__name__}")
    saved = unpack(data, what)
    check_fits(saved, model, n_ctx, n_seq, what)
    return saved


def check_fits(state: SavedState, model: Any, n_ctx: int, n_seq: int, what: str) -> None:
    """StateError unless `state` was saved from this model with this context layout."""
    saved, here = state.header.get("model", {}), model_fingerprint(model)
    if saved != here:
        raise StateError(
            f"{what} was saved with model {saved.get('name')!r} ({saved.get('description')}, "
            f"{saved.get('n_params')} parameters), not the loaded {here['name']!r} "
            f"({here['description']}, {here['n_params']} parameters)"
            if saved.get("n_params") != here["n_params"] or saved.get("description") != here["description"]
            else f"{what} was saved with a different model file than {getattr(model, 'path', '?')!r} "
                 "(same architecture and size, different metadata)"
        )
    if state.header.get("n_ctx") != n_ctx:
        raise StateError(f"{what} was saved from a context of n_ctx={state.header.get('n_ctx')} per sequence; "
                         f"this one has n_ctx={n_ctx}: use the same n_ctx (an Engine's n_ctx_per_sequence)")
    if state.header.get("n_seq") != n_seq:
        raise StateError(f"{what} was saved from a context of {state.header.get('n_seq')} sequences; this one has "
                         f"{n_seq}: a Context's n_seq_max and an Engine's n_parallel must match the saved one")
    if len(state.tokens) > n_ctx:
        raise StateError(f"{what} holds {len(state.tokens)} tokens, more than n_ctx={n_ctx}")
    bad = next((t for t in state.tokens if not 0 <= t < model.n_vocab), None)
    if bad is not None:
        raise StateError(f"{what} holds token id {bad}, outside this model's vocabulary of {model.n_vocab}")


def read_file(path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise StateError(f"state file {os.fspath(path)!r} does not exist") from None
    except OSError as exc:
        raise StateError(f"state file {os.fspath(path)!r} could not be read: {exc.strerror}") from None


def write_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Write atomically: a crash mid-write leaves the old file, never half a state."""
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise StateError(f"state file {os.fspath(path)!r} could not be written: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise StateError(f"state file {os.fspath(path)!r} could not be written: {exc.strerror or exc}") from None
