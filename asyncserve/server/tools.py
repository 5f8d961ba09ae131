"""A chat request's `tools`, `tool_choice` and `parallel_tool_calls`, checked, and the messages that carry
tool calls and tool results, in the shape chat templates read (arguments as objects, as vLLM passes them).

"required" and a named function are enforced by a JSON schema the grammar engine follows; "auto" needs
the server's `--enable-auto-tool-choice` and `--tool-call-parser`, as in vLLM.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import jsonschema

from asyncserve.server.errors import bad_request

_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class Function:
    name: str
    parameters: dict


@dataclass
class ToolChoice:
    """What the request asks of tool calling; `function` is the named function's name."""

    tools: list[dict] = field(default_factory=list)        # as the chat template reads them
    functions: dict[str, Function] = field(default_factory=dict)
    mode: str = "none"                                     # none | auto | required | function
    function: str | None = None
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "function")

    def schema(self) -> dict:
        """The JSON schema of the output that "required" / a named function forces."""
        if self.mode == "function":
            return self.functions[self.function].parameters
        definitions: dict = {}
        calls = []
        for function in self.functions.values():
            parameters = dict(function.parameters)
            definitions.update(parameters.pop("$defs", {}))  # refs are "#/$defs/...": keep them at the root
            calls.append({"type": "object", "properties": {"name": {"type": "string", "enum": [function.name]},
                                                           "parameters": parameters},
                          "required": ["name", "parameters"], "additionalProperties": False})
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel:
            schema["maxItems"] = 1
        if definitions:
            schema["$defs"] = definitions
        return schema


def _function(tool, index: int) -> tuple[dict, Function]:
    where = f"tools[{index}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise bad_request(f"'{where}' must be {{\"type\": \"function\", \"function\": {{...}}}}: only function "
                          "tools are supported.", where)
    function = tool.get("function")
    if not isinstance(function, dict):
        raise bad_request(f"'{where}.function' must be an object with 'name' and 'parameters'.", f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise bad_request(f"'{where}.function.name' is required: a non-empty string.", f"{where}.function.name")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise bad_request(f"'{where}.function.description' must be a string.", f"{where}.function.description")
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad_request(f"'{where}.function.strict' must be true or false.", f"{where}.function.strict")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = _EMPTY_PARAMETERS
    if not isinstance(parameters, dict):
        raise bad_request(f"'{where}.function.parameters' must be a JSON schema object, got "
                          f"{type(parameters).__name__}.", f"{where}.function.parameters")
    try:
        jsonschema.validators.validator_for(parameters).check_schema(parameters)
    except jsonschema.SchemaError as exc:
        path = "/".join(str(part) for part in exc.path)
        raise bad_request(f"'{where}.function.parameters' is not a valid JSON schema: {exc.message}"
                          + (f" (at {path})" if path else ""), f"{where}.function.parameters") from None
    template_tool = {"type": "function", "function": {**function, "parameters": parameters}}
    return template_tool, Function(name, parameters)


def _choice_mode(value, functions: dict[str, Function]) -> tuple[str, str | None]:
    if value in ("none", "auto", "required"):
        return value, None
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
        name = value["function"].get("name")
        if not isinstance(name, str):
            raise bad_request("'tool_choice.function.name' must be a string.", "tool_choice")
        if name not in functions:
            raise bad_request(f"'tool_choice' names the function {name!r}, which is not in 'tools' (they are: "
                              f"{', '.join(functions) or 'none'}).", "tool_choice")
        return "function", name
    raise bad_request("'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                      "\"function\": {\"name\": ...}}.", "tool_choice")


def parse_tool_choice(data: dict, *, auto_enabled: bool) -> ToolChoice | None:
    """The request's tool fields; None when it has no tools. `auto_enabled`: the server can parse calls."""
    tools, choice = data.get("tools"), data.get("tool_choice")
    parallel = data.get("parallel_tool_calls")
    if parallel is not None and type(parallel) is not bool:
        raise bad_request("'parallel_tool_calls' must be true or false.", "parallel_tool_calls")
    if tools is None or tools == []:
        if choice is not None and choice != "none":
            raise bad_request("'tool_choice' needs 'tools': name the functions the model may call.", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise bad_request("'tools' must be an array of {\"type\": \"function\", \"function\": {...}} objects.",
                          "tools")
    template_tools, functions = [], {}
    for index, tool in enumerate(tools):
        template_tool, function = _function(tool, index)
        if function.name in functions:
            raise bad_request(f"'tools' defines the function {function.name!r} twice.", f"tools[{index}]")
        template_tools.append(template_tool)
        functions[function.name] = function
    mode, name = _choice_mode("auto" if choice is None else choice, functions)
    if mode == "auto" and not auto_enabled:
        raise bad_request('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be '
                          'set (or send tool_choice "required", "none" or a named function).', "tool_choice")
    return ToolChoice(template_tools, functions, mode, name, parallel is not False)


def message_tool_fields(message: dict, role: str, where: str) -> dict:
    """An assistant message's `tool_calls` and a tool message's `tool_call_id`, as templates read them."""
    extra = {}
    if role == "tool":
        call_id = message.get("tool_call_id")
        if call_id is not None:
            if not isinstance(call_id, str):
                raise bad_request(f"'{where}.tool_call_id' must be a string.", f"{where}.tool_call_id")
            extra["tool_call_id"] = call_id
    calls = message.get("tool_calls")
    if calls is None:
        return extra
    if role != "assistant" or not isinstance(calls, list):
        raise bad_request(f"'{where}.tool_calls' must be an array, on an assistant message.", f"{where}.tool_calls")
    parsed = []
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not isinstance(function.get("arguments", ""), (str, dict)):
            raise bad_request(f"'{where}.tool_calls[{index}]' must be {{\"id\", \"type\": \"function\", "
                              "\"function\": {\"name\", \"arguments\"}}.", f"{where}.tool_calls")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):  # templates iterate or `tojson` the arguments: give them the object
            try:
                arguments = json.loads(arguments)
            except ValueError:
                pass
        parsed.append({"id": call.get("id"), "type": "function",
                       "function": {"name": function["name"], "arguments": arguments}})
    extra["tool_calls"] = parsed
    return extra
