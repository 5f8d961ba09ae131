"""The offline front door: `LLM(model=...).generate(prompts, SamplingParams(...))`, as in vLLM."""
from __future__ import annotations

import itertools
from typing import Sequence as SequenceType

from tqdm.auto import tqdm

from asyncserve.config import EngineConfig
from asyncserve.engine.llm_engine import LLMEngine, PromptType
from asyncserve.errors import InvalidParameterError
from asyncserve.multimodal.chat_parts import has_image_parts, split_image_parts
from asyncserve.outputs import EmbeddingRequestOutput, RequestOutput
from asyncserve.pooling_params import PoolingParams
from asyncserve.engine.beam_search import BeamSearchOutput, beam_search
from asyncserve.sampling_params import BeamSearchParams, SamplingParams


class LLM:
    """Generates for a batch of prompts with continuous batching; `LLM()` serves SmolLM2-135M-Instruct."""

    def __init__(self, model: str | None = None, **kwargs):
        self.llm_engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self.llm_engine.stream_outputs = False  # generate() returns finished outputs only
        self._request_counter = itertools.count()

    def shutdown(self) -> None:
        """Ends the tensor-parallel worker processes now (they also end when this object is collected)."""
        self.llm_engine.shutdown()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation-config defaults (see `generation_config`), as vLLM."""
        return SamplingParams(**self.llm_engine.sampling_defaults)

    def generate(self, prompts: PromptType | SequenceType[PromptType],
                 sampling_params: SamplingParams | SequenceType[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request=None,
                 priority: list[int] | None = None) -> list[RequestOutput]:
        """`lora_request`: one LoRARequest for every prompt, or one per prompt (None: the base model), as
        vLLM's; the engine needs enable_lora=True. `priority`: one per prompt, lower first, with
        scheduling_policy="priority" (vLLM's)."""
        prompts = self._prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        return self._submit(prompts, sampling_params, SamplingParams, use_tqdm, lora_request, priority)

    def embed(self, prompts: PromptType | SequenceType[PromptType],
              pooling_params: PoolingParams | SequenceType[PoolingParams] | None = None, *,
              truncate_prompt_tokens: int | None = None, use_tqdm: bool = True) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt, in order, as vLLM's `LLM.embed` (the model must run as an embedding
        model: runner="pooling", task="embed", or a checkpoint that says so)."""
        prompts = self._prompt_list(prompts)
        if pooling_params is None:
            pooling_params = PoolingParams(truncate_prompt_tokens=truncate_prompt_tokens)
        elif truncate_prompt_tokens is not None:
            raise InvalidParameterError("Pass truncate_prompt_tokens in the PoolingParams or as an argument, "
                                        "not both.", "truncate_prompt_tokens")
        return self._submit(prompts, pooling_params, PoolingParams, use_tqdm)

    @staticmethod
    def _prompt_list(prompts) -> list:
        if isinstance(prompts, (str, dict)) or (
                isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            return [prompts]
        return list(prompts)

    def _submit(self, prompts: list, params, params_type: type, use_tqdm: bool, lora_request=None,
                priority: list[int] | None = None) -> list:
        """Queues one request per prompt (one params for all, or one each) and runs them to the end."""
        if isinstance(params, params_type):
            params_list = [params] * len(prompts)
        else:
            params_list = list(params)
            if len(params_list) != len(prompts):
                raise InvalidParameterError(
                    f"Got {len(params_list)} {params_type.__name__} for {len(prompts)} prompts: pass one, or "
                    "one per prompt.", "sampling_params" if params_type is SamplingParams else "pooling_params")
        if isinstance(lora_request, (list, tuple)):
            if len(lora_request) != len(prompts):
                raise InvalidParameterError(f"Got {len(lora_request)} LoRA requests for {len(prompts)} prompts: "
                                            "pass one, or one per prompt.", "lora_request")
            loras = list(lora_request)
        else:
            loras = [lora_request] * len(prompts)
        if priority is not None and len(priority) != len(prompts):
            raise InvalidParameterError(f"Got {len(priority)} priorities for {len(prompts)} prompts: pass one per "
                                        "prompt.", "priority")
        priorities = list(priority) if priority is not None else [0] * len(prompts)
        request_ids = []
        try:
            for prompt, one, lora, rank in zip(prompts, params_list, loras, priorities):
                request_id = str(next(self._request_counter))
                self.llm_engine.add_request(request_id, self.llm_engine.input_processor.process(prompt, one),
                                            lora_request=lora, priority=rank)
                request_ids.append(request_id)
        except Exception:
            for request_id in request_ids:
                self.llm_engine.abort_request(request_id)
            raise
        return self._run(request_ids, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        progress = tqdm(total=len(request_ids), desc="Generating", unit="req",
                        disable=not use_tqdm or len(request_ids) < 2)
        try:
            while self.llm_engine.has_unfinished_requests():
                for output in self.llm_engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        progress.update(1)
        except BaseException:
            for request_id in request_ids:
                self.llm_engine.abort_request(request_id)
            raise
        finally:
            progress.close()
        return [finished[request_id] for request_id in request_ids]

    def beam_search(self, prompts: PromptType | SequenceType[PromptType],
                    params: BeamSearchParams) -> list[BeamSearchOutput]:
        """Beam search as vLLM's `LLM.beam_search`: outputs in prompt order, beams best first."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        return beam_search(self.llm_engine, list(prompts), params)

    def _fetched(self, conversation: list[dict]) -> list[dict]:
        """The conversation with its http(s) image URLs downloaded here, under the server's bounds."""
        from asyncserve.multimodal.fetch import FetchLimits, fetch_messages_sync  # aiohttp only when needed
        model = self.llm_engine.config.model
        return fetch_messages_sync(conversation, FetchLimits.from_env(model.allowed_media_domains),
                                   model.limit_mm_per_prompt.get("image", 0))

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | None = None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict] | None = None) -> list[RequestOutput]:
        """`continue_final_message` extends the last (assistant) message instead of starting a new one;
        `tools` (OpenAI's function tools) go to the chat template, as in vLLM."""
        if add_generation_prompt and continue_final_message:
            raise InvalidParameterError("continue_final_message and add_generation_prompt cannot both be "
                                        "True: pass add_generation_prompt=False.", "continue_final_message")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.llm_engine.tokenizer
        prompts = []
        for conversation in conversations:
            images = []
            if has_image_parts(conversation):  # image_url (data: / file: / http(s)) and image_pil parts, as vLLM's
                conversation, images = split_image_parts(self._fetched(conversation),
                                                         self.llm_engine.config.model.allowed_local_media_path)
            prompt = {"prompt_token_ids": tokenizer.apply_chat_template(
                conversation, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                tools=tools, continue_final_message=continue_final_message, tokenize=True, return_dict=False)}
            if images:
                prompt["multi_modal_data"] = {"image": images}
            prompts.append(prompt)
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
