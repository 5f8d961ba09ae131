"""An Anthropic Messages request, checked in Anthropic's field names, becomes the OpenAI chat body that
/v1/chat/completions parses: one conversion, after which every rule of the chat path (template, tools,
sampling, limits) applies unchanged."""
from __future__ import annotations

from asyncserve.server.errors import bad_request
from asyncserve.server.protocol import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, Fields

# Fields read here; `metadata`, `service_tier`, `cache_control`, `speed` and `inference_geo` are accepted and
# mean nothing to one local server (its prefix cache needs no breakpoints). Any other field is refused, as
# Anthropic's API refuses a field it does not know.
_COUNT_FIELDS = frozenset({"model", "messages", "system", "tools", "tool_choice", "thinking", "output_config",
                           "cache_control", "speed"})
_CREATE_FIELDS = _COUNT_FIELDS | {"max_tokens", "stop_sequences", "temperature", "top_p", "top_k", "stream",
                                  "metadata", "service_tier", "inference_geo"}
_MAX_NAME_CHARS = 64  # an unknown field's name, as the error quotes it
# Anthropic features this server does not build: refused by name when asked for (null or empty passes).
_REFUSED = {"mcp_servers": "MCP servers", "container": "code-execution containers",
            "context_management": "context management",
            "output_format": "output_format (the structured-outputs beta; send output_config.format)"}
# output_config.effort -> the chat path's reasoning_effort, which templates such as GPT-OSS's read
_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}
_TEXT_ONLY = "this server takes text, tool_use, tool_result and thinking blocks"


def chat_body(data, *, auto_tools: bool, counting: bool = False) -> dict:
    """The OpenAI chat request body for an Anthropic one; `counting`: /v1/messages/count_tokens's fields
    (no max_tokens, no sampling). `auto_tools`: the server parses tool calls from the model's text."""
    fields = Fields(data)
    _check_fields(fields.data, _COUNT_FIELDS if counting else _CREATE_FIELDS)
    model = fields.string("model")
    if not model:
        raise bad_request("'model' is required: the served model's name.", "model")
    messages = _system(fields.data.get("system")) + _messages(fields.data.get("messages"))
    body: dict = {"model": model, "messages": messages}
    if messages[-1]["role"] == "assistant":  # Anthropic's prefill: the reply continues this text
        body.update(add_generation_prompt=False, continue_final_message=True)
    thinking = _thinking(fields.data.get("thinking"))
    if thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": thinking}
    body.update(_tools(fields.data.get("tools"), fields.data.get("tool_choice"), auto_tools, thinking))
    body.update(_output_config(fields.data.get("output_config")))
    if counting:
        return body
    max_tokens = fields.integer("max_tokens", minimum=1)
    if max_tokens is None:
        raise bad_request("'max_tokens' is required: the most tokens the reply may have.", "max_tokens")
    temperature = fields.number("temperature")
    if temperature is not None and not 0.0 <= temperature <= 1.0:
        raise bad_request(f"'temperature' must be between 0 and 1, got {temperature:g}.", "temperature")
    top_p = fields.number("top_p")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise bad_request(f"'top_p' must be in (0, 1], got {top_p:g}.", "top_p")
    body.update(max_tokens=max_tokens, stop=_stop_sequences(fields.data.get("stop_sequences")),
                temperature=temperature, top_p=top_p, top_k=fields.integer("top_k", minimum=0),
                stream=fields.boolean("stream", False))
    metadata = fields.data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise bad_request("'metadata' must be an object, such as {\"user_id\": \"...\"}.", "metadata")
    return body


def _check_fields(data: dict, known: frozenset[str]) -> None:
    for name, value in data.items():
        if name in known:
            continue
        if name in _REFUSED:
            if value not in (None, [], {}):
                raise bad_request(f"'{name}': {_REFUSED[name]} are not supported by this server.", name)
            continue
        shown = name if len(name) <= _MAX_NAME_CHARS else name[:_MAX_NAME_CHARS] + "..."
        raise bad_request(f"{shown}: Extra inputs are not permitted (not a Messages API field this server "
                          "knows).", shown)


def _system(system) -> list[dict]:
    if system is None or system == "" or system == []:
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}]
    if isinstance(system, list):
        return [{"role": "system", "content": "\n".join(_text_blocks(system, "system"))}]
    raise bad_request("'system' must be a string or an array of text blocks.", "system")


def _text_blocks(blocks: list, where: str) -> list[str]:
    texts = []
    for index, block in enumerate(blocks):
        _refuse_non_text(block, f"{where}.{index}")
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise bad_request(f"'{where}.{index}' must be a text block, {{\"type\": \"text\", \"text\": ...}}.",
                              f"{where}.{index}")
        texts.append(block["text"])
    return texts


