"""The exceptions mullama raises.

Every error mullama raises on purpose derives from :class:`MullamaError`; where a built-in
exception fits, the class derives from it too, so ``except FileNotFoundError`` keeps working::

    MullamaError
     +-- ModelLoadError
     |    +-- ModelNotFoundError        (also FileNotFoundError)
     |    +-- InvalidModelError         (also ValueError): not GGUF, truncated, unsupported
     |    +-- ModelIntegrityError       a downloaded file's sha256 is not the expected one
     |    +-- ModelDownloadError        (also ConnectionError): the registry could not be reached
     +-- ContextCreateError             (also MemoryError): n_ctx/n_batch beyond what can be allocated
     +-- InvalidArgumentError           (also ValueError): bad parameters, empty prompt, bad token id
     |    +-- ContextOverflowError      a prompt or text longer than the context can hold
     |    +-- GrammarError              a GBNF grammar or JSON schema that cannot be used
     +-- DecodeError                    llama_decode failed (no cache slot, backend failure)
     |    +-- RPCServerLostError        an RPC server holding layers stopped answering
     +-- EmbeddingsDisabledError        (also RuntimeError): embeddings on a context without them
     +-- ClosedError                    (also RuntimeError): the object was closed
     +-- ContextBusyError               (also RuntimeError): a stream still owns the context, or
     |                                  another thread or task is already iterating the stream
     +-- WrongEventLoopError            (also RuntimeError): an async object used from a second loop
     +-- ChatTemplateError              (also ValueError): no template, or it cannot be applied
     +-- GenerationCancelled            a generation was cancelled from another thread
     +-- ModelFileChangedError          (also RuntimeError): a mapped model file changed on disk
     +-- StateError                     a saved state that does not fit this model or context,
     |                                  or is truncated or corrupted
     +-- AdapterError                   (also ValueError): a LoRA adapter that cannot be loaded
                                        or does not belong to the model

KeyboardInterrupt raised during a native loop is passed through unchanged.
"""

from __future__ import annotations

__all__ = [
    "MullamaError",
    "ModelLoadError",
    "ModelNotFoundError",
    "InvalidModelError",
    "ModelIntegrityError",
    "ModelDownloadError",
    "ContextCreateError",
    "InvalidArgumentError",
    "ContextOverflowError",
    "GrammarError",
    "DecodeError",
    "RPCServerLostError",
    "EmbeddingsDisabledError",
    "ClosedError",
    "ContextBusyError",
    "WrongEventLoopError",
    "ChatTemplateError",
    "GenerationCancelled",
    "ModelFileChangedError",
    "StateError",
    "AdapterError",
    "decode_failure",
]


class MullamaError(Exception):
    """Base class of every error raised by mullama."""


class ModelLoadError(MullamaError):
    """A model file could not be loaded."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The model path does not exist or is not a file."""


class InvalidModelError(ModelLoadError, ValueError):
    """The file is not a loadable GGUF model (bad magic, truncated, unsupported architecture)."""


class ModelIntegrityError(ModelLoadError):
    """A downloaded model file (or the package holding it) does not have the expected sha256."""


class ModelDownloadError(ModelLoadError, ConnectionError):
    """A model's package could not be downloaded (no network, registry unreachable, no such version)."""


class ContextCreateError(MullamaError, MemoryError):
    """llama.cpp could not create a context with the requested sizes."""


class InvalidArgumentError(MullamaError, ValueError):
    """A parameter, prompt or token id is outside what is allowed."""


class ContextOverflowError(InvalidArgumentError):
    """The input is longer than the context can hold."""


class GrammarError(InvalidArgumentError):
    """A GBNF grammar does not parse (llama.cpp's message says where), has left recursion or no
    root rule, or a JSON schema uses what llama.cpp's converter cannot turn into a grammar."""


class DecodeError(MullamaError):
    """llama_decode reported a failure."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class RPCServerLostError(DecodeError):
    """An RPC server holding some of the model's layers stopped answering mid-computation.

    The generation ends with this error and the process goes on, but llama.cpp's RPC client
    cannot reconnect: models on RPC servers cannot be used or loaded again in this process."""


class EmbeddingsDisabledError(MullamaError, RuntimeError):
    """Embeddings were requested from a context created without ``embeddings=True``."""


class ClosedError(MullamaError, RuntimeError):
    """The object was closed and can no longer be used."""


class ContextBusyError(MullamaError, RuntimeError):
    """The context is owned by an unfinished stream of the calling thread."""


class WrongEventLoopError(MullamaError, RuntimeError):
    """An async object was used from an event loop other than the one it is bound to."""


class ChatTemplateError(MullamaError, ValueError):
    """The chat template is missing or cannot be applied to the messages."""


class GenerationCancelled(MullamaError):
    """The generation was cancelled (``cancel()``) before it finished."""


class StateError(MullamaError):
    """A saved state cannot be loaded: another model or context size, or a damaged file."""


class AdapterError(MullamaError, ValueError):
    """A LoRA adapter file cannot be loaded, or was made for another model."""


class ModelFileChangedError(MullamaError, RuntimeError):
    """The file of a model loaded with ``use_mmap=True`` was truncated or rewritten in place.

    Its weights are read from that file, so mullama refuses to decode rather than let the
    process die of SIGBUS. Replacing the file by rename is safe; see :meth:`Model.load`."""


# How each decode failure of mullama's native layer (_native.pxi) reads: the one table.
_DECODE_FAILURES = {
    "no_slot": (DecodeError, "no free slot in the context's memory for the batch; use a larger n_ctx or call clear_cache()"),
    "invalid": (InvalidArgumentError, "llama.cpp rejected the batch as invalid (token id, position or sequence id)"),
    "file_changed": (
        ModelFileChangedError,
        "the memory-mapped model file was truncated or rewritten in place since it was loaded; "
        "reading its weights now could kill the process (SIGBUS). Load it again; replace model "
        "files by rename, or load with use_mmap=False where they are rewritten in place",
    ),
    "failed": (DecodeError, "the backend failed to compute the batch"),
    "rpc_lost": (
        RPCServerLostError,
        "an RPC server holding layers of this model stopped answering; llama.cpp's RPC client "
        "cannot reconnect, so models on RPC servers cannot be used again until the process restarts",
    ),
}


def decode_failure(kind: str, code: int, what: str) -> MullamaError:
    """The exception for a failed decode of kind (a key of the table above); code is
    llama_decode's own result, named in the message."""
    cls, why = _DECODE_FAILURES[kind]
    if kind in ("file_changed", "rpc_lost"):
        return cls(f"{what}: {why}")
    if cls is DecodeError:
        return DecodeError(f"{what}: llama_decode returned {code}: {why}", code)
    return cls(f"{what}: llama_decode returned {code}: {why}")
