"""POST /v1/completions: prompts in (text or token ids, one or many), `text_completion` objects out."""
from __future__ import annotations

from typing import Iterator

from aiohttp import web

from asyncserve.outputs import CompletionOutput, RequestOutput
from asyncserve.server.generation import Generation, Prompt, check_prompt, truncate
from asyncserve.server.handler import handle_generation
from asyncserve.server.protocol import CompletionRequest, Fields, parse_completion
from asyncserve.server.serving import Cursor, encode_json, response_entries, token_usage, usage
from asyncserve.server.sse import ChunkEncoder
from asyncserve.server.state import ServerState


def _prompt(state: ServerState, prompt: str | list[int]) -> Prompt:
    if isinstance(prompt, str) and state.prompt_encoder is not None:
        return Prompt(prompt, state.prompt_encoder.encode(prompt, True, "prompt"))
    text, token_ids = state.engine.tokenize_prompt(prompt)
    return Prompt(text, token_ids)


class _Echo:
    """What `echo` puts in front of each choice: the prompt text, and its logprobs when asked for."""

    def __init__(self, state: ServerState, parsed: CompletionRequest, prompts: list[Prompt]):
        self.enabled = parsed.echo
        self.state = state
        self.texts = [p.text if p.text is not None else state.tokenizer.decode(p.token_ids) for p in prompts]
        self.prompts = prompts
        self.as_token_ids = parsed.return_tokens_as_token_ids

    def text(self, prompt_index: int) -> str:
        return self.texts[prompt_index] if self.enabled else ""

    def logprobs(self, prompt_index: int, output: RequestOutput, num_top: int) -> dict | None:
        if not self.enabled:
            return None
        return self.state.logprobs.completion(self.prompts[prompt_index].token_ids, output.prompt_logprobs or [],
                                              num_top, 0, self.as_token_ids)


class _PromptLogprobs:
    """vLLM's `prompt_logprobs` of each prompt, when the request asked for them: built once per prompt,
    whatever the number of choices that carry them."""

    def __init__(self, state: ServerState, parsed: CompletionRequest):
        self.enabled = parsed.return_prompt_logprobs
        self.state = state
        self.built: dict[int, list] = {}

    def of(self, prompt_index: int, output: RequestOutput) -> list:
        built = self.built.get(prompt_index)
        if built is None:
            built = self.built[prompt_index] = self.state.logprobs.prompt(output.prompt_logprobs or [])
        return built


def _join_logprobs(head: dict | None, tail: dict) -> dict:
    if head is None:
        return tail
    return {key: head[key] + tail[key] for key in tail}


class CompletionStreamWriter:
    """Each choice's first chunk also carries its prompt's `prompt_logprobs` when asked for (vLLM's stream
    drops them); with continuous usage stats, every chunk its choice's usage so far."""

    def __init__(self, state: ServerState, parsed: CompletionRequest, encoder: ChunkEncoder, echo: _Echo,
                 prompts: list[Prompt]):
        self.state = state
        self.n = parsed.params.n
        self.num_top = parsed.params.logprobs
        self.as_token_ids = parsed.return_tokens_as_token_ids
        self.encoder = encoder
        self.echo = echo
        self.prompt_logprobs = _PromptLogprobs(state, parsed)
        self.prompt_lengths = [len(prompt.token_ids) for prompt in prompts] if parsed.continuous_usage else None
        self.cursors: dict[int, Cursor] = {}
        self.return_token_ids = parsed.return_token_ids
        self.prompt_token_ids = [prompt.token_ids for prompt in prompts] if parsed.return_token_ids else None
        self.echoed: set[int] = set()
        self.started: set[int] = set()

    def first_frame(self) -> bytes:
        return b""

    def _choice(self, prompt_index: int, output: RequestOutput, completion: CompletionOutput) -> dict | None:
        index = prompt_index * self.n + completion.index
        cursor = self.cursors.get(index)
        if cursor is None:
            cursor = self.cursors[index] = Cursor()
        text_offset = len(self.echo.text(prompt_index)) + cursor.text_len
        if not cursor.advance(completion):
            return None
        text, finish_reason = completion.text, completion.finish_reason
        echo_now = self.echo.enabled and index not in self.echoed
        if not text and finish_reason is None and self.num_top is None and not echo_now \
                and not self.return_token_ids:
            return None  # tokens that do not make a whole character yet
        logprobs = None
        if self.num_top is not None:
            logprobs = self.state.logprobs.completion(completion.token_ids, completion.logprobs, self.num_top,
                                                      text_offset, self.as_token_ids)
        if echo_now:
            self.echoed.add(index)
            text = self.echo.text(prompt_index) + text
            if logprobs is not None:
                logprobs = _join_logprobs(self.echo.logprobs(prompt_index, output, self.num_top), logprobs)
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
                  "stop_reason": completion.stop_reason if finish_reason else None}
        if self.prompt_logprobs.enabled and index not in self.started:
            choice["prompt_logprobs"] = self.prompt_logprobs.of(prompt_index, output)
        if self.return_token_ids:  # vLLM's: the prompt's ids in a choice's first chunk, each chunk's new ids
            if index not in self.started:
                choice["prompt_token_ids"] = self.prompt_token_ids[prompt_index]
            choice["token_ids"] = list(completion.token_ids)
        self.started.add(index)
        return choice

    def step_frame(self, batch: list[tuple[int, RequestOutput]]) -> bytes:
        """One step's deltas (one output per prompt that moved on) as chunks."""
        choices, usages = [], [] if self.prompt_lengths is not None else None
        for prompt_index, output in batch:
            for completion in output.outputs:
                choice = self._choice(prompt_index, output, completion)
                if choice is not None:
                    choices.append(choice)
                    if usages is not None:
                        usages.append(token_usage(self.prompt_lengths[prompt_index],
                                                  self.cursors[choice["index"]].num_tokens))
        return self.encoder.frame(choices, usages) if choices else b""

    def completion_tokens(self) -> int:
        return sum(cursor.num_tokens for cursor in self.cursors.values())

    def usage_frame(self, usage_body: dict) -> bytes:
        return self.encoder.usage_frame(usage_body)


