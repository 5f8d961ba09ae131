"""The Response object: what a request asked for (repeated back, as OpenAI does), its status, its output
items and its usage."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from asyncserve.utils.ids import random_hex_id

# The engine's finish reason -> the Response's status.
_STATUS = {"stop": "completed", "length": "incomplete", "abort": "cancelled"}
# The Response's status -> the stream event that ends it.
FINAL_EVENT = {"completed": "response.completed", "incomplete": "response.incomplete",
               "cancelled": "response.failed", "failed": "response.failed"}


@dataclass
class ResponseRun:
    """One response from its request to its end; `cancelled` is set by POST /v1/responses/{id}/cancel."""

    model: str
    echo: dict                 # the request fields the Response repeats (request.py)
    temperature: float
    top_p: float
    num_prompt_tokens: int
    id: str = field(default_factory=lambda: f"resp_{random_hex_id()}")
    created_at: int = field(default_factory=lambda: int(time.time()))
    cancelled: bool = False

    def status(self, finish_reason: str | None) -> str:
        """An abort nobody asked for by cancelling is the server's own (shutting down): the response failed."""
        status = _STATUS.get(finish_reason, "completed")
        return "failed" if status == "cancelled" and not self.cancelled else status

    def body(self, status: str, output: list[dict], usage: dict | None) -> dict:
        body = {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "error": _ERRORS.get(status), "incomplete_details": None, "model": self.model, "output": output,
                **self.echo, "temperature": self.temperature, "top_p": self.top_p, "usage": usage}
        if status == "incomplete":
            body["incomplete_details"] = {"reason": "max_output_tokens"}
        if status == "completed":
            body["completed_at"] = int(time.time())
        return body


def usage(num_prompt_tokens: int, num_output_tokens: int, num_cached_tokens: int) -> dict:
    """OpenAI's usage with the details objects the client reads; reasoning tokens are not counted apart
    (parsers split the text, not the tokens), so `reasoning_tokens` is 0."""
    return {"input_tokens": num_prompt_tokens,
            "input_tokens_details": {"cached_tokens": num_cached_tokens, "cache_write_tokens": 0},
            "output_tokens": num_output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": num_prompt_tokens + num_output_tokens}


_ERRORS = {"failed": {"code": "server_error", "message": "The server aborted the response (shutting down)."}}
