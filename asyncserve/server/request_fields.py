"""Which request fields are read, which unbuilt OpenAI/vLLM features are refused, and a warning for the rest.

A feature the server does not implement gets a 400 naming it, never a silent 200 with something else
than asked; a field nobody knows is logged as ignored, as vLLM does. A refused field sent with its
neutral value (`"functions": []`, `"function_call": "none"`) is fine.
"""
from __future__ import annotations

import heapq
import logging
from typing import Any, Callable

from asyncserve.server.errors import bad_request
from asyncserve.server.structured import FIELDS as STRUCTURED_FIELDS

logger = logging.getLogger("asyncserve.server")

_MAX_NAMES_LOGGED = 10  # unknown fields named in the warning; the rest are counted
_MAX_NAME_CHARS = 64

_SAMPLING = frozenset({
    "model", "n", "best_of", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature",
    "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "include_stop_str_in_output", "ignore_eos",
    "max_tokens", "min_tokens", "skip_special_tokens", "spaces_between_special_tokens", "logit_bias",
    "allowed_token_ids", "bad_words", "truncate_prompt_tokens", "prompt_logprobs", "stream", "stream_options",
    "user", "use_beam_search", "length_penalty",
    "cache_salt", "request_id", "return_token_ids", "return_tokens_as_token_ids", "priority",  # vLLM's
}) | STRUCTURED_FIELDS
COMPLETION_FIELDS = _SAMPLING | {"prompt", "echo", "logprobs", "suffix"}
CHAT_FIELDS = _SAMPLING | {"messages", "logprobs", "top_logprobs", "max_completion_tokens",
                           "add_generation_prompt", "continue_final_message", "chat_template_kwargs",
                           "parallel_tool_calls", "tools", "tool_choice",  # checked in server/tools.py
                           "reasoning_effort"}


def _none(value: Any) -> bool:
    return value is None


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == {}


def _false(value: Any) -> bool:
    return value is None or value is False


def _one_of(*neutral: Any) -> Callable[[Any], bool]:
    return lambda value: value is None or any(value == n for n in neutral)


# field -> (the feature it asks for, whether a value asks for nothing)
_REFUSED: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "guided_whitespace_pattern": ("guided_whitespace_pattern (xgrammar has none; use "
                                  "structured_outputs.disable_any_whitespace)", _none),
    "structural_tag": ("a top-level structural_tag (use structured_outputs.structural_tag)", _none),
    "functions": ("function calling", _empty),
    "function_call": ("function calling", _one_of("none")),
    "audio": ("audio output", _none),
    "modalities": ("output modalities other than text", _one_of(["text"])),
    "prediction": ("predicted outputs", _none),
    "web_search_options": ("web search", _none),
    "logits_processors": ("custom logits processors", _empty),
    "prompt_embeds": ("prompt embeddings", _none),
    "kv_transfer_params": ("KV transfer (disaggregated serving)", _none),
    "vllm_xargs": ("vllm_xargs", _empty),
    "mm_processor_kwargs": ("multimodal inputs", _empty),
    "documents": ("documents in the chat template", _empty),
    "chat_template": ("a per-request chat_template (start the server with --chat-template)", _none),
}
# Refused where they would change the output, by endpoint.
_REFUSED_COMPLETION = {**_REFUSED, "add_special_tokens": ("add_special_tokens=false", _one_of(True)),
                       "reasoning_effort": ("reasoning_effort in /v1/completions (a chat template reads it: use "
                                            "/v1/chat/completions)", _none),
                       "tools": ("tool calling in /v1/completions (use /v1/chat/completions)", _empty),
                       "tool_choice": ("tool_choice in /v1/completions (use /v1/chat/completions)",
                                       _one_of("none"))}
_REFUSED_CHAT = {**_REFUSED, "add_special_tokens": ("add_special_tokens=true", _false),
                 "echo": ("echo in chat completions", _false)}


def check_fields(data: dict, endpoint: str) -> None:
    """400 for an unbuilt feature that is asked for; one warning naming the fields nobody reads."""
    known, refused = ((COMPLETION_FIELDS, _REFUSED_COMPLETION) if endpoint == "completions"
                      else (CHAT_FIELDS, _REFUSED_CHAT))
    ignored = []
    for name, value in data.items():
        if name in known:
            continue
        if name in refused:
            feature, neutral = refused[name]
            if not neutral(value):
                raise bad_request(f"'{name}': {feature} is not supported by this server.", name)
            continue
        ignored.append(name)
    if ignored:
        logger.warning("The following fields were present in the request but ignored: %s", _summary(ignored))


def _summary(names: list[str]) -> str:
    """The first few names (sorted, each cut short) and how many more: a request of 100,000 unknown keys
    costs the log one short line, not megabytes."""
    shown = [name if len(name) <= _MAX_NAME_CHARS else name[:_MAX_NAME_CHARS] + "..."
             for name in heapq.nsmallest(_MAX_NAMES_LOGGED, names)]
    more = len(names) - len(shown)
    return f"{shown} and {more} more" if more else str(shown)
