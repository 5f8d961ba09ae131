"""An engine whose output text is scripted, for parsers end to end: a random-weight model never writes a
tool call or a think block by itself. Only `add_request` is replaced; the HTTP server is the real one."""
from __future__ import annotations

import asyncio
import contextlib

from asyncserve.outputs import CompletionOutput, RequestOutput


@contextlib.contextmanager
def scripted_output(engine, pieces: list[str], finish_reason: str = "stop", seen_params: list | None = None):
    """The engine 'generates' `pieces`, one per step; the rest of the server is real. Each request's
    SamplingParams are appended to `seen_params` when given."""
    def add_request(prompt, params, request_id=None):
        if seen_params is not None:
            seen_params.append(params)
        stream: asyncio.Queue = asyncio.Queue()
        text = ""
        for step, piece in enumerate(pieces):
            text += piece
            last = step == len(pieces) - 1
            completion = CompletionOutput(0, text, list(range(step + 1)), finish_reason=finish_reason if last else None)
            stream.put_nowait(RequestOutput(request_id, prompt["prompt"], prompt["prompt_token_ids"], [completion],
                                            finished=last))
        return None, stream

    engine.add_request = add_request
    try:
        yield
    finally:
        del engine.add_request
