"""An engine whose output text is scripted, for parsers end to end: a random-weight model never writes a
tool call or a think block by itself. Only `add_request` is replaced; the HTTP server is the real one."""
from __future__ import annotations

import asyncio
import contextlib

from asyncserve.outputs import CompletionOutput, RequestOutput


@contextlib.contextmanager
def scripted_output(engine, pieces: list[str], finish_reason: str = "stop", seen_params: list | None = None,
                    seen_prompts: list | None = None):
    """The engine 'generates' `pieces`, one per step; the rest of the server is real. Each request's
    SamplingParams are appended to `seen_params`, its prompt (a dict with `prompt_token_ids`) to
    `seen_prompts`, when given."""
    def add_request(prompt, params, request_id=None, sink=None):
        if seen_params is not None:
            seen_params.append(params)
        if seen_prompts is not None:
            seen_prompts.append(prompt)
        outputs = []
        text = ""
        for step, piece in enumerate(pieces):
            text += piece
            last = step == len(pieces) - 1
            completion = CompletionOutput(0, text, list(range(step + 1)), finish_reason=finish_reason if last else None)
            outputs.append(RequestOutput(request_id, prompt["prompt"], prompt["prompt_token_ids"], [completion],
                                         finished=last))
        if sink is not None:  # a streamed request: one output per loop iteration, as engine steps come
            loop = asyncio.get_running_loop()
            if getattr(sink, "delta", False):  # what the engine gives a streaming sink: each step's news only
                outputs = [RequestOutput(request_id, prompt["prompt"], prompt["prompt_token_ids"],
                                         [CompletionOutput(0, piece, [step], finish_reason=output.outputs[0].finish_reason)],
                                         finished=output.finished)
                           for step, (piece, output) in enumerate(zip(pieces, outputs))]

            def step(index: int = 0) -> None:
                sink.put(outputs[index])
                sink.end_step()
                if index + 1 < len(outputs):
                    loop.call_soon(step, index + 1)

            loop.call_soon(step)
            return None, sink
        stream: asyncio.Queue = asyncio.Queue()
        for output in outputs:
            stream.put_nowait(output)
        return None, stream

    engine.add_request = add_request
    try:
        yield
    finally:
        del engine.add_request
