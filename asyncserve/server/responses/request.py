"""A Responses API body -> the chat-completions body the chat path already serves, plus what only the
Responses API has (store, previous_response_id, what the Response object repeats back).

Function tools, tool_choice and text.format are rewritten into their chat shapes; built-in tools and
every field this server does not build are refused by name. Errors the chat path raises are renamed
into the Responses fields they came from (`in_responses_terms`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from asyncserve.server.errors import ApiError, bad_request
from asyncserve.server.protocol import REASONING_EFFORTS, Fields
from asyncserve.server.responses.input_items import parse_input

# Fields read here (sampling fields are checked again by the chat path).
_FIELDS = frozenset({
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "seed", "tools",
    "tool_choice", "parallel_tool_calls", "text", "reasoning", "metadata", "user", "store",
    "previous_response_id", "stream", "stream_options", "background", "include", "top_logprobs", "truncation",
    "service_tier", "prompt_cache_key", "safety_identifier", "max_tool_calls"})
# OpenAI features not built here: refused whenever they are given (not null).
_REFUSED = {
    "conversation": "conversations (use previous_response_id)",
    "prompt": "saved prompt templates",
    "context_management": "context management (compaction)",
    "moderation": "moderation",
    "prompt_cache_options": "prompt cache options",
    "prompt_cache_retention": "prompt cache retention",
    "background_options": "background responses",
    "access_programs": "access programs",
    "image": "image options",
}
# `include` values that need nothing from this server: reasoning comes back as plain text content, never
# encrypted, so an agent asking for encrypted reasoning (to replay it with store=false) loses nothing.
_INCLUDABLE = frozenset({"reasoning.encrypted_content"})
_SERVICE_TIERS = ("auto", "default")
_REASONING_SUMMARIES = ("auto", "concise", "detailed")
_MAX_METADATA_KEYS, _MAX_METADATA_KEY_CHARS, _MAX_METADATA_VALUE_CHARS = 16, 64, 512


@dataclass
class ResponsesRequest:
    model: str | None
    input_items: list[dict]              # this request's own items (parse_input's shape)
    chat: dict                           # the chat-completions fields it becomes (messages added later)
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    instructions: str | None = None
    echo: dict = field(default_factory=dict)  # request fields the Response object repeats


def parse_responses(data) -> ResponsesRequest:
    fields = Fields(data)
    _refuse_unbuilt(fields.data)
    model = fields.string("model")
    if fields.data.get("input") is None and fields.data.get("previous_response_id") is None:
        raise bad_request("'input' is required: a string or an array of input items.", "input")
    input_items = parse_input(fields.data["input"]) if fields.data.get("input") is not None else []
    instructions = fields.string("instructions")
    max_output_tokens = fields.integer("max_output_tokens", minimum=1)
    parallel = fields.boolean("parallel_tool_calls", True)
    stream = fields.boolean("stream", False)
    _stream_options(fields, stream)
    if fields.boolean("background", False):
        raise bad_request("'background': background responses are not supported by this server; send the "
                          "request without it (stream it to see the output as it comes).", "background")
    _include(fields.data.get("include"))
    if fields.integer("top_logprobs", 0, minimum=0):
        raise bad_request("'top_logprobs': logprobs are not supported in /v1/responses by this server (use "
                          "/v1/chat/completions).", "top_logprobs")
    if fields.string("truncation", "disabled") != "disabled":
        raise bad_request("'truncation': only \"disabled\" is supported: an input too long for the context is "
                          "refused, never cut.", "truncation")
    if fields.string("service_tier", "auto") not in _SERVICE_TIERS:
        raise bad_request(f"'service_tier' must be one of {', '.join(_SERVICE_TIERS)}: this server has one tier.",
                          "service_tier")
    for hint in ("prompt_cache_key", "safety_identifier", "user"):  # identifiers, read by nothing here
        fields.string(hint)
    fields.integer("max_tool_calls", minimum=1)  # bounds built-in tool calls, of which there are none
    tools = _tools(fields.data.get("tools"))
    text, response_format = _text(fields.data.get("text"))
    reasoning, effort = _reasoning(fields.data.get("reasoning"))
    tool_choice = fields.data.get("tool_choice")
    chat = {"model": model, "stream": stream, "max_tokens": max_output_tokens,
            "temperature": fields.number("temperature"), "top_p": fields.number("top_p"),
            "seed": fields.integer("seed"), "user": fields.string("user"), "parallel_tool_calls": parallel,
            "tools": [_chat_tool(tool) for tool in tools] or None, "tool_choice": _chat_tool_choice(tool_choice),
            "response_format": response_format, "reasoning_effort": effort}
    echo = {"instructions": instructions, "max_output_tokens": max_output_tokens,
            "metadata": _metadata(fields.data.get("metadata")), "parallel_tool_calls": parallel,
            "previous_response_id": fields.string("previous_response_id"), "reasoning": reasoning,
            "store": fields.boolean("store", True), "text": text, "tool_choice": tool_choice or "auto",
            "tools": tools, "truncation": "disabled", "user": fields.string("user"), "background": False}
    return ResponsesRequest(model=model, input_items=input_items,
                            chat={name: value for name, value in chat.items() if value is not None},
                            stream=stream, store=echo["store"], previous_response_id=echo["previous_response_id"],
                            instructions=instructions, echo=echo)


def _refuse_unbuilt(data: dict) -> None:
    for name, value in data.items():
        if name in _FIELDS or value is None:
            continue
        if name in _REFUSED:
            raise bad_request(f"'{name}': {_REFUSED[name]} is not supported by this server.", name)
        raise bad_request(f"'{name}' is not a Responses API field this server knows; remove it.", name)


def _stream_options(fields: Fields, stream: bool) -> None:
    options = fields.data.get("stream_options")
    if options is None:
        return
    if not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true.", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_obfuscation"}:
        raise bad_request("'stream_options' may hold only include_obfuscation (this server never pads its "
                          "events).", "stream_options")


def _include(value) -> None:
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise bad_request("'include' must be an array of strings.", "include")
    for name in value:
        if name not in _INCLUDABLE:
            raise bad_request(f"'include': {name!r} is not supported by this server (only "
                              f"{', '.join(sorted(_INCLUDABLE))}).", "include")


def _metadata(value) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > _MAX_METADATA_KEYS or not all(
            isinstance(key, str) and len(key) <= _MAX_METADATA_KEY_CHARS and isinstance(text, str)
            and len(text) <= _MAX_METADATA_VALUE_CHARS for key, text in value.items()):
        raise bad_request(f"'metadata' must be an object of at most {_MAX_METADATA_KEYS} string values, keys of "
                          f"at most {_MAX_METADATA_KEY_CHARS} characters, values of at most "
                          f"{_MAX_METADATA_VALUE_CHARS}.", "metadata")
    return value


def _tools(value) -> list[dict]:
    """The function tools as given (the Response repeats them); any other kind is refused by name."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad_request("'tools' must be an array of {\"type\": \"function\", \"name\", \"parameters\"} "
                          "objects.", "tools")
    for index, tool in enumerate(value):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            what = f"the built-in tool {kind!r}" if isinstance(kind, str) else "a tool without a type"
            raise bad_request(f"'tools[{index}]': {what} is not supported by this server; only function tools "
                              "({\"type\": \"function\", \"name\", \"parameters\"}) are.", f"tools[{index}]")
    return value


