"""mullama: run GGUF language models in-process with llama.cpp, sync or async.

>>> import mullama
>>> model = mullama.Model.load(mullama.models.fetch())           # doctest: +SKIP
>>> ctx = mullama.Context(model, n_ctx=2048)                      # doctest: +SKIP
>>> ctx.generate("Once upon a time", max_tokens=32)               # doctest: +SKIP
"""

from ._errors import (
    ChatTemplateError,
    ClosedError,
    ContextBusyError,
    WrongEventLoopError,
    ContextCreateError,
    ContextOverflowError,
    DecodeError,
    RPCServerLostError,
    EmbeddingsDisabledError,
    GenerationCancelled,
    GrammarError,
    InvalidArgumentError,
    InvalidModelError,
    ModelDownloadError,
    ModelFileChangedError,
    ModelIntegrityError,
    ModelLoadError,
    ModelNotFoundError,
    MullamaError,
    StateError,
    AdapterError,
)
from ._llama import (
    Context,
    EmbeddingGenerator,
    Engine,
    Reranker,
    LoraAdapter,
    Model,
    TokenStream,
    rpc_serve,
    devices,
    backend_free,
    backend_init,
    max_devices,
    supports_gpu_offload,
    system_info,
    version,
)
from ._params import SamplerParams, sampler_params_creative, sampler_params_greedy, sampler_params_precise
from . import models
from ._batching import EngineRequest, EngineStream
from ._completion import Completion, TokenLogprob, TopLogprob, Usage

__version__ = "0.1.0"


def cosine_similarity(a, b) -> float:
    """Cosine similarity of two 1-D vectors of finite numbers, in [-1.0, 1.0].

    InvalidArgumentError (a ValueError) names ``a`` or ``b`` when it is not such a vector, and
    says so when their lengths differ. A zero vector gives 0.0.

    >>> cosine_similarity([1.0, 0.0], [1.0, 0.0])
    1.0
    """
    import math

    import numpy as np

    def vector(v, name: str):
        try:
            x = np.asarray(v)
        except (TypeError, ValueError):   # ragged nested sequences
            x = None
        if v is None or x is None or x.dtype.kind not in "iuf":
            raise InvalidArgumentError(
                f"{name} must be a 1-D list, tuple or array of numbers, got {v!r:.80}"
            )
        if x.ndim != 1:
            raise InvalidArgumentError(f"{name} must be 1-D, got shape {x.shape}; pass one vector, not a batch")
        if x.size == 0:
            raise InvalidArgumentError(f"{name} is empty; pass a vector with at least one element")
        x = x.astype(np.float64)
        if not np.isfinite(x).all():
            raise InvalidArgumentError(f"{name} contains NaN or infinity; pass finite values")
        return x

    x, y = vector(a, "a"), vector(b, "b")
    if x.shape != y.shape:
        raise InvalidArgumentError(f"vectors a and b have different lengths ({x.size} and {y.size})")
    sx, sy = float(np.abs(x).max()), float(np.abs(y).max())
    if sx == 0.0 or sy == 0.0:
        return 0.0
    # Scaling by the max-abs keeps the squares from overflowing (1e200) or underflowing (1e-200).
    x, y = x / sx, y / sy
    # sqrt(s * s) == s exactly in IEEE arithmetic, so cosine_similarity(v, v) is exactly 1.0.
    cos = float(np.dot(x, y)) / math.sqrt(float(np.dot(x, x)) * float(np.dot(y, y)))
    return min(1.0, max(-1.0, cos))


__all__ = [
    "Model",
    "Context",
    "TokenStream",
    "EmbeddingGenerator",
    "Reranker",
    "Engine",
    "EngineRequest",
    "EngineStream",
    "LoraAdapter",
    "rpc_serve",
    "devices",
    "SamplerParams",
    "Completion",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
    "sampler_params_greedy",
    "sampler_params_creative",
    "sampler_params_precise",
    "cosine_similarity",
    "backend_init",
    "backend_free",
    "supports_gpu_offload",
    "system_info",
    "max_devices",
    "version",
    "models",
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
]
