"""A streamed response's SSE frames: `event: <type>` and `data: <json>` with increasing sequence numbers,
from response.created to response.completed (or .incomplete, or .failed for a cancelled one); written by
the engine's step handler through server/stream_sink.py like any other stream."""
from __future__ import annotations

from collections.abc import Callable

import orjson

from asyncserve.outputs import RequestOutput
from asyncserve.server.responses.output_items import OutputItems
from asyncserve.server.responses.response_object import FINAL_EVENT, ResponseRun, usage


class ResponseStreamWriter:
    """The StreamWriter (server/serving.py) of one response; `on_end(body)` gets the final Response."""

    def __init__(self, run: ResponseRun, output: OutputItems, on_end: Callable[[dict], None]):
        self.run = run
        self.output = output
        self.on_end = on_end
        self.num_tokens = 0
        self._sequence_number = 0

    def _frames(self, events: list[dict]) -> bytes:
        frames = []
        for event in events:
            event["sequence_number"] = self._sequence_number
            self._sequence_number += 1
            frames.append(b"event: %s\ndata: %s\n\n" % (event["type"].encode(), orjson.dumps(event)))
        return b"".join(frames)

    def first_frame(self) -> bytes:
        body = self.run.body("in_progress", [], None)
        return self._frames([{"type": "response.created", "response": body},
                             {"type": "response.in_progress", "response": body}])

    def step_frame(self, batch: list[tuple[int, RequestOutput]]) -> bytes:
        events = []
        for _, output in batch:  # one prompt, one choice
            completion = output.outputs[0]
            self.num_tokens += len(completion.token_ids)
            if completion.text:
                events += self.output.feed(completion.text)
            if completion.finish_reason is not None:
                events += self._end(self.run.status(completion.finish_reason), output.num_cached_tokens)
        return self._frames(events) if events else b""

    def _end(self, status: str, num_cached_tokens: int) -> list[dict]:
        events = self.output.finish("completed" if status == "completed" else "incomplete")
        body = self.run.body(status, self.output.items,
                             usage(self.run.num_prompt_tokens, self.num_tokens, num_cached_tokens))
        self.on_end(body)
        return events + [{"type": FINAL_EVENT[status], "response": body}]

    def usage_frame(self, usage_body: dict) -> bytes:
        return b""  # the usage is in the final event's response

    def completion_tokens(self) -> int:
        return self.num_tokens
