"""OpenAI request bodies -> validated requests with SamplingParams; every problem is a 400 naming its field."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import orjson

from asyncserve.errors import SamplingParamsError
from asyncserve.sampling_params import MAX_JSON_DEPTH, SamplingParams, json_too_deep
from asyncserve.server.errors import ApiError, bad_request
from asyncserve.server.request_fields import check_fields
from asyncserve.server.structured import parse_structured_outputs, structured_field
from asyncserve.server.tools import ToolChoice, message_tool_fields, parse_tool_choice

_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1
_ROLES = ("system", "developer", "user", "assistant", "tool")
_COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
_MAX_TEMPERATURE = 2.0  # OpenAI's documented range is [0, 2]; past it sampling is uniform noise
# OpenAI allows 4 stop sequences; vLLM does not bound them. Each is searched for after every token.
MAX_STOP_STRINGS, MAX_STOP_STRING_CHARS = 64, 1024

REASONING_EFFORTS = ("low", "medium", "high")  # what vLLM accepts (GPT-OSS's three levels)


def _kind(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


class Fields:
    """A request's JSON object, read field by field; null means "not given" as in OpenAI's API."""

    def __init__(self, data):
        if not isinstance(data, dict):
            raise bad_request(f"The request body must be a JSON object, got {_kind(data)}.")
        self.data = data

    def raw(self, name: str, default=None):
        value = self.data.get(name)
        return default if value is None else value

    def integer(self, name: str, default=None, minimum: int | None = None):
        value = self.data.get(name)
        if value is None:
            return default
        if type(value) is not int:
            raise bad_request(f"'{name}' must be an integer, got {_kind(value)}.", name)
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise bad_request(f"'{name}' must fit in a signed 64-bit integer, got {value}.", name)
        if minimum is not None and value < minimum:
            raise bad_request(f"'{name}' must be >= {minimum}, got {value}.", name)
        return value

    def number(self, name: str, default=None) -> float | None:
        value = self.data.get(name)
        if value is None:
            return default
        if type(value) not in (int, float) or not math.isfinite(value):
            raise bad_request(f"'{name}' must be a finite number, got {_kind(value)}.", name)
        return float(value)

    def boolean(self, name: str, default: bool | None = False) -> bool | None:
        value = self.data.get(name)
        if value is None:
            return default
        if type(value) is not bool:
            raise bad_request(f"'{name}' must be true or false, got {_kind(value)}.", name)
        return value

    def string(self, name: str, default: str | None = None) -> str | None:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise bad_request(f"'{name}' must be a string, got {_kind(value)}.", name)
        return value

    def refuse_unsupported(self, endpoint: str) -> None:
        check_fields(self.data, endpoint)


@dataclass
class GenerationRequest:
    """What both endpoints share once parsed."""

    model: str | None
    params: SamplingParams
    stream: bool
    include_usage: bool
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage in every chunk (vLLM's)
    return_prompt_logprobs: bool = False  # the request asked for `prompt_logprobs` itself
    use_beam_search: bool = False
    length_penalty: float = 1.0
    structured_field: str | None = None  # the request field that set params.structured_outputs
    cache_salt: str | None = None  # vLLM's: prefix-cache blocks are shared only among requests of one salt
    request_id: str | None = None  # vLLM's: the caller's id, in the response id ("cmpl-<request_id>")
    return_token_ids: bool = False  # vLLM's: prompt and output token ids beside the text (RL frameworks)
    return_tokens_as_token_ids: bool | None = None  # vLLM's: logprobs name tokens "token_id:<id>"; None: server's
    priority: int = 0  # vLLM's: lower runs first under --scheduling-policy priority


@dataclass
class CompletionRequest(GenerationRequest):
    prompts: list[str | list[int]] = field(default_factory=list)
    echo: bool = False


@dataclass
class ChatRequest(GenerationRequest):
    messages: list[dict] = field(default_factory=list)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict = field(default_factory=dict)
    top_logprobs: int | None = None  # None: no logprobs; else how many alternatives per token
    tool_choice: ToolChoice | None = None  # None: the request has no tools


def _stream_fields(fields: Fields) -> tuple[bool, bool, bool]:
    """(stream, include_usage, continuous usage): as vLLM, per-chunk usage needs include_usage too."""
    stream = fields.boolean("stream", False)
    options = fields.data.get("stream_options")
    if options is None:
        return stream, False, False
    if not isinstance(options, dict):
        raise bad_request(f"'stream_options' must be an object, got {_kind(options)}.", "stream_options")
    if not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true.", "stream_options")
    include_usage = options.get("include_usage")
    include_usage = False if include_usage is None else include_usage
    if type(include_usage) is not bool:
        raise bad_request("'stream_options.include_usage' must be true or false.", "stream_options.include_usage")
    continuous = options.get("continuous_usage_stats")
    if continuous is not None and type(continuous) is not bool:
        raise bad_request("'stream_options.continuous_usage_stats' must be true or false.",
                          "stream_options.continuous_usage_stats")
    return stream, include_usage, include_usage and bool(continuous)


def _stop(fields: Fields) -> list[str]:
    stop = fields.raw("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad_request("'stop' must be a non-empty string or an array of non-empty strings.", "stop")
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_STRING_CHARS for s in stop):
        raise bad_request(f"'stop' may hold at most {MAX_STOP_STRINGS} strings of at most "
                          f"{MAX_STOP_STRING_CHARS} characters each.", "stop")
    return stop


def _token_id_list(fields: Fields, name: str, vocab_size: int) -> list[int]:
    value = fields.raw(name, [])
    if not isinstance(value, list) or not all(type(v) is int and 0 <= v < vocab_size for v in value):
        raise bad_request(f"'{name}' must be an array of token ids in [0, {vocab_size}).", name)
    return value


def _bad_words(fields: Fields) -> list[str] | None:
    words = fields.raw("bad_words")
    if isinstance(words, str):
        words = [words]
    if words is not None and not (isinstance(words, list) and all(isinstance(w, str) for w in words)):
        raise bad_request("'bad_words' must be a string or an array of strings.", "bad_words")
    return words


def _allowed_token_ids(fields: Fields, vocab_size: int) -> list[int] | None:
    if fields.data.get("allowed_token_ids") is None:
        return None
    allowed = _token_id_list(fields, "allowed_token_ids", vocab_size)
    if not allowed:
        raise bad_request("'allowed_token_ids' must not be empty: nothing could be sampled.", "allowed_token_ids")
    return allowed


def _logit_bias(fields: Fields, vocab_size: int) -> dict[int, float] | None:
    bias = fields.raw("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise bad_request(f"'logit_bias' must be an object mapping token ids to biases, got {_kind(bias)}.",
                          "logit_bias")
    parsed = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()):  # int() would take " 1 ", "1_0" and "١"
            raise bad_request(f"'logit_bias' keys must be token ids written in decimal digits, got {key!r}.",
                              "logit_bias")
        token_id = int(key)
        if not 0 <= token_id < vocab_size:
            raise bad_request(f"'logit_bias' token id {token_id} is outside the vocabulary [0, {vocab_size}).",
                              "logit_bias")
        if type(value) not in (int, float) or not -100 <= value <= 100:
            raise bad_request(f"'logit_bias' values must be numbers in [-100, 100], got {value!r} for "
                              f"token {key}.", "logit_bias")
        parsed[token_id] = float(value)
    return parsed


def _temperature(fields: Fields, default: float) -> float:
    temperature = fields.number("temperature", default)
    if temperature > _MAX_TEMPERATURE:
        raise bad_request(f"'temperature' must be between 0 and {_MAX_TEMPERATURE:g}, got {temperature:g}.",
                          "temperature")
    return temperature


def sampling_params(fields: Fields, *, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None, vocab_size: int, defaults: dict | None = None) -> SamplingParams:
    """The sampling fields both endpoints share (OpenAI's and vLLM's extras).

    `defaults` (the model's generation config) stand in for the fields a request leaves out.
    """
    defaults = defaults or {}
    n = fields.integer("n", 1)
    structured_outputs = parse_structured_outputs(fields.data)
    try:
        return SamplingParams(
            n=n, best_of=fields.integer("best_of"),
            presence_penalty=fields.number("presence_penalty", 0.0),
            frequency_penalty=fields.number("frequency_penalty", 0.0),
            repetition_penalty=fields.number("repetition_penalty", defaults.get("repetition_penalty", 1.0)),
            temperature=_temperature(fields, defaults.get("temperature", 1.0)),
            top_p=fields.number("top_p", defaults.get("top_p", 1.0)),
            top_k=fields.integer("top_k", defaults.get("top_k", 0), minimum=-1),
            min_p=fields.number("min_p", defaults.get("min_p", 0.0)),
            seed=fields.integer("seed"),
            stop=_stop(fields),
            stop_token_ids=_token_id_list(fields, "stop_token_ids", vocab_size),
            include_stop_str_in_output=fields.boolean("include_stop_str_in_output", False),
            ignore_eos=fields.boolean("ignore_eos", False),
            max_tokens=max_tokens,
            min_tokens=fields.integer("min_tokens", 0),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=fields.boolean("skip_special_tokens", True),
            spaces_between_special_tokens=fields.boolean("spaces_between_special_tokens", True),
            logit_bias=_logit_bias(fields, vocab_size),
            allowed_token_ids=_allowed_token_ids(fields, vocab_size),
            bad_words=_bad_words(fields),
            truncate_prompt_tokens=fields.integer("truncate_prompt_tokens", minimum=-1),
            structured_outputs=structured_outputs,
        )
    except SamplingParamsError as exc:
        raise bad_request(str(exc), exc.param) from None


def _check_best_of_stream(params: SamplingParams, stream: bool) -> None:
    if stream and params.best_of > params.n:
        raise bad_request("'best_of' > 'n' cannot be streamed: the best sequences are only known at the "
                          "end. Set stream to false, or best_of to n.", "best_of")


def _prompts(fields: Fields) -> list[str | list[int]]:
    prompt = fields.data.get("prompt")
    if prompt is None:
        raise bad_request("'prompt' is required: a string, an array of strings, an array of token ids, "
                          "or an array of token-id arrays.", "prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(type(t) is int for t in prompt):
            return [prompt]
        if all(isinstance(p, list) and p and all(type(t) is int for t in p) for p in prompt):
            return list(prompt)
    raise bad_request("'prompt' must be a string, an array of strings, a non-empty array of token ids, "
                      "or an array of non-empty token-id arrays.", "prompt")


def parse_completion(data, *, vocab_size: int,
                     defaults: dict | None = None) -> CompletionRequest:
    defaults = defaults or {}
    fields = Fields(data)
    fields.refuse_unsupported("completions")
    if fields.data.get("suffix") is not None:
        raise bad_request("'suffix' is not supported by this server.", "suffix")
    prompts = _prompts(fields)
    stream, include_usage, continuous_usage = _stream_fields(fields)
    echo = fields.boolean("echo", False)
    logprobs = fields.integer("logprobs", minimum=0)
    prompt_logprobs = fields.integer("prompt_logprobs", minimum=0)
    if echo and logprobs is not None and prompt_logprobs is None:
        prompt_logprobs = logprobs  # OpenAI returns the echoed prompt's logprobs too
    max_tokens = fields.integer("max_tokens", defaults.get("max_tokens", _COMPLETIONS_DEFAULT_MAX_TOKENS),
                                minimum=1)
    params = sampling_params(fields, max_tokens=max_tokens,
                             logprobs=logprobs, prompt_logprobs=prompt_logprobs, vocab_size=vocab_size,
                             defaults=defaults)
    _check_best_of_stream(params, stream)
    fields.string("user")
    return CompletionRequest(model=fields.string("model"), params=params, stream=stream,
                             include_usage=include_usage, continuous_usage=continuous_usage,
                             return_prompt_logprobs=fields.data.get("prompt_logprobs") is not None,
                             prompts=prompts, echo=echo,
                             use_beam_search=fields.boolean("use_beam_search", False),
                             length_penalty=fields.number("length_penalty", 1.0),
                             structured_field=structured_field(fields.data), cache_salt=_cache_salt(fields),
                             request_id=_request_id(fields),
                             return_token_ids=fields.boolean("return_token_ids", False),
                             return_tokens_as_token_ids=fields.boolean("return_tokens_as_token_ids", None),
                             priority=fields.integer("priority", 0))


def _cache_salt(fields: Fields) -> str | None:
    salt = fields.string("cache_salt")
    if salt is not None and not salt:
        raise bad_request("cache_salt must be a non-empty string (or absent).", "cache_salt")
    return salt


def _request_id(fields: Fields) -> str | None:
    request_id = fields.string("request_id")
    if request_id is not None and not 0 < len(request_id) <= 256:
        raise bad_request("request_id must be a string of 1 to 256 characters.", "request_id")
    return request_id


def _message(message, index: int) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad_request(f"'{where}' must be an object with 'role' and 'content', got {_kind(message)}.",
                          "messages")
    role = message.get("role")
    if role not in _ROLES:
        raise bad_request(f"'{where}.role' must be one of {', '.join(_ROLES)}; got {role!r}.",
                          f"{where}.role")
    content = message.get("content")
    if isinstance(content, list):
        texts, parts = [], []
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "image_url":
                parts.append(_image_part(part, f"{where}.content[{j}]"))
                continue
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"'{where}.content[{j}]' must be a text part {{\"type\": \"text\", \"text\": "
                                  "...} or an image part {\"type\": \"image_url\", \"image_url\": {\"url\": ...}}.",
                                  f"{where}.content[{j}]")
            texts.append(part["text"])
            parts.append({"type": "text", "text": part["text"]})
        # Text alone is joined into one string (every template takes that); with images the parts stay, for
        # the model's template to place its image tokens (multimodal/chat_parts.py).
        content = parts if len(parts) > len(texts) else "\n".join(texts)
    elif content is None:
        if role != "assistant":
            raise bad_request(f"'{where}.content' is required for role {role!r}.", f"{where}.content")
        content = ""
    elif not isinstance(content, str):
        raise bad_request(f"'{where}.content' must be a string or an array of text parts, got "
                          f"{_kind(content)}.", f"{where}.content")
    parsed = {"role": "system" if role == "developer" else role, "content": content}
    name = message.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise bad_request(f"'{where}.name' must be a string, got {_kind(name)}.", f"{where}.name")
        parsed["name"] = name
    parsed.update(message_tool_fields(message, role, where))
    return parsed


_IMAGE_DETAILS = ("auto", "low", "high")


def _image_part(part: dict, where: str) -> dict:
    """OpenAI's image part, checked for shape (decoded later, off the loop): {"type": "image_url",
    "image_url": {"url": ..., "detail": "auto" | "low" | "high"}} (a bare URL string accepted, as vLLM)."""
    image_url = part.get("image_url")
    if isinstance(image_url, str):
        image_url = {"url": image_url}
    if not isinstance(image_url, dict) or not isinstance(image_url.get("url"), str) or not image_url["url"]:
        raise bad_request(f"'{where}.image_url' must be an object with a 'url' string.", f"{where}.image_url")
    detail = image_url.get("detail")
    if detail is not None and detail not in _IMAGE_DETAILS:
        raise bad_request(f"'{where}.image_url.detail' must be one of {', '.join(_IMAGE_DETAILS)}; got {detail!r}.",
                          f"{where}.image_url.detail")
    # detail is accepted and does not change the tokens: the model's processor sizes every image.
    return {"type": "image_url", "image_url": {"url": image_url["url"]}}


def parse_chat(data, *, vocab_size: int, defaults: dict | None = None, auto_tools: bool = False) -> ChatRequest:
    """`auto_tools`: the server parses tool calls from the model's own text (tool_choice "auto")."""
    defaults = defaults or {}
    fields = Fields(data)
    fields.refuse_unsupported("chat")
    messages = fields.data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array of {\"role\", \"content\"} objects.",
                          "messages")
    messages = [_message(message, index) for index, message in enumerate(messages)]
    stream, include_usage, continuous_usage = _stream_fields(fields)
    want_logprobs = fields.boolean("logprobs", False)
    top_logprobs = fields.integer("top_logprobs", minimum=0)
    if top_logprobs is not None and not want_logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs' set to true.", "top_logprobs")
    logprobs = (top_logprobs or 0) if want_logprobs else None
    max_tokens = fields.integer("max_completion_tokens", minimum=1)
    if max_tokens is None:
        max_tokens = fields.integer("max_tokens", defaults.get("max_tokens"), minimum=1)
    prompt_logprobs = fields.integer("prompt_logprobs", minimum=0)
    if prompt_logprobs is not None and stream:
        raise bad_request("'prompt_logprobs' are returned only in a whole chat completion (as vLLM does): set "
                          "stream to false, or use /v1/completions, whose stream carries them.", "prompt_logprobs")
    params = sampling_params(fields, max_tokens=max_tokens, logprobs=logprobs,
                             prompt_logprobs=prompt_logprobs, vocab_size=vocab_size, defaults=defaults)
    _check_best_of_stream(params, stream)
    kwargs = fields.raw("chat_template_kwargs", {})
    if not isinstance(kwargs, dict):
        raise bad_request("'chat_template_kwargs' must be an object.", "chat_template_kwargs")
    effort = fields.raw("reasoning_effort", None)
    if effort is not None:  # OpenAI's field; a template that reads it (GPT-OSS's harmony) gets it, as in vLLM
        if effort not in REASONING_EFFORTS:
            raise bad_request(f"'reasoning_effort' must be one of {', '.join(REASONING_EFFORTS)}; got {effort!r}.",
                              "reasoning_effort")
        kwargs = {"reasoning_effort": effort, **kwargs}  # chat_template_kwargs' own value wins
    fields.string("user")
    add_generation_prompt = fields.boolean("add_generation_prompt", True)
    continue_final_message = fields.boolean("continue_final_message", False)
    if add_generation_prompt and continue_final_message:
        raise bad_request("'continue_final_message' and 'add_generation_prompt' cannot both be true: set "
                          "add_generation_prompt to false to continue the last message.", "continue_final_message")
    return ChatRequest(model=fields.string("model"), params=params, stream=stream, include_usage=include_usage,
                       continuous_usage=continuous_usage, return_prompt_logprobs=prompt_logprobs is not None,
                       use_beam_search=fields.boolean("use_beam_search", False),
                       length_penalty=fields.number("length_penalty", 1.0),
                       structured_field=structured_field(fields.data), cache_salt=_cache_salt(fields),
                       request_id=_request_id(fields), messages=messages,
                       return_token_ids=fields.boolean("return_token_ids", False),
                       return_tokens_as_token_ids=fields.boolean("return_tokens_as_token_ids", None),
                       priority=fields.integer("priority", 0), add_generation_prompt=add_generation_prompt,
                       continue_final_message=continue_final_message,
                       chat_template_kwargs=kwargs, top_logprobs=logprobs,
                       tool_choice=parse_tool_choice(fields.data, auto_enabled=auto_tools))


def parse_json(body: bytes):
    """The body's JSON; a 400 for invalid JSON, or for a field nested deeper than MAX_JSON_DEPTH."""
    if not body:
        raise bad_request("The request body is empty: send a JSON object.")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}.", code="invalid_json") from None
    if isinstance(data, dict):
        for name, value in data.items():
            if name not in _TOKEN_ID_FIELDS and isinstance(value, (dict, list)) and json_too_deep(value):
                raise bad_request(f"'{name}' nests deeper than {MAX_JSON_DEPTH} levels of objects and arrays.",
                                  name)
    return data


# Arrays of token ids, often millions of entries: their parsers check their shape without recursion.
_TOKEN_ID_FIELDS = frozenset({"prompt", "input", "tokens"})
