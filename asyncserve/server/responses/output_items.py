"""One generation's text -> the Response's output items (reasoning, message, function_call), grown from the
chat path's parsed deltas, with the stream events that announce each change. A whole response is built by
the very same steps as a streamed one, so the two always agree.
"""
from __future__ import annotations

from collections.abc import Callable

from asyncserve.server.chat_output import ChoiceParser
from asyncserve.utils.ids import random_hex_id


class OutputItems:
    """Feeds one choice's text deltas through its parser (or none) into output items; each call returns
    the events (dicts without sequence numbers) that the change is streamed as."""

    def __init__(self, make_parser: Callable[[], ChoiceParser] | None):
        self.parser = make_parser() if make_parser is not None else None
        self.items: list[dict] = []
        self._open: dict | None = None  # the item being written: always the last of `items`
        self._pieces: list[str] = []    # its text (or arguments) so far
        self._space = ""                # whitespace content not yet given to a message (see _content)
        self._num_calls = 0

    def feed(self, text: str) -> list[dict]:
        if self.parser is None:
            return self._content(text)
        return self._deltas(self.parser.feed(text))

    def finish(self, item_status: str) -> list[dict]:
        """Closes the last item with `item_status` ("completed" or "incomplete")."""
        events = self._deltas(self.parser.finish()) if self.parser is not None else []
        if self._space and not self._num_calls:
            events += self._content("", flush=True)
        if not self.items:  # nothing at all was written: an empty answer is still a message
            events += self._open_message()
        return events + self._close(item_status)

    # ---- the parser's chat deltas -> items ---------------------------------------------------------------

    def _deltas(self, deltas: list[dict]) -> list[dict]:
        events = []
        for delta in deltas:
            if "content" in delta:
                events += self._content(delta["content"])
            elif "reasoning" in delta:
                events += self._reasoning(delta["reasoning"])
            else:
                call = delta["tool_calls"][0]
                if "id" in call:
                    events += self._open_call(call["function"]["name"])
                else:
                    events += self._append("response.function_call_arguments.delta", call["function"]["arguments"])
        return events

    def _content(self, text: str, flush: bool = False) -> list[dict]:
        """Answer text. Whitespace outside a message waits: next to tool calls it makes no message (as the
        chat path gives no content for it); before text it joins the message."""
        if self._kind() != "message":
            if not flush and not (self._space + text).strip():
                self._space += text
                return []
            text, self._space = self._space + text, ""
            events = self._close("completed") + self._open_message()
        else:
            events = []
        return events + self._append("response.output_text.delta", text) if text else events

    def _reasoning(self, text: str) -> list[dict]:
        events = []
        if self._kind() != "reasoning":
            item = {"id": f"rs_{random_hex_id()}", "type": "reasoning", "summary": [], "status": "in_progress"}
            events = self._close("completed") + self._added({**item, "content": []})
            item["content"] = [{"type": "reasoning_text", "text": ""}]
            events += self._begin(item, {"type": "reasoning_text", "text": ""})
        return events + self._append("response.reasoning_text.delta", text)

    def _open_message(self) -> list[dict]:
        item = {"id": f"msg_{random_hex_id()}", "type": "message", "role": "assistant", "status": "in_progress"}
        part = {"type": "output_text", "text": "", "annotations": []}
        events = self._added({**item, "content": []})
        item["content"] = [dict(part)]
        return events + self._begin(item, part)

    def _open_call(self, name: str) -> list[dict]:
        self._num_calls += 1
        item = {"id": f"fc_{random_hex_id()}", "type": "function_call", "call_id": f"call_{random_hex_id()}",
                "name": name, "arguments": "", "status": "in_progress"}
        events = self._close("completed") + self._added(dict(item))
        self.items.append(item)
        self._open, self._pieces = item, []
        return events

    # ---- item lifecycle --------------------------------------------------------------------------------

    def _kind(self) -> str | None:
        return self._open["type"] if self._open is not None else None

    def _added(self, snapshot: dict) -> list[dict]:
        return [{"type": "response.output_item.added", "output_index": len(self.items), "item": snapshot}]

    def _begin(self, item: dict, part: dict) -> list[dict]:
        """An item with one content part opens: the part is announced, its text comes in deltas."""
        self.items.append(item)
        self._open, self._pieces = item, []
        return [{"type": "response.content_part.added", **self._where(), "content_index": 0, "part": dict(part)}]

    def _where(self) -> dict:
        return {"item_id": self._open["id"], "output_index": len(self.items) - 1}

    def _append(self, event_type: str, text: str) -> list[dict]:
        self._pieces.append(text)
        event = {"type": event_type, **self._where(), "delta": text}
        if event_type != "response.function_call_arguments.delta":
            event["content_index"] = 0
        if event_type == "response.output_text.delta":
            event["logprobs"] = []
        return [event]

    def _close(self, status: str) -> list[dict]:
        item = self._open
        if item is None:
            return []
        text = "".join(self._pieces)
        where = self._where()
        item["status"] = status
        self._open, self._pieces = None, []
        if item["type"] == "function_call":
            item["arguments"] = text
            return [{"type": "response.function_call_arguments.done", **where, "name": item["name"],
                     "arguments": text},
                    {"type": "response.output_item.done", "output_index": where["output_index"], "item": item}]
        part = item["content"][0]
        part["text"] = text
        done = ({"type": "response.output_text.done", **where, "content_index": 0, "text": text, "logprobs": []}
                if item["type"] == "message" else
                {"type": "response.reasoning_text.done", **where, "content_index": 0, "text": text})
        return [done, {"type": "response.content_part.done", **where, "content_index": 0, "part": dict(part)},
                {"type": "response.output_item.done", "output_index": where["output_index"], "item": item}]
