"""POST /v1/chat/completions: messages through the chat template, `chat.completion(.chunk)` objects out."""
from __future__ import annotations

import inspect
import os
from typing import Iterator

import jinja2
from aiohttp import web

from asyncserve.errors import ConfigError
from asyncserve.multimodal.chat_parts import first_image_part, has_image_parts, split_image_parts
from asyncserve.outputs import RequestOutput
from asyncserve.sampling_params import StructuredOutputsParams
from asyncserve.server.chat_output import ChoiceParser, message, parser_factory
from asyncserve.parsers.reasoning import get_reasoning_parser
from asyncserve.parsers.tool_calls import get_tool_parser
from asyncserve.server.errors import bad_request
from asyncserve.server.generation import Generation, Prompt, check_prompt, truncate
from asyncserve.server.handler import handle_generation
from asyncserve.server.protocol import ChatRequest, Fields, parse_chat
from asyncserve.server.serving import Cursor, encode_json, response_entries, token_usage, usage
from asyncserve.server.sse import ChunkEncoder
from asyncserve.server.state import ServerState


def load_chat_template(value: str | None) -> str | None:
    """`--chat-template`: a file's contents, or the template itself when it looks like Jinja."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    raise ConfigError(f"--chat-template {value!r} is neither a file nor a Jinja template string.")


# What a chat template reads besides `chat_template_kwargs`: a request may not rewrite the conversation,
# the tools, the special tokens the model was trained on, or the template's helpers.
_TEMPLATE_VARIABLES = frozenset({
    "messages", "add_generation_prompt", "continue_final_message", "tools", "documents", "raise_exception",
    "strftime_now", "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
    "additional_special_tokens"})


def _reserved_template_kwargs(tokenizer) -> frozenset[str]:
    names = inspect.signature(tokenizer.apply_chat_template).parameters
    special = set(getattr(tokenizer, "SPECIAL_TOKENS_ATTRIBUTES", ())) | set(tokenizer.special_tokens_map)
    return frozenset(name for name in names if name != "kwargs") | _TEMPLATE_VARIABLES | special


def render(state: ServerState, parsed: ChatRequest) -> Prompt:
    """The conversation as a prompt, exactly as `tokenizer.apply_chat_template(..., tokenize=True)` makes it."""
    tokenizer = state.tokenizer
    template = state.chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise bad_request("This model has no chat template: start the server with --chat-template, or use "
                          "/v1/completions.", "messages")
    clash = parsed.chat_template_kwargs and set(parsed.chat_template_kwargs) & _reserved_template_kwargs(tokenizer)
    if clash:
        raise bad_request(f"'chat_template_kwargs' may not set {sorted(clash)}.", "chat_template_kwargs")
    tools = parsed.tool_choice.tools if parsed.tool_choice is not None else None
    messages, images = parsed.messages, []
    if has_image_parts(messages):
        if not state.engine.supports_images:
            raise bad_request("This model takes no images: send text parts only, or serve a vision-language model "
                              "(Qwen2.5-VL).", first_image_part(messages))
        messages, images = split_image_parts(messages, state.engine.allowed_local_media_path)  # decoded here
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, tools=tools,
                                             add_generation_prompt=parsed.add_generation_prompt,
                                             continue_final_message=parsed.continue_final_message,
                                             **parsed.chat_template_kwargs)
    except (jinja2.TemplateError, ValueError) as exc:
        raise bad_request(f"The chat template cannot render these messages: {exc}", "messages") from None
    # The template writes BOS itself where the model wants one, so no special tokens are added here.
    token_ids = state.prompt_encoder.encode(text, False, "messages")
    if not images:
        return Prompt(text, token_ids)
    token_ids, multimodal = state.engine.process_images(token_ids, images, "messages")
    return Prompt(text, token_ids, multimodal)


class ChatStreamWriter:
    """With continuous usage stats, every chunk carries its choice's usage so far (vLLM's)."""

    def __init__(self, state: ServerState, parsed: ChatRequest, encoder: ChunkEncoder, prompt: Prompt):
        self.state = state
        self.prompt_tokens = len(prompt.token_ids) if parsed.continuous_usage else None
        self.n = parsed.params.n
        self.num_top = parsed.top_logprobs
        self.as_token_ids = parsed.return_tokens_as_token_ids
        self.encoder = encoder
        self.cursors = [Cursor() for _ in range(self.n)]
        # vLLM's return_token_ids: the prompt's ids in the first chunk, each chunk's new ids in its choice.
        self.prompt_token_ids = list(prompt.token_ids) if parsed.return_token_ids else None
        make = choice_parsers(state, parsed)
        self.parsers = None if make is None else [make() for _ in range(self.n)]

    def _usages(self, choices: list[dict], num_tokens: list[int]) -> list[dict] | None:
        if self.prompt_tokens is None:
            return None
        return [token_usage(self.prompt_tokens, num_tokens[choice["index"]]) for choice in choices]

    def first_frame(self) -> bytes:
        choices = [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for index in range(self.n)]
        if self.prompt_token_ids is not None:
            return self.encoder.head_frame(choices, prompt_token_ids=self.prompt_token_ids)
        return self.encoder.frame(choices, self._usages(choices, [0] * self.n))

    def step_frame(self, batch: list[tuple[int, RequestOutput]]) -> bytes:
        """One step's delta (the engine's output carries only the new text, token ids and logprobs)."""
        choices = []
        for _, output in batch:
            for completion in output.outputs:
                if not self.cursors[completion.index].advance(completion):
                    continue
                text, finish_reason = completion.text, completion.finish_reason
                logprobs = None
                if self.num_top is not None:
                    logprobs = {"content": self.state.logprobs.chat(completion.token_ids, completion.logprobs,
                                                                    self.num_top, self.as_token_ids)}
                elif not text and finish_reason is None and self.prompt_token_ids is None:
                    continue  # tokens that do not make a whole character yet
                if self.parsers is not None:
                    chunks = _parsed_chunks(self.parsers[completion.index], completion.index, text, logprobs,
                                            finish_reason)
                else:
                    chunks = [{"index": completion.index, "delta": {"content": text} if text else {},
                               "logprobs": logprobs, "finish_reason": finish_reason}]
                if self.prompt_token_ids is not None:
                    if not chunks:  # the parser held the text back: the ids still go out
                        chunks = [{"index": completion.index, "delta": {}, "logprobs": None, "finish_reason": None}]
                    chunks[0]["token_ids"] = list(completion.token_ids)
                choices += chunks
        if not choices:
            return b""
        return self.encoder.frame(choices, self._usages(choices, [cursor.num_tokens for cursor in self.cursors]))

    def usage_frame(self, usage_body: dict) -> bytes:
        return self.encoder.usage_frame(usage_body)

    def completion_tokens(self) -> int:
        return sum(cursor.num_tokens for cursor in self.cursors)


def _parsed_chunks(parser: ChoiceParser, index: int, text: str, logprobs, finish_reason) -> list[dict]:
    """A step's deltas, one chunk each as OpenAI sends them; the finish reason in a last, empty chunk."""
    deltas = parser.feed(text) if text else []
    if finish_reason is not None:
        deltas += parser.finish()
    chunks = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None} for delta in deltas]
    if logprobs is not None:
        if not chunks:
            chunks.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": None})
        chunks[0]["logprobs"] = logprobs
    if finish_reason is not None:
        chunks.append({"index": index, "delta": {}, "logprobs": None,
                       "finish_reason": parser.finish_reason(finish_reason)})
    return chunks


