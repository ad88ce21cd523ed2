"""Sampling parameters and their presets. Pure Python, except that a grammar is checked, and a
JSON schema converted, by llama.cpp's own code in the extension."""

from __future__ import annotations

import functools
import math
import json as _json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from ._errors import GrammarError, InvalidArgumentError

__all__ = [
    "SamplerParams",
    "sampler_params_greedy",
    "sampler_params_creative",
    "sampler_params_precise",
]

# The int fields become C int32_t (top_k, penalty_last_n) in llama.cpp's sampler constructors.
_INT32_MAX = 2**31 - 1
MAX_STOPS = 32            # stop strings per generation
MAX_STOP_LENGTH = 256     # characters per stop string
MAX_GRAMMAR_LENGTH = 256 * 1024   # characters of GBNF (JSON schemas become grammars far smaller)
MAX_N_PROBS = 20          # alternatives per token, as OpenAI's top_logprobs

_NUMBERS = ("temperature", "top_p", "min_p", "typical_p", "penalty_repeat", "penalty_freq",
            "penalty_present", "mirostat_tau", "mirostat_eta", "dry_multiplier", "dry_base",
            "xtc_probability", "xtc_threshold", "top_n_sigma")
_INTS = ("top_k", "penalty_last_n", "seed", "min_keep", "n_probs", "mirostat", "dry_allowed_length",
         "dry_penalty_last_n")


