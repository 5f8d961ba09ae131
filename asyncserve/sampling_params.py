"""Sampling parameters: vLLM's names and defaults, validated once at the boundary."""
from __future__ import annotations

import json as _json
from copy import copy
from dataclasses import dataclass, field, fields
from typing import Any

from asyncserve.errors import SamplingParamsError
from asyncserve.utils.truncation import truncate_left

_GREEDY_EPS = 1e-5
# Each word is tokenized (twice) when a request is admitted: the bound keeps that under ~0.1 s of one
# thread's time. vLLM has no bound; the step's cost does not depend on it (bad_words.py).
MAX_BAD_WORDS = 4096


def _check(ok: bool, name: str, allowed: str, value) -> None:
    if not ok:
        raise SamplingParamsError(f"{name} must be {allowed}, got {value!r}.", param=name)


_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
# How deep JSON in a request may nest (an object or array inside another counts one level): deeper values
# would reach Python's recursion limit where they are copied, hashed, printed or rendered.
MAX_JSON_DEPTH = 32


def json_too_deep(value, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `value` (parsed JSON) nests objects/arrays more than `limit` deep; walked without recursion."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


@dataclass
class StructuredOutputsParams:
    """One output constraint, as vLLM's `StructuredOutputsParams`: exactly one of the constraint fields.

    json: a JSON schema (dict or its JSON text); regex: a regular expression the whole output matches;
    choice: the output is one of these strings; grammar: an EBNF grammar (GBNF, as xgrammar reads it);
    json_object: any JSON object; structural_tag: xgrammar's structural-tag JSON (tool-call formats).
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False  # JSON without free whitespace between tokens
    disable_additional_properties: bool = False  # objects without additionalProperties get it false
    disable_fallback: bool = False  # accepted for vLLM's sake: there is one backend to fall back to

    def __post_init__(self) -> None:
        chosen = [name for name in _CONSTRAINTS if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise SamplingParamsError(
                "structured_outputs needs exactly one of json, regex, choice, grammar, json_object, "
                f"structural_tag; got {chosen or 'none'}.", "structured_outputs")
        for name in ("json", "choice"):  # checked before anything copies, hashes or prints them
            if isinstance(getattr(self, name), (dict, list, tuple)) and json_too_deep(getattr(self, name)):
                raise SamplingParamsError(f"structured_outputs.{name} nests deeper than {MAX_JSON_DEPTH} "
                                          "levels.", f"structured_outputs.{name}")
        _check(self.json is None or isinstance(self.json, (dict, str)), "structured_outputs.json",
               "a JSON schema (a dict or its JSON text)", self.json)
        _check(self.regex is None or isinstance(self.regex, str), "structured_outputs.regex", "a string",
               self.regex)
        _check(self.choice is None or (isinstance(self.choice, (list, tuple)) and len(self.choice) > 0
                                       and all(isinstance(c, str) for c in self.choice)),
               "structured_outputs.choice", "a non-empty list of strings", self.choice)
        if self.choice is not None:
            self.choice = list(self.choice)
        _check(self.grammar is None or (isinstance(self.grammar, str) and self.grammar.strip()),
               "structured_outputs.grammar", "a non-empty EBNF grammar string", self.grammar)
        _check(self.json_object in (None, True), "structured_outputs.json_object", "true", self.json_object)
        _check(self.structural_tag is None or isinstance(self.structural_tag, str),
               "structured_outputs.structural_tag", "a JSON string", self.structural_tag)

    @property
    def kind(self) -> str:
        """Which constraint is set: json, regex, choice, grammar, json_object or structural_tag."""
        return next(name for name in _CONSTRAINTS if getattr(self, name) is not None)

    def key(self) -> tuple:
        """What the compiled grammar depends on: equal keys share one compiled grammar. Computed once (a
        big schema's text takes a while): the constraint is not to be changed once made."""
        key = self.__dict__.get("_key")
        if key is None:
            value = getattr(self, self.kind)
            if isinstance(value, dict):
                value = _json.dumps(value, sort_keys=True)
            elif isinstance(value, list):
                value = _json.dumps(value)
            key = self.__dict__["_key"] = (self.kind, value, self.disable_any_whitespace,
                                           self.disable_additional_properties)
        return key

    def size(self) -> int:
        """The constraint's size in characters: its text (a schema as JSON, the choices as a JSON array)."""
        value = self.key()[1]
        return len(value) if isinstance(value, str) else 0

    def __deepcopy__(self, memo) -> "StructuredOutputsParams":
        return self  # shared, never changed: a copy of a big schema would cost time and recursion depth

    @classmethod
    def from_dict(cls, values: dict) -> "StructuredOutputsParams":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SamplingParamsError(f"structured_outputs has unknown fields {unknown}; it takes "
                                      f"{sorted(known)}.", "structured_outputs")
        return cls(**values)


@dataclass
class SamplingParams:
    """How to sample one request. Field names and meanings follow vLLM's `SamplingParams`."""

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None  # sample only among these
    bad_words: list[str] | None = None          # never generate these words (vLLM's rules, see bad_words.py)
    truncate_prompt_tokens: int | None = None   # keep only the last k prompt tokens; -1: max_model_len
    structured_outputs: StructuredOutputsParams | None = None  # the output follows a schema/regex/grammar
    # Filled by the engine when the request is admitted: the lists above, validated, tokenized and in the
    # compact form the runner turns into device tensors once (asyncserve/sample/token_constraints.py).
    token_constraints: Any = field(default=None, repr=False)
    # Filled by the engine from the model's generation config: eos ids beyond the tokenizer's.
    extra_eos_token_ids: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.best_of is None:
            self.best_of = self.n
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        if self.top_k is None or self.top_k == -1:
            self.top_k = 0
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        self._validate()

    def _validate(self) -> None:
        _check(isinstance(self.n, int) and self.n >= 1, "n", "an integer >= 1", self.n)
        _check(isinstance(self.best_of, int) and self.best_of >= self.n, "best_of",
               f"an integer >= n ({self.n})", self.best_of)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(-2.0 <= value <= 2.0, name, "in [-2, 2]", value)
        _check(0.0 < self.repetition_penalty <= 2.0 or self.repetition_penalty == 1.0,
               "repetition_penalty", "in (0, 2]", self.repetition_penalty)
        _check(self.temperature >= 0.0, "temperature", ">= 0", self.temperature)
        _check(0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]", self.top_p)
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k",
               "0 or -1 (disabled) or a positive integer", self.top_k)
        _check(0.0 <= self.min_p <= 1.0, "min_p", "in [0, 1]", self.min_p)
        _check(self.seed is None or isinstance(self.seed, int), "seed", "an integer or None", self.seed)
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
               "max_tokens", "an integer >= 1 or None", self.max_tokens)
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens",
               "an integer >= 0", self.min_tokens)
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens",
                   f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0),
               "logprobs", "an integer >= 0 or None", self.logprobs)
        _check(self.prompt_logprobs is None
               or (isinstance(self.prompt_logprobs, int) and self.prompt_logprobs >= 0),
               "prompt_logprobs", "an integer >= 0 or None", self.prompt_logprobs)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               "a non-empty string or a list of them", self.stop)
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "a list of non-negative token ids", self.stop_token_ids)
        if self.logit_bias:
            _check(isinstance(self.logit_bias, dict)
                   and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                           and isinstance(b, (int, float)) and not isinstance(b, bool) and -100.0 <= b <= 100.0
                           for t, b in self.logit_bias.items()),
                   "logit_bias", "a map of token id (int >= 0) to a bias in [-100, 100]", self.logit_bias)
        if self.allowed_token_ids is not None:
            _check(isinstance(self.allowed_token_ids, (list, tuple)) and len(self.allowed_token_ids) > 0
                   and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                           for t in self.allowed_token_ids),
                   "allowed_token_ids", "a non-empty list of token ids (ints >= 0)", self.allowed_token_ids)
        if self.bad_words is not None:
            if isinstance(self.bad_words, list) and len(self.bad_words) > MAX_BAD_WORDS:
                raise SamplingParamsError(f"bad_words may hold at most {MAX_BAD_WORDS} words, got "
                                          f"{len(self.bad_words)}.", param="bad_words")
            _check(isinstance(self.bad_words, list) and all(isinstance(w, str) and w.strip() for w in self.bad_words),
                   "bad_words", "a list of non-blank strings", self.bad_words)
        _check(self.truncate_prompt_tokens is None or (
            isinstance(self.truncate_prompt_tokens, int) and not isinstance(self.truncate_prompt_tokens, bool)
            and (self.truncate_prompt_tokens >= 1 or self.truncate_prompt_tokens == -1)),
            "truncate_prompt_tokens", "an integer >= 1, or -1 for max_model_len", self.truncate_prompt_tokens)
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
               "structured_outputs", "a StructuredOutputsParams (or a dict of its fields)", self.structured_outputs)
        if self.structured_outputs is not None and self.allowed_token_ids is not None:
            raise SamplingParamsError(
                "allowed_token_ids cannot be combined with structured outputs: both decide which tokens may "
                "come next, and where they disagree no token is left. Put the restriction in the grammar "
                "(regex, choice, schema).", "allowed_token_ids")
        if self.is_greedy:
            _check(self.best_of == 1 or self.best_of == self.n, "best_of",
                   "1 when sampling greedily (temperature 0)", self.best_of)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def max_stop_str_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)

    def truncate_prompt(self, token_ids: list[int], max_model_len: int) -> list[int]:
        return truncate_left(token_ids, self.truncate_prompt_tokens, max_model_len, SamplingParamsError)

    def clone(self) -> "SamplingParams":
        """A copy whose fields the engine may set; the lists inside are shared, never changed (a deep copy
        of a full-vocabulary logit_bias would hold the event loop)."""
        return copy(self)


@dataclass
class BeamSearchParams:
    """Beam search settings, as in vLLM's `LLM.beam_search`."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        _check(isinstance(self.beam_width, int) and self.beam_width >= 1, "beam_width",
               "an integer >= 1", self.beam_width)
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens",
               "an integer >= 1", self.max_tokens)