def choice_parsers(state: ServerState, parsed: ChatRequest):
    """Each choice's parser maker (reasoning, tool calls), or None when the text goes out as it is."""
    return parser_factory(parsed.tool_choice, state.tool_call_parser, state.reasoning_parser,
                          parsed.chat_template_kwargs)


def _choices(state: ServerState, parsed: ChatRequest, latest: dict[int, RequestOutput]) -> Iterator[dict]:
    make = choice_parsers(state, parsed)
    for completion in latest[0].outputs:
        logprobs = None
        if parsed.top_logprobs is not None:
            logprobs = {"content": state.logprobs.chat(completion.token_ids, completion.logprobs,
                                                       parsed.top_logprobs, parsed.return_tokens_as_token_ids)}
        finish_reason = completion.finish_reason
        if make is None:
            body = {"role": "assistant", "content": completion.text}
        else:
            parser = make()
            body = message(parser, completion.text)
            finish_reason = parser.finish_reason(finish_reason)
        choice = {"index": completion.index, "message": body, "logprobs": logprobs, "finish_reason": finish_reason,
                  "stop_reason": completion.stop_reason}
        if parsed.return_token_ids:
            choice["token_ids"] = list(completion.token_ids)
        yield choice


def _head(state: ServerState, parsed: ChatRequest, response_id: str, created: int, model: str, generation,
          latest: dict[int, RequestOutput]) -> dict:
    head = {"id": response_id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": None}
    if parsed.return_prompt_logprobs:  # vLLM's place for them: beside the choices
        head["prompt_logprobs"] = state.logprobs.prompt(latest[0].prompt_logprobs or [])
    if parsed.return_token_ids:  # vLLM's place: the prompt's ids beside the choices, each choice's its own
        head["prompt_token_ids"] = list(latest[0].prompt_token_ids)
    return {**head, "usage": usage(generation, latest)}


def _body(state: ServerState, parsed: ChatRequest, response_id: str, created: int, model: str,
          generation: Generation, latest: dict[int, RequestOutput]) -> dict:
    return {**_head(state, parsed, response_id, created, model, generation, latest),
            "choices": list(_choices(state, parsed, latest))}


def _encode_body(state: ServerState, parsed: ChatRequest, response_id: str, created: int, model: str,
                 generation: Generation, latest: dict[int, RequestOutput]) -> bytes:
    return encode_json(_head(state, parsed, response_id, created, model, generation, latest),
                       _choices(state, parsed, latest))


def apply_tool_choice(parsed: ChatRequest, tool_parser: str | None) -> None:
    """tool_choice "required" or a named function: the grammar engine makes the output the call(s);
    "auto" keeps special tokens in the text where the parser's markers may be ones."""
    choice = parsed.tool_choice
    if choice is None or choice.mode == "none":
        return
    if choice.mode == "auto":
        if get_tool_parser(tool_parser).keeps_special_tokens:
            parsed.params.skip_special_tokens = False
        return
    if parsed.params.structured_outputs is not None:
        raise bad_request("tool_choice \"required\" or a named function cannot be combined with structured "
                          "outputs (response_format, structured_outputs, guided_*): both constrain the output.",
                          "tool_choice")
    if parsed.params.allowed_token_ids is not None:
        raise bad_request("tool_choice \"required\" or a named function cannot be combined with "
                          "allowed_token_ids: both decide which tokens may come next.", "allowed_token_ids")
    # Compact JSON: a call has no use for free whitespace, and a weak model could spend max_tokens on it.
    parsed.params.structured_outputs = StructuredOutputsParams(json=choice.schema(), disable_any_whitespace=True)
    parsed.structured_field = "tools"  # a schema the grammar engine cannot compile is the tools' fault


def apply_reasoning_parser(parsed: ChatRequest, reasoning_parser: str | None) -> None:
    """A reasoning format whose markers are special tokens (GPT-OSS's harmony channels) needs them kept
    in the output text, where its parser reads them."""
    if reasoning_parser is not None and get_reasoning_parser(reasoning_parser).keeps_special_tokens:
        parsed.params.skip_special_tokens = False


class _Prepared:
    """A chat request, ready to queue (see server/handler.py)."""

    kind, id_prefix, chunk_object, chat = "chat", "chatcmpl", "chat.completion.chunk", True

    def __init__(self, model: str, parsed: ChatRequest, prompt: Prompt):
        self.model, self.parsed, self.prompts = model, parsed, [prompt]

    def body(self, state, response_id, created, generation, latest) -> dict:
        return _body(state, self.parsed, response_id, created, self.model, generation, latest)

    def encode_body(self, state, response_id, created, generation, latest) -> bytes:
        return _encode_body(state, self.parsed, response_id, created, self.model, generation, latest)

    def stream_writer(self, state, encoder):
        return ChatStreamWriter(state, self.parsed, encoder, self.prompts[0])

    def num_entries(self, latest) -> int:
        params = self.parsed.params
        return response_entries(latest, self.parsed.top_logprobs,
                                prompt_top=params.prompt_logprobs if self.parsed.return_prompt_logprobs else None)


def prepare_chat(state: ServerState, data) -> _Prepared:
    """Everything before queueing: parse, render, tokenize, check (in the worker thread for big bodies)."""
    model = state.resolve_model(Fields(data).string("model"))
    engine = state.engine
    parsed = parse_chat(data, vocab_size=engine.vocab_size, defaults=engine.sampling_defaults,
                        auto_tools=state.enable_auto_tool_choice)
    apply_tool_choice(parsed, state.tool_call_parser)
    apply_reasoning_parser(parsed, state.reasoning_parser)
    prompt = truncate(engine, render(state, parsed), parsed.params)
    if prompt.multimodal is not None and parsed.use_beam_search:
        raise bad_request("Beam search with images is not supported yet.", "use_beam_search")
    check_prompt(engine, prompt, parsed.params, "messages", logprobs_field="top_logprobs")
    return _Prepared(model, parsed, prompt)


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    return await handle_generation(request, prepare_chat, image_urls=True)  # http(s) images downloaded first