def _refuse_non_text(block, where: str) -> None:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise bad_request(f"'{where}' must be a content block: an object with a 'type'.", where)
    kind = block["type"]
    if kind in ("image", "document"):
        raise bad_request(f"'{where}': {kind} content blocks are not supported: this server takes text input "
                          "only.", where)
    if kind not in ("text", "tool_use", "tool_result", "thinking", "redacted_thinking"):
        raise bad_request(f"'{where}': content blocks of type {kind!r} are not supported: {_TEXT_ONLY}.", where)


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array of {\"role\", \"content\"} objects.", "messages")
    converted = []
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise bad_request(f"'{where}' must be an object whose 'role' is \"user\" or \"assistant\" (the "
                              "system prompt goes in the top-level 'system').", f"{where}.role")
        role, content = message["role"], message.get("content")
        if isinstance(content, str):
            converted.append({"role": role, "content": content})
        elif isinstance(content, list):
            converted += _user_turn(content, where) if role == "user" else [_assistant_turn(content, where)]
        else:
            raise bad_request(f"'{where}.content' must be a string or an array of content blocks.",
                              f"{where}.content")
    last = converted[-1]
    if last["role"] == "assistant" and last.get("tool_calls"):
        raise bad_request("The last message is an assistant turn ending in tool_use: send the tool_result "
                          "blocks in a user message after it.", f"messages.{len(messages) - 1}")
    return converted


def _user_turn(blocks: list, where: str) -> list[dict]:
    """A user turn's blocks in order: tool_result blocks become OpenAI tool messages, text between them
    user messages (text blocks of one run joined by newlines, as the chat path joins text parts)."""
    converted, texts = [], []
    for index, block in enumerate(blocks):
        at = f"{where}.content.{index}"
        _refuse_non_text(block, at)
        kind = block["type"]
        if kind == "text":
            texts.append(_string(block, "text", at))
        elif kind == "tool_result":
            if texts:
                converted.append({"role": "user", "content": "\n".join(texts)})
                texts = []
            converted.append({"role": "tool", "tool_call_id": _string(block, "tool_use_id", at),
                              "content": _tool_result_text(block.get("content"), at)})
        else:
            raise bad_request(f"'{at}': a user turn may hold text and tool_result blocks, not {kind}.", at)
    if texts or not converted:
        converted.append({"role": "user", "content": "\n".join(texts)})
    return converted


def _tool_result_text(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_text_blocks(content, f"{where}.content"))
    raise bad_request(f"'{where}.content' must be a string or an array of text blocks.", f"{where}.content")


def _assistant_turn(blocks: list, where: str) -> dict:
    """An assistant turn: its text blocks are pieces of one generated text (joined as written), its
    tool_use blocks the calls; thinking is dropped, as chat templates render earlier turns without it."""
    texts, calls = [], []
    for index, block in enumerate(blocks):
        at = f"{where}.content.{index}"
        _refuse_non_text(block, at)
        kind = block["type"]
        if kind == "text":
            texts.append(_string(block, "text", at))
        elif kind == "tool_use":
            arguments = block.get("input")
            if not isinstance(arguments, dict):
                raise bad_request(f"'{at}.input' must be an object: the tool's arguments.", f"{at}.input")
            calls.append({"id": _string(block, "id", at), "type": "function",
                          "function": {"name": _string(block, "name", at), "arguments": arguments}})
        elif kind == "tool_result":
            raise bad_request(f"'{at}': tool_result blocks belong in a user turn.", at)
    message = {"role": "assistant", "content": "".join(texts)}
    if calls:
        message["tool_calls"] = calls
    return message


def _string(block: dict, name: str, where: str) -> str:
    value = block.get(name)
    if not isinstance(value, str):
        raise bad_request(f"'{where}.{name}' must be a string.", f"{where}.{name}")
    return value


def _thinking(thinking) -> bool | None:
    """`thinking` as the templates' `enable_thinking` (Qwen3's and others'); None when not given."""
    if thinking is None:
        return None
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "disabled":
        return False
    if kind in ("adaptive", "between_tools"):  # the model decides when to think: a template can only allow it
        return True
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if type(budget) is not int or budget < 1:
            raise bad_request("'thinking.budget_tokens' must be a positive integer.", "thinking.budget_tokens")
        return True
    raise bad_request("'thinking' must be {\"type\": \"enabled\", \"budget_tokens\": N} or {\"type\": "
                      "\"disabled\"}.", "thinking")