@dataclass
class SamplerParams:
    """How the next token is chosen; turned into a llama.cpp sampler chain per generation.

    ``temperature=0`` is greedy decoding. ``seed=0`` draws a random seed per generation.

    Controls beyond sampling: ``stop`` (strings that end the generation; never part of the
    text), ``grammar`` (GBNF), ``json_schema`` (a JSON schema, turned into a grammar by
    llama.cpp's own converter) or ``json=True`` (any JSON object), ``logit_bias`` (token id ->
    added logit; ``-math.inf`` bans the token), ``logprobs``/``n_probs`` (log-probability of
    each generated token and its ``n_probs`` most likely alternatives, see ``Context.complete``).
    llama.cpp's other samplers: ``mirostat`` (1 or 2, with ``mirostat_tau``/``mirostat_eta``),
    DRY (``dry_multiplier`` > 0 turns it on), XTC (``xtc_probability`` > 0), ``top_n_sigma``
    (> 0 turns it on) and ``min_keep``.

    Lazy grammars, as llama.cpp's chat layer makes them for tool calls: with ``grammar_lazy``
    the text is free until a trigger appears, a regular expression of ``grammar_triggers``
    (std::regex syntax; the grammar holds from its first capture group, or the whole match) or
    a token of ``grammar_trigger_tokens``, and the grammar holds from there on.
    ``grammar_prefill`` is text the prompt already ends with that the grammar begins with (a
    chat template's generation prompt). ``preserved_tokens`` are special tokens whose text is
    part of the output (a template's tool-call markers); others' text never is.

    >>> SamplerParams(temperature=0.2, top_k=20).top_k
    20
    >>> SamplerParams(stop=["\\n\\n"], json=True).validated().json
    True
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
    stop: Sequence[str] = ()
    grammar: str | None = None
    json_schema: Mapping[str, Any] | None = None
    json: bool = False
    logit_bias: Mapping[int, float] | None = None
    logprobs: bool = False
    n_probs: int = 0
    min_keep: int = 1
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: Sequence[str] = ("\n", ":", "\"", "*")
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    top_n_sigma: float = -1.0
    grammar_lazy: bool = False
    grammar_triggers: Sequence[str] = ()
    grammar_trigger_tokens: Sequence[int] = ()
    grammar_prefill: str = ""
    preserved_tokens: Sequence[int] = ()

    def validated(self) -> "SamplerParams":
        """Return self after checking every field; raise InvalidArgumentError (GrammarError for a
        grammar or schema, TypeError for a value of the wrong type) naming the bad one."""
        self._check_types()

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
        check(0 <= self.min_keep <= 1024, "min_keep", "in [0, 1024]")
        check(0 <= self.n_probs <= MAX_N_PROBS, "n_probs", f"in [0, {MAX_N_PROBS}]")
        check(self.mirostat in (0, 1, 2), "mirostat", "0 (off), 1 or 2 (Mirostat v1 or v2)")
        check(self.mirostat_tau > 0, "mirostat_tau", "> 0")
        check(self.mirostat_eta > 0, "mirostat_eta", "> 0")
        check(self.dry_multiplier >= 0, "dry_multiplier", ">= 0 (0 disables DRY)")
        check(self.dry_base >= 1.0, "dry_base", ">= 1")
        check(0 <= self.dry_allowed_length <= 1 << 16, "dry_allowed_length", "in [0, 65536]")
        check(-1 <= self.dry_penalty_last_n <= _INT32_MAX, "dry_penalty_last_n",
              ">= -1 (-1: the whole context, 0: off)")
        check(0.0 <= self.xtc_probability <= 1.0, "xtc_probability", "in [0, 1] (0 disables XTC)")
        check(0.0 <= self.xtc_threshold <= 1.0, "xtc_threshold", "in [0, 1]")
        self._check_stops()
        self._check_bias()
        self._check_grammar()
        self._check_lazy()
        return self

    def _check_types(self) -> None:
        for name in _INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgumentError(f"SamplerParams.{name} must be an int, got {value!r}")
        for name in _NUMBERS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidArgumentError(f"SamplerParams.{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise InvalidArgumentError(f"SamplerParams.{name} must be finite, got {value!r}")
        for name in ("json", "logprobs", "grammar_lazy"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SamplerParams.{name} must be True or False, got {getattr(self, name)!r}")

    def _check_stops(self) -> None:
        for name, limit in (("stop", MAX_STOPS), ("dry_sequence_breakers", 64)):
            items = _strings(getattr(self, name), name)
            if len(items) > limit:
                raise InvalidArgumentError(f"SamplerParams.{name} has {len(items)} strings; at most {limit}")
            for item in items:
                if not item:
                    raise InvalidArgumentError(f"SamplerParams.{name} holds an empty string; remove it")
                if len(item) > MAX_STOP_LENGTH:
                    raise InvalidArgumentError(
                        f"SamplerParams.{name} holds a string of {len(item)} characters; "
                        f"at most {MAX_STOP_LENGTH}")

    def _check_bias(self) -> None:
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, Mapping):
            raise TypeError(f"SamplerParams.logit_bias must be a dict of token id -> bias, got {type(bias).__name__}")
        for token, value in bias.items():
            if isinstance(token, bool) or not isinstance(token, int):
                raise TypeError(f"SamplerParams.logit_bias: token ids are ints, got {token!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"SamplerParams.logit_bias[{token}] must be a number, got {value!r}")
            if token < 0:
                raise InvalidArgumentError(f"SamplerParams.logit_bias: token id {token} is negative")
            if math.isnan(value) or value == math.inf:
                raise InvalidArgumentError(
                    f"SamplerParams.logit_bias[{token}]={value!r}: must be finite, or -inf to ban the token")

    def _check_grammar(self) -> None:
        set_ = [n for n in ("grammar", "json_schema", "json") if getattr(self, n) not in (None, False)]
        if len(set_) > 1:
            raise InvalidArgumentError(f"SamplerParams: set only one of grammar, json_schema and json, not {set_}")
        if self.grammar is not None:
            if not isinstance(self.grammar, str):
                raise TypeError(f"SamplerParams.grammar must be a str of GBNF, got {type(self.grammar).__name__}")
            _check_grammar_text(self.grammar)
        if self.json_schema is not None:
            if not isinstance(self.json_schema, Mapping):
                raise TypeError(
                    f"SamplerParams.json_schema must be a dict (a JSON schema), got {type(self.json_schema).__name__}")
            schema_grammar(self.json_schema)

    def _check_lazy(self) -> None:
        _strings(self.grammar_triggers, "grammar_triggers")
        for name in ("grammar_trigger_tokens", "preserved_tokens"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise TypeError(f"SamplerParams.{name} must be a list of token ids, got {type(value).__name__}")
            for t in value:
                if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                    raise InvalidArgumentError(f"SamplerParams.{name} holds {t!r}; token ids are ints >= 0")
        if not isinstance(self.grammar_prefill, str):
            raise TypeError(f"SamplerParams.grammar_prefill must be a str, got {type(self.grammar_prefill).__name__}")
        has_grammar = self.grammar is not None or self.json_schema is not None or self.json
        if self.grammar_lazy and not has_grammar:
            raise InvalidArgumentError("SamplerParams.grammar_lazy needs a grammar (grammar, json_schema or json)")
        if self.grammar_lazy and not self.grammar_triggers and not self.grammar_trigger_tokens:
            raise InvalidArgumentError("SamplerParams.grammar_lazy needs grammar_triggers or grammar_trigger_tokens: "
                                       "without one the grammar would never hold")

    def grammar_text(self) -> str | None:
        """The GBNF this generation is constrained by: ``grammar``, or the grammar llama.cpp
        makes of ``json_schema`` (or of ``{"type": "object"}`` for ``json=True``); None if none."""
        if self.grammar is not None:
            return self.grammar
        if self.json_schema is not None:
            return schema_grammar(self.json_schema)
        if self.json:
            return schema_grammar({"type": "object"})
        return None

    def stop_strings(self) -> list[str]:
        return _strings(self.stop, "stop")

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


def _strings(value: object, name: str) -> list[str]:
    """A str or a sequence of str, as a list."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence) or isinstance(value, (bytes, bytearray)):
        raise TypeError(f"SamplerParams.{name} must be a str or a list of str, got {type(value).__name__}")
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"SamplerParams.{name} must hold only str, got {item!r}")
    return list(value)


