"""The one way in: any prompt (generation or pooling) becomes a validated, tokenized `ProcessedRequest`.

It reads only configuration, the tokenizer and the grammar compiler, and writes only the request's own
copy of its parameters, so it may run on a worker thread; the engine core admits nothing else."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from asyncserve.config.model import ModelConfig
from asyncserve.config.scheduler import SchedulerConfig
from asyncserve.engine.pooling import check_pooling_request, validate_pooling_prompt
from asyncserve.engine.structured import StructuredOutputManager
from asyncserve.errors import InvalidParameterError, PromptTooLongError
from asyncserve.multimodal.inputs import MultiModalInputs
from asyncserve.multimodal.processor import make_image_processor
from asyncserve.pooling_params import PoolingParams
from asyncserve.sample.token_constraints import TokenConstraints, build_token_constraints
from asyncserve.sampling_params import SamplingParams

PromptType = str | list[int] | dict


@dataclass
class ProcessedRequest:
    """A prompt ready for the engine: its text (None when given as ids or truncated), its token ids, its
    private parameters (max_tokens, EOS ids and token constraints resolved), and its compiled grammar."""

    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams | PoolingParams
    grammar: Any = None
    cache_salt: str | None = None  # the prompt dict's "cache_salt" (vLLM's): prefix caching per salt
    multimodal: MultiModalInputs | None = None  # the prompt's images, processed (multimodal/)


class InputProcessor:
    def __init__(self, model_config: ModelConfig, scheduler_config: SchedulerConfig, tokenizer,
                 structured: StructuredOutputManager, eos_token_ids: list[int]):
        self.model_config = model_config
        self.scheduler_config = scheduler_config
        self.tokenizer = tokenizer
        self.structured = structured
        self.eos_token_ids = eos_token_ids
        self.images = make_image_processor(model_config, tokenizer)  # None: the model takes no images

    def process(self, prompt: PromptType,
                params: SamplingParams | PoolingParams | None = None) -> ProcessedRequest:
        """Tokenizes, truncates (truncate_prompt_tokens) and validates; the caller's params are not changed."""
        if isinstance(params, PoolingParams) or self.model_config.is_pooling:
            check_pooling_request(self.model_config, params)  # the wrong kind of request fails first
        params = (params or SamplingParams()).clone()
        text, token_ids = self.tokenize(prompt)
        token_ids, multimodal = self.process_images(prompt, token_ids)
        truncated = params.truncate_prompt(token_ids, self.model_config.max_model_len)
        if len(truncated) < len(token_ids):
            if multimodal is not None:
                raise InvalidParameterError("truncate_prompt_tokens would cut a prompt with images; send it "
                                            "without truncation.", "truncate_prompt_tokens")
            text, token_ids = None, truncated
        self.validate(token_ids, params)
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        if salt is not None and (not isinstance(salt, str) or not salt):
            raise InvalidParameterError("cache_salt must be a non-empty string.", "cache_salt")
        if isinstance(params, PoolingParams):
            if multimodal is not None:
                raise InvalidParameterError("Embedding requests take no images.", "multi_modal_data")
            return ProcessedRequest(text, token_ids, params, cache_salt=salt)
        room = self.model_config.max_model_len - len(token_ids)  # the context ends generation anyway
        params.max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        params.extra_eos_token_ids = [] if params.ignore_eos else list(self.eos_token_ids)
        grammar = None
        if params.structured_outputs is not None:  # compiled here unless a caller did it off the loop
            grammar = self.structured.compile(params.structured_outputs)
        return ProcessedRequest(text, token_ids, params, grammar, salt, multimodal)

    def process_images(self, prompt: PromptType, token_ids: list[int]
                       ) -> tuple[list[int], MultiModalInputs | None]:
        """A prompt dict's images: `multi_modal_inputs` already processed (the server does it in its worker
        thread), or vLLM's `multi_modal_data` {"image": PIL image or list}, processed here."""
        if not isinstance(prompt, dict):
            return token_ids, None
        prepared = prompt.get("multi_modal_inputs")
        if prepared is not None:
            return token_ids, prepared
        data = prompt.get("multi_modal_data")
        if not data:
            return token_ids, None
        if self.images is None:
            raise InvalidParameterError("This model takes no images: send text only, or serve a vision-language "
                                        "model (Qwen2.5-VL).", "multi_modal_data")
        if not isinstance(data, dict) or set(data) - {"image"}:
            raise InvalidParameterError("multi_modal_data must be {'image': a PIL image or a list of them}.",
                                        "multi_modal_data")
        images = data["image"]
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        return self.images.process(token_ids, images)

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidParameterError("This engine runs with skip_tokenizer_init: pass prompts as "
                                        "{'prompt_token_ids': [...]}, not text.", "prompt")
        return self.tokenizer.encode(text)

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(text or None, token ids) for any prompt form the engine takes."""
        if isinstance(prompt, str):
            return prompt, self._encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"], self._encode(prompt["prompt"])
            raise InvalidParameterError("A prompt dict needs 'prompt' or 'prompt_token_ids'.", "prompt")
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise InvalidParameterError(f"Unsupported prompt type {type(prompt).__name__}: pass a string, "
                                    "a list of token ids, or {'prompt_token_ids': [...]}.", "prompt")

    def validate(self, token_ids: list[int], params: SamplingParams | PoolingParams) -> None:
        """Every engine-side rule a request must meet; tokenizes the params' token lists as a side effect
        (see `prepare_token_constraints`)."""
        model_config = self.model_config
        if isinstance(params, PoolingParams) or model_config.is_pooling:
            return validate_pooling_prompt(model_config, token_ids, params)
        max_len = model_config.max_model_len
        if not token_ids:
            raise InvalidParameterError("The prompt is empty: give at least one token.", "prompt")
        if any(not 0 <= t < model_config.vocab_size for t in token_ids):
            raise InvalidParameterError(
                f"Prompt token ids must be in [0, {model_config.vocab_size}).", "prompt")
        if len(token_ids) >= max_len:
            raise PromptTooLongError(
                f"The prompt has {len(token_ids)} tokens; this model's max_model_len is {max_len}, "
                "and at least one token must be generated. Shorten the prompt.", "prompt")
        for name, value in (("logprobs", params.logprobs), ("prompt_logprobs", params.prompt_logprobs)):
            if value is not None and value > model_config.max_logprobs:
                raise InvalidParameterError(
                    f"{name}={value} is more than this server allows (max_logprobs="
                    f"{model_config.max_logprobs}).", name)
        if params.stop and self.tokenizer is None:
            raise InvalidParameterError("Stop strings need a tokenizer; this engine runs with "
                                        "skip_tokenizer_init. Use stop_token_ids.", "stop")
        if params.structured_outputs is not None and self.tokenizer is None:
            raise InvalidParameterError("Structured outputs need a tokenizer; this engine runs with "
                                        "skip_tokenizer_init.", "structured_outputs")
        max_num_seqs = self.scheduler_config.max_num_seqs
        if params.best_of > max_num_seqs:
            raise InvalidParameterError(f"best_of/n={params.best_of} exceeds max_num_seqs="
                                        f"{max_num_seqs}.", "n")
        self.prepare_token_constraints(params)

    def prepare_token_constraints(self, params: SamplingParams) -> TokenConstraints:
        """logit_bias, allowed_token_ids, bad_words and stop ids checked against the model, tokenized and
        made compact, once per params object: `validate` (off the event loop for a big request) does it,
        and `process` finds it done. Changing those fields of params afterwards is not seen."""
        if params.token_constraints is None:
            params.token_constraints = build_token_constraints(params, self.model_config.vocab_size,
                                                               self.tokenizer, self.eos_token_ids)
        return params.token_constraints