def _tools(tools, tool_choice, auto_tools: bool, thinking: bool | None) -> dict:
    """Anthropic's `tools` and `tool_choice` as OpenAI's function tools, tool_choice and parallel_tool_calls."""
    if tools is None or tools == []:
        if tool_choice is not None and not (isinstance(tool_choice, dict) and tool_choice.get("type") == "none"):
            raise bad_request("'tool_choice' needs 'tools': define the tools the model may call.", "tool_choice")
        return {}
    if not isinstance(tools, list):
        raise bad_request("'tools' must be an array of {\"name\", \"description\", \"input_schema\"} objects.",
                          "tools")
    functions = [_function(tool, f"tools.{index}") for index, tool in enumerate(tools)]
    choice, parallel = _tool_choice(tool_choice)
    if choice == "auto" and not auto_tools:
        raise bad_request("tool_choice \"auto\" (the default with tools) needs the server started with "
                          "--enable-auto-tool-choice and --tool-call-parser; or send tool_choice {\"type\": "
                          "\"any\"}, {\"type\": \"tool\", \"name\": ...} or {\"type\": \"none\"}.", "tool_choice")
    if thinking and choice not in ("auto", "none"):
        raise bad_request("Thinking may not be enabled when tool_choice forces tool use (\"any\" or \"tool\"): "
                          "the grammar that forces the call leaves no room for thinking.", "tool_choice")
    body = {"tools": functions, "tool_choice": choice}
    if not parallel:
        body["parallel_tool_calls"] = False
    return body


def _function(tool, where: str) -> dict:
    if not isinstance(tool, dict):
        raise bad_request(f"'{where}' must be an object with 'name' and 'input_schema'.", where)
    if tool.get("type", "custom") not in ("custom", None):
        raise bad_request(f"'{where}': server tools of type {tool['type']!r} are not supported: define client "
                          "tools with 'name', 'description' and 'input_schema'.", f"{where}.type")
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise bad_request(f"'{where}.name' is required: a non-empty string.", f"{where}.name")
    schema = tool.get("input_schema")
    if not isinstance(schema, dict):
        raise bad_request(f"'{where}.input_schema' is required: a JSON schema object.", f"{where}.input_schema")
    function = {"name": name, "parameters": schema}
    description = tool.get("description")
    if description is not None:
        if not isinstance(description, str):
            raise bad_request(f"'{where}.description' must be a string.", f"{where}.description")
        function["description"] = description
    return {"type": "function", "function": function}


def _tool_choice(tool_choice) -> tuple[str | dict, bool]:
    """(OpenAI's tool_choice, whether several calls may come)."""
    if tool_choice is None:
        return "auto", True
    kind = tool_choice.get("type") if isinstance(tool_choice, dict) else None
    disable_parallel = tool_choice.get("disable_parallel_tool_use", False) if kind is not None else False
    if type(disable_parallel) is not bool:
        raise bad_request("'tool_choice.disable_parallel_tool_use' must be true or false.",
                          "tool_choice.disable_parallel_tool_use")
    if kind == "auto":
        return "auto", not disable_parallel
    if kind == "any":
        return "required", not disable_parallel
    if kind == "none":
        return "none", True
    if kind == "tool":
        name = tool_choice.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request("'tool_choice.name' is required with {\"type\": \"tool\"}.", "tool_choice.name")
        return {"type": "function", "function": {"name": name}}, not disable_parallel
    raise bad_request("'tool_choice' must be {\"type\": \"auto\"}, {\"type\": \"any\"}, {\"type\": \"tool\", "
                      "\"name\": ...} or {\"type\": \"none\"}.", "tool_choice")


def _output_config(config) -> dict:
    """`effort` as reasoning_effort, `format` (a JSON schema) as the chat path's response_format."""
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise bad_request("'output_config' must be an object with 'effort' and/or 'format'.", "output_config")
    body: dict = {}
    effort = config.get("effort")
    if effort is not None:
        if effort not in _EFFORTS:
            raise bad_request(f"'output_config.effort' must be one of {', '.join(_EFFORTS)}; got {effort!r}.",
                              "output_config.effort")
        body["reasoning_effort"] = _EFFORTS[effort]
    output_format = config.get("format")
    if output_format is not None:
        if not isinstance(output_format, dict) or output_format.get("type") != "json_schema" or \
                not isinstance(output_format.get("schema"), dict):
            raise bad_request("'output_config.format' must be {\"type\": \"json_schema\", \"schema\": {...}}.",
                              "output_config.format")
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": output_format["schema"]}}
    return body


def _stop_sequences(stop) -> list[str]:
    if stop is None:
        return []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad_request("'stop_sequences' must be an array of non-empty strings.", "stop_sequences")
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_STRING_CHARS for s in stop):
        raise bad_request(f"'stop_sequences' may hold at most {MAX_STOP_STRINGS} strings of at most "
                          f"{MAX_STOP_STRING_CHARS} characters each.", "stop_sequences")
    return stop
