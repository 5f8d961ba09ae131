"""Responses input items -> chat messages: the conversation the chat template renders, whatever mix of
message, function_call and function_call_output items (and earlier turns' stored items) it came as."""
from __future__ import annotations

from asyncserve.server.errors import bad_request

_ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = ("input_text", "output_text", "text")
# Content parts asking for input this server cannot take, by what they ask for.
_REFUSED_PARTS = {"input_image": "image input", "input_file": "file input", "input_audio": "audio input"}
# Items of OpenAI's built-in tools: nothing here ran them, so nothing can be replayed to the model.
_TOOL_ITEMS = ("file_search_call", "web_search_call", "computer_call", "computer_call_output",
               "image_generation_call", "code_interpreter_call", "local_shell_call", "local_shell_call_output",
               "shell_call", "shell_call_output", "apply_patch_call", "apply_patch_call_output", "mcp_list_tools",
               "mcp_approval_request", "mcp_approval_response", "mcp_call", "custom_tool_call",
               "custom_tool_call_output", "tool_search_call", "tool_search_output", "compaction")


def text_input(text: str) -> list[dict]:
    """`input` given as a string: one user message."""
    return [{"type": "message", "role": "user", "content": text}]


def _text(content, where: str) -> str:
    """A message's or a tool output's content as one text: a string, or text parts joined by newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"'{where}' must be a string or an array of input_text parts.", where)
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _REFUSED_PARTS:
            raise bad_request(f"'{where}[{index}]': {_REFUSED_PARTS[kind]} ({kind}) is not supported by this "
                              "server: it serves text-only models.", f"{where}[{index}]")
        text = part.get("refusal" if kind == "refusal" else "text") if isinstance(part, dict) else None
        if kind not in (*_TEXT_PARTS, "refusal") or not isinstance(text, str):
            raise bad_request(f"'{where}[{index}]' must be a text part: {{\"type\": \"input_text\", \"text\": "
                              "...}} (or output_text for an assistant's).", f"{where}[{index}]")
        texts.append(text)
    return "\n".join(texts)


def _string(item: dict, name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise bad_request(f"'{where}.{name}' is required: a string.", f"{where}.{name}")
    return value


def parse_input(value) -> list[dict]:
    """The request's `input` as items in one shape: message items with text content, function_call and
    function_call_output items, reasoning items (kept for the record; chat templates drop them)."""
    if isinstance(value, str):
        return text_input(value)
    if not isinstance(value, list):
        raise bad_request("'input' must be a string or an array of input items.", "input")
    return [_item(item, f"input[{index}]") for index, item in enumerate(value)]


def _item(item, where: str) -> dict:
    if not isinstance(item, dict):
        raise bad_request(f"'{where}' must be an input item object.", where)
    kind = item.get("type") or ("message" if "role" in item else None)
    if kind == "message":
        role = item.get("role")
        if role not in _ROLES:
            raise bad_request(f"'{where}.role' must be one of {', '.join(_ROLES)}; got {role!r}.", f"{where}.role")
        return {"type": "message", "role": role, "content": _text(item.get("content"), f"{where}.content")}
    if kind == "function_call":
        return {"type": "function_call", "call_id": _string(item, "call_id", where),
                "name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}
    if kind == "function_call_output":
        return {"type": "function_call_output", "call_id": _string(item, "call_id", where),
                "output": _text(item.get("output"), f"{where}.output")}
    if kind == "reasoning":
        return {"type": "reasoning"}
    if kind == "item_reference":
        raise bad_request(f"'{where}': item_reference is not supported by this server: send the items "
                          "themselves, or previous_response_id.", where)
    if kind in _TOOL_ITEMS:
        raise bad_request(f"'{where}': {kind} items are not supported by this server: it runs no built-in "
                          "tools (only function tools).", where)
    raise bad_request(f"'{where}.type' must be message, function_call, function_call_output or reasoning; "
                      f"got {kind!r}.", f"{where}.type")


def chat_messages(instructions: str | None, items: list[dict]) -> list[dict]:
    """The chat messages of a conversation's items (`parse_input`'s shape, or stored output items):
    instructions first as the system message, a turn's function calls on its assistant message."""
    messages = [{"role": "system", "content": instructions}] if instructions is not None else []
    for item in items:
        kind = item["type"]
        if kind == "message":
            content = item["content"]
            if not isinstance(content, str):  # a stored output message: output_text parts
                content = "".join(part.get("text", "") for part in content)
            messages.append({"role": item["role"], "content": content})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
        # reasoning: chat templates render no earlier turn's thinking, so it is not sent to them
    return messages