def _choices(state: ServerState, parsed: CompletionRequest, generation: Generation,
             latest: dict[int, RequestOutput], echo: _Echo) -> Iterator[dict]:
    n, num_top = parsed.params.n, parsed.params.logprobs
    prompt_logprobs = _PromptLogprobs(state, parsed)
    for prompt_index in range(len(generation.prompts)):
        output = latest[prompt_index]
        prefix = echo.text(prompt_index)
        for completion in output.outputs:
            logprobs = None
            if num_top is not None:
                logprobs = _join_logprobs(
                    echo.logprobs(prompt_index, output, num_top),
                    state.logprobs.completion(completion.token_ids, completion.logprobs, num_top, len(prefix),
                                              parsed.return_tokens_as_token_ids))
            choice = {"index": prompt_index * n + completion.index, "text": prefix + completion.text,
                      "logprobs": logprobs, "finish_reason": completion.finish_reason,
                      "stop_reason": completion.stop_reason}
            if prompt_logprobs.enabled:
                choice["prompt_logprobs"] = prompt_logprobs.of(prompt_index, output)
            if parsed.return_token_ids:
                choice["prompt_token_ids"] = generation.prompts[prompt_index].token_ids
                choice["token_ids"] = list(completion.token_ids)
            yield choice


def _head(response_id: str, created: int, model: str, generation, latest: dict[int, RequestOutput]) -> dict:
    return {"id": response_id, "object": "text_completion", "created": created, "model": model,
            "usage": usage(generation, latest)}


def _body(state: ServerState, parsed: CompletionRequest, response_id: str, created: int, model: str,
          generation: Generation, latest: dict[int, RequestOutput], echo: _Echo) -> dict:
    return {**_head(response_id, created, model, generation, latest),
            "choices": list(_choices(state, parsed, generation, latest, echo))}


def _encode_body(state: ServerState, parsed: CompletionRequest, response_id: str, created: int, model: str,
                 generation: Generation, latest: dict[int, RequestOutput], echo: _Echo) -> bytes:
    return encode_json(_head(response_id, created, model, generation, latest),
                       _choices(state, parsed, generation, latest, echo))


class _Prepared:
    """A completions request, ready to queue (see server/handler.py)."""

    kind, id_prefix, chunk_object, chat = "completions", "cmpl", "text_completion", False

    def __init__(self, model: str, parsed: CompletionRequest, prompts: list[Prompt], echo: _Echo):
        self.model, self.parsed, self.prompts, self.echo = model, parsed, prompts, echo

    def body(self, state, response_id, created, generation, latest) -> dict:
        return _body(state, self.parsed, response_id, created, self.model, generation, latest, self.echo)

    def encode_body(self, state, response_id, created, generation, latest) -> bytes:
        return _encode_body(state, self.parsed, response_id, created, self.model, generation, latest,
                            self.echo)

    def stream_writer(self, state, encoder):
        return CompletionStreamWriter(state, self.parsed, encoder, self.echo, self.prompts)

    def num_entries(self, latest) -> int:
        params = self.parsed.params
        return response_entries(latest, params.logprobs, self.echo.enabled,
                                params.prompt_logprobs if self.parsed.return_prompt_logprobs else None)


def _prepare(state: ServerState, data) -> _Prepared:
    """Everything before queueing: parse, tokenize, check (in the worker thread for big bodies)."""
    model = state.resolve_model(Fields(data).string("model"))
    engine = state.engine
    parsed = parse_completion(data, vocab_size=engine.vocab_size, defaults=engine.sampling_defaults)
    prompts = [truncate(engine, _prompt(state, prompt), parsed.params) for prompt in parsed.prompts]
    for prompt in prompts:
        check_prompt(engine, prompt, parsed.params, "prompt")
    return _Prepared(model, parsed, prompts, _Echo(state, parsed, prompts))


async def create_completion(request: web.Request) -> web.StreamResponse:
    return await handle_generation(request, _prepare)