def _check_grammar_text(text: str) -> None:
    if len(text) > MAX_GRAMMAR_LENGTH:
        raise GrammarError(
            f"SamplerParams.grammar is {len(text)} characters; at most {MAX_GRAMMAR_LENGTH} are accepted")
    _parse_grammar(text)


@functools.lru_cache(maxsize=256)
def _parse_grammar(text: str) -> None:
    from ._llama import _check_grammar   # the parser is llama.cpp's own, in the extension

    _check_grammar(text)


def renamed(exc: Exception, name: str) -> str:
    """The message of a json_schema or grammar error, with that SamplerParams field called
    ``name``: what a caller's user gave it as (a request's field, a tool's parameters)."""
    return str(exc).replace("SamplerParams.json_schema", name).replace("SamplerParams.grammar", name)


def schema_grammar(schema: Mapping[str, Any], *, patterns: bool = True) -> str:
    """The GBNF grammar llama.cpp's ``json_schema_to_grammar`` makes of a JSON schema. With
    ``patterns`` a string pattern the converter cannot translate is refused, not ignored."""
    try:
        text = _json.dumps(schema, allow_nan=False)   # key order kept: it is the order of the fields
    except (TypeError, ValueError) as exc:
        raise TypeError(f"SamplerParams.json_schema is not JSON: {exc}") from None
    return _schema_grammar(text, patterns)


@functools.lru_cache(maxsize=256)
def _schema_grammar(text: str, patterns: bool) -> str:
    from ._llama import _json_schema_to_grammar

    if patterns:
        _check_patterns(_json.loads(text))
    grammar = _json_schema_to_grammar(text)
    if len(grammar) > MAX_GRAMMAR_LENGTH:
        raise GrammarError(f"SamplerParams.json_schema makes a grammar of {len(grammar)} characters; "
                           f"at most {MAX_GRAMMAR_LENGTH}")
    try:
        _parse_grammar(grammar)
    except GrammarError as exc:
        raise GrammarError(f"SamplerParams.json_schema makes a grammar llama.cpp cannot use ({exc}); "
                           "a $ref that leads back to itself with nothing in between does this") from None
    return grammar


@functools.lru_cache(maxsize=1)
def _any_string_grammar() -> str:
    """What the converter makes of a pattern it cannot translate (a lookahead, here)."""
    from ._llama import _json_schema_to_grammar

    return _json_schema_to_grammar('{"type": "string", "pattern": "^(?=a)$"}')


def _check_patterns(schema: object) -> None:
    """llama.cpp's converter turns a string "pattern" it cannot translate into "any string" (with
    a warning on stderr): refuse such a schema instead of ignoring the constraint."""
    from ._llama import _json_schema_to_grammar

    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        stack.extend(v for k, v in node.items() if k != "pattern")
        pattern = node.get("pattern")
        if not isinstance(pattern, str):
            continue
        if not (pattern.startswith("^") and pattern.endswith("$")):
            raise GrammarError(f"SamplerParams.json_schema: pattern {pattern!r} is not supported: "
                               "llama.cpp's converter needs it anchored with '^' and '$'")
        alone = _json_schema_to_grammar(_json.dumps({"type": "string", "pattern": pattern}))
        if alone == _any_string_grammar():
            raise GrammarError(f"SamplerParams.json_schema: pattern {pattern!r} uses regular expression "
                               "syntax llama.cpp's converter does not support")
