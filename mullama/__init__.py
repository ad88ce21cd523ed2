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
    ContextCreateError,
    ContextOverflowError,
    DecodeError,
    EmbeddingsDisabledError,
    GenerationCancelled,
    InvalidArgumentError,
    InvalidModelError,
    ModelFileChangedError,
    ModelLoadError,
    ModelNotFoundError,
    MullamaError,
)
from ._llama import (
    Context,
    EmbeddingGenerator,
    Engine,
    Model,
    TokenStream,
    backend_free,
    backend_init,
    max_devices,
    supports_gpu_offload,
    system_info,
    version,
)
from ._params import SamplerParams, sampler_params_creative, sampler_params_greedy, sampler_params_precise
from . import models
from ._batching import EngineStream

__version__ = "0.1.0"


def cosine_similarity(a, b) -> float:
    """Cosine similarity of two vectors; ValueError if their lengths differ.

    >>> cosine_similarity([1.0, 0.0], [1.0, 0.0])
    1.0
    """
    import numpy as np

    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise InvalidArgumentError(f"vectors have different lengths ({x.size} and {y.size})")
    if x.size == 0:
        raise InvalidArgumentError("vectors are empty")
    denom = float(np.linalg.norm(x) * np.linalg.norm(y))
    return 0.0 if denom == 0 else float(np.dot(x, y) / denom)


__all__ = [
    "Model",
    "Context",
    "TokenStream",
    "EmbeddingGenerator",
    "Engine",
    "EngineStream",
    "SamplerParams",
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
    "ContextCreateError",
    "InvalidArgumentError",
    "ContextOverflowError",
    "DecodeError",
    "EmbeddingsDisabledError",
    "ClosedError",
    "ContextBusyError",
    "ChatTemplateError",
    "GenerationCancelled",
    "ModelFileChangedError",
]
