"""Sampling parameters and their presets (pure Python: nothing here needs C)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ._errors import InvalidArgumentError

__all__ = [
    "SamplerParams",
    "sampler_params_greedy",
    "sampler_params_creative",
    "sampler_params_precise",
]

# The int fields become C int32_t (top_k, penalty_last_n) in llama.cpp's sampler constructors.
_INT32_MAX = 2**31 - 1


@dataclass
class SamplerParams:
    """How the next token is chosen; turned into a llama.cpp sampler chain per generation.

    ``temperature=0`` is greedy decoding. ``seed=0`` draws a random seed per generation.

    >>> SamplerParams(temperature=0.2, top_k=20).top_k
    20
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    penalty_repeat: float = 1.1
    penalty_freq: float = 0.0
    penalty_present: float = 0.0
    penalty_last_n: int = 64
    seed: int = 0

    def validated(self) -> "SamplerParams":
        """Return self after checking every field; raise InvalidArgumentError naming the bad one."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise InvalidArgumentError(f"SamplerParams.{f.name} must be an int, got {value!r}")
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise InvalidArgumentError(f"SamplerParams.{f.name} must be a number, got {value!r}")
                if not math.isfinite(value):
                    raise InvalidArgumentError(f"SamplerParams.{f.name} must be finite, got {value!r}")

        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise InvalidArgumentError(f"SamplerParams.{name}={getattr(self, name)!r}: must be {rule}")

        check(self.temperature >= 0, "temperature", ">= 0 (0 means greedy)")
        check(0 <= self.top_k <= _INT32_MAX, "top_k", "in [0, 2**31 - 1] (0 disables top-k)")
        check(0.0 <= self.top_p <= 1.0, "top_p", "in [0, 1]")
        check(0.0 <= self.min_p <= 1.0, "min_p", "in [0, 1]")
        check(0.0 <= self.typical_p <= 1.0, "typical_p", "in [0, 1]")
        check(self.penalty_repeat > 0, "penalty_repeat", "> 0 (1.0 disables it)")
        check(0 <= self.penalty_last_n <= _INT32_MAX, "penalty_last_n",
              "in [0, 2**31 - 1] (0 disables the penalties)")
        # 0xFFFFFFFF is LLAMA_DEFAULT_SEED, which llama.cpp reads as "random": not a fixed seed.
        check(0 <= self.seed < 0xFFFFFFFF, "seed",
              "in [0, 2**32 - 2] (0 means random; 2**32 - 1 is llama.cpp's random seed too)")
        return self


    @classmethod
    def coerce(cls, params: "SamplerParams | Mapping[str, Any] | None") -> "SamplerParams":
        """None -> defaults; a mapping of field names -> SamplerParams; always validated."""
        if params is None:
            return cls()
        if isinstance(params, cls):
            return params.validated()
        if isinstance(params, Mapping):
            names = {f.name for f in fields(cls)}
            unknown = sorted(set(params) - names)
            if unknown:
                raise InvalidArgumentError(
                    f"unknown sampler parameter(s) {unknown}; SamplerParams has {sorted(names)}"
                )
            return cls(**params).validated()
        raise InvalidArgumentError(
            f"params must be a SamplerParams or a dict of its fields, got {type(params).__name__}"
        )


# The presets keep the values of the original Mullama documentation.
def sampler_params_greedy() -> SamplerParams:
    """Deterministic: always the most likely token."""
    return SamplerParams(temperature=0.0, top_k=1, top_p=1.0, min_p=0.0, penalty_repeat=1.0)


def sampler_params_creative() -> SamplerParams:
    """High randomness: hot temperature, wide top-k."""
    return SamplerParams(temperature=1.2, top_k=100, top_p=0.95, min_p=0.0, penalty_repeat=1.0)


def sampler_params_precise() -> SamplerParams:
    """Low randomness: cool temperature, narrow top-k and nucleus."""
    return SamplerParams(temperature=0.3, top_k=20, top_p=0.8, min_p=0.05, penalty_repeat=1.1)
