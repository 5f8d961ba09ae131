"""One HTTP request's engine requests, one per prompt: checked, streamed and aborted together."""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any, AsyncIterator

from asyncserve.errors import InvalidParameterError, PromptTooLongError
from asyncserve.outputs import RequestOutput
from asyncserve.sampling_params import SamplingParams
from asyncserve.server.errors import bad_request
from asyncserve.server.prompt_encoder import too_long


@dataclass
class Prompt:
    text: str | None
    token_ids: list[int]
    multimodal: Any = None  # MultiModalInputs of its images (placeholders expanded in token_ids)


def truncate(engine, prompt: Prompt, params: SamplingParams) -> Prompt:
    """`truncate_prompt_tokens`: only the prompt's last tokens go on (an echo decodes them back to text)."""
    token_ids = params.truncate_prompt(prompt.token_ids, engine.max_model_len)
    if len(token_ids) == len(prompt.token_ids):
        return prompt
    if prompt.multimodal is not None:
        raise bad_request("truncate_prompt_tokens would cut a prompt with images; send it without truncation.",
                          "truncate_prompt_tokens")
    return Prompt(None, token_ids)


def check_prompt(engine, prompt: Prompt, params: SamplingParams, param: str,
                 logprobs_field: str = "logprobs") -> None:
    """The engine's rules (`engine.validate`, the one place they live) in OpenAI's words, plus OpenAI's
    own rule that the prompt and max_tokens fit the context; all before anything is queued."""
    max_len = engine.max_model_len
    num_prompt = len(prompt.token_ids)
    try:
        engine.validate(prompt.token_ids, params)  # empty, out-of-vocab ids, length, logprobs, best_of
    except PromptTooLongError:
        raise too_long(max_len, str(num_prompt), param) from None
    except InvalidParameterError as exc:
        if exc.param == "logprobs" and logprobs_field != "logprobs":  # chat names the field top_logprobs
            raise bad_request(str(exc).replace("logprobs=", f"{logprobs_field}=", 1), logprobs_field) from None
        raise
    if params.max_tokens is not None and num_prompt + params.max_tokens > max_len:
        raise bad_request(
            f"This model's maximum context length is {max_len} tokens. However, you requested "
            f"{num_prompt + params.max_tokens} tokens ({num_prompt} in the {param}, {params.max_tokens} in "
            "the completion). Reduce the length of the prompt or max_tokens.", "max_tokens")


class Generation:
    """The engine requests behind one HTTP request; `outputs()` must be closed (aclosing) to abort leftovers."""

    def __init__(self, engine, base_id: str, prompts: list[Prompt], params: SamplingParams, sink=None,
                 lora_request=None, cache_salt: str | None = None, priority: int = 0):
        """`sink` (a server.stream_sink.StreamSink): the outputs go there, step by step, instead of to
        `outputs()`."""
        self.engine = engine
        self.prompts = prompts
        self.params = params
        self.request_ids: list[str] = []
        self._streams = []
        self._finished = [False] * len(prompts)
        try:
            for index, prompt in enumerate(prompts):
                request_id = f"{base_id}-{index}"
                adapter = {"lora_request": lora_request} if lora_request is not None else {}
                if priority:
                    adapter["priority"] = priority
                engine_prompt = {"prompt": prompt.text, "prompt_token_ids": prompt.token_ids}
                if prompt.multimodal is not None:  # processed in the worker thread (server/chat.py)
                    engine_prompt["multi_modal_inputs"] = prompt.multimodal
                if cache_salt is not None:
                    engine_prompt["cache_salt"] = cache_salt
                _, stream = engine.add_request(engine_prompt, params, request_id,
                                               sink.for_prompt(index) if sink is not None else None, **adapter)
                self.request_ids.append(request_id)
                self._streams.append(stream)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for index, request_id in enumerate(self.request_ids):
            if not self._finished[index]:
                self.engine.abort(request_id)

    async def outputs(self) -> AsyncIterator[list[tuple[int, RequestOutput]]]:
        """Per engine step: [(prompt_index, newest cumulative output)]; leaving early aborts the rest."""
        try:
            if len(self._streams) == 1:
                stream = self._streams[0]
                while not self._finished[0]:
                    output = await stream.get()
                    self._finished[0] = output.finished
                    yield [(0, output)]
            else:
                async with contextlib.aclosing(self._merged()) as merged:
                    async for batch in merged:
                        yield batch
        finally:
            self.abort()

    async def _merged(self) -> AsyncIterator[list[tuple[int, RequestOutput]]]:
        pending = {asyncio.ensure_future(stream.get()): index for index, stream in enumerate(self._streams)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                batch = []
                for task in done:
                    index = pending.pop(task)
                    output = task.result()
                    batch.append((index, output))
                    if output.finished:
                        self._finished[index] = True
                    else:
                        pending[asyncio.ensure_future(self._streams[index].get())] = index
                batch.sort(key=lambda item: item[0])
                yield batch
        finally:
            for task in pending:
                task.cancel()