def _chat_tool(tool: dict) -> dict:
    function = {name: tool[name] for name in ("name", "description", "parameters", "strict")
                if tool.get(name) is not None}
    return {"type": "function", "function": function}


def _chat_tool_choice(value):
    if value is None or isinstance(value, str):
        return value  # none / auto / required (anything else: the chat path names it)
    if isinstance(value, dict) and value.get("type") == "function":
        return {"type": "function", "function": {"name": value.get("name")}}
    kind = value.get("type") if isinstance(value, dict) else None
    raise bad_request(f"'tool_choice' {kind!r} is not supported by this server: use \"none\", \"auto\", "
                      "\"required\" or {\"type\": \"function\", \"name\": ...}.", "tool_choice")


def _text(value) -> tuple[dict, dict | None]:
    """`text` as the Response repeats it, and the chat `response_format` its format becomes.
    `text.verbosity` is a hint for OpenAI's models; open models have no such setting, so it is not read."""
    if value is None:
        return {"format": {"type": "text"}}, None
    if not isinstance(value, dict):
        raise bad_request("'text' must be an object: {\"format\": {...}}.", "text")
    text_format = value.get("format") or {"type": "text"}
    kind = text_format.get("type") if isinstance(text_format, dict) else None
    if kind == "text":
        return {**value, "format": text_format}, None
    if kind == "json_object":
        return {**value, "format": text_format}, {"type": "json_object"}
    if kind != "json_schema":
        raise bad_request("'text.format.type' must be \"text\", \"json_object\" or \"json_schema\".",
                          "text.format")
    spec = {name: text_format.get(name) for name in ("name", "schema", "strict")}
    return {**value, "format": text_format}, {"type": "json_schema", "json_schema": spec}


def _reasoning(value) -> tuple[dict | None, str | None]:
    """`reasoning` as the Response repeats it, and the chat reasoning_effort (the chat template reads it).
    The reasoning item carries the whole thinking text, so every `summary` setting gets the same."""
    if value is None:
        return None, None
    if not isinstance(value, dict):
        raise bad_request("'reasoning' must be an object: {\"effort\", \"summary\"}.", "reasoning")
    effort = value.get("effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise bad_request(f"'reasoning.effort' must be one of {', '.join(REASONING_EFFORTS)}; got {effort!r}.",
                          "reasoning.effort")
    for name in ("summary", "generate_summary"):
        if value.get(name) is not None and value[name] not in _REASONING_SUMMARIES:
            raise bad_request(f"'reasoning.{name}' must be one of {', '.join(_REASONING_SUMMARIES)}.",
                              f"reasoning.{name}")
    return {"effort": effort, "summary": value.get("summary")}, effort


# Chat field names in the chat path's errors -> the Responses fields they were made from.
_RENAMES = [(re.compile(r"\btools\[(\d+)\]\.function\b"), r"tools[\1]"),
            (re.compile(r"\bresponse_format(\.json_schema)?"), "text.format"),
            (re.compile(r"\bmax_tokens\b"), "max_output_tokens"),
            (re.compile(r"\bmax_completion_tokens\b"), "max_output_tokens"),
            (re.compile(r"\breasoning_effort\b"), "reasoning.effort")]
_MESSAGES_PARAM = re.compile(r"^messages(\[\d+\])?")  # indexes count the history too: the param says input


def in_responses_terms(error: ApiError) -> ApiError:
    """The chat path's error, with the Responses API's field names in its message and param."""
    message, param = error.message, error.param
    for pattern, replacement in _RENAMES:
        message = pattern.sub(replacement, message)
        param = pattern.sub(replacement, param) if param is not None else None
    if param is not None:
        param = _MESSAGES_PARAM.sub("input", param)
    return ApiError(error.status, message, param, error.code, error.headers)
