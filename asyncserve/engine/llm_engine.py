"""The synchronous engine core: add requests, step (schedule -> run -> process), abort."""
from __future__ import annotations

import itertools
import logging
import time

import torch

from asyncserve.config import EngineConfig
from asyncserve.engine.block_pool import BlockPool
from asyncserve.engine.kv_cache_manager import KVCacheManager
from asyncserve.engine.model_config import ModelConfig, load_model_config, load_tokenizer
from asyncserve.engine.output_processor import OutputProcessor
from asyncserve.engine.scheduler import Scheduler, SchedulerConfig
from asyncserve.engine.sequence import FinishReason, Request, Sequence
from asyncserve.errors import ConfigError, InvalidParameterError, PromptTooLongError
from asyncserve.models.loader import load_model
from asyncserve.models.registry import model_class
from asyncserve.outputs import RequestOutput
from asyncserve.runner.memory import num_kv_blocks
from asyncserve.runner.model_runner import ModelRunner
from asyncserve.runner.step import StepInput, StepOutput
from asyncserve.sampling_params import SamplingParams

logger = logging.getLogger("asyncserve")

PromptType = str | list[int] | dict


class LLMEngine:
    def __init__(self, config: EngineConfig):
        started = time.perf_counter()
        self.config = config
        path = config.model_path
        self.model_config: ModelConfig = load_model_config(config, path)
        mc = self.model_config
        model_class(mc.hf_config)  # an unsupported architecture fails before anything is loaded
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config, path)
        torch.manual_seed(config.seed)
        model = load_model(mc.hf_config, path, mc.dtype, mc.device, config.load_format, config.seed)
        self.runner = self._make_runner(model)
        self.max_num_batched_tokens = self._token_budget()
        num_blocks = num_kv_blocks(self.runner, config, mc, self.max_num_batched_tokens)
        if num_blocks * config.block_size < mc.max_model_len:
            raise ConfigError(
                f"The KV pool holds {num_blocks * config.block_size} tokens, fewer than max_model_len="
                f"{mc.max_model_len}: lower max_model_len, or raise gpu_memory_utilization / "
                "num_gpu_blocks_override / cpu_kv_cache_space.")
        self.runner.allocate_kv_pool(num_blocks)
        self.runner.prepare()
        self.block_pool = BlockPool(num_blocks, config.enable_prefix_caching)
        self.kv_manager = KVCacheManager(self.block_pool, config.block_size,
                                         self._num_host_blocks())
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            enable_chunked_prefill=config.enable_chunked_prefill, block_size=config.block_size,
            preemption_mode=config.preemption_mode),
            self.kv_manager)
        self.output_processor = OutputProcessor(self.tokenizer, mc.max_model_len)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self.startup_seconds = time.perf_counter() - started
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0}
        self.finished_timings: dict[str, dict] = {}
        # Streaming callers get every request's output each step; offline ones only finished outputs.
        self.stream_outputs = True
        kv_tokens = num_blocks * config.block_size
        logger.info(
            "asyncserve engine ready in %.1f s: model=%s (%s) dtype=%s device=%s | KV pool: %d blocks "
            "of %d tokens = %d tokens | max concurrency at max_model_len=%d: %.2fx",
            self.startup_seconds, config.model or f"the default model at {path}",
            type(model).__name__, str(mc.dtype).removeprefix("torch."),
            mc.device, num_blocks, config.block_size, kv_tokens, mc.max_model_len,
            kv_tokens / mc.max_model_len)

    def _num_host_blocks(self) -> int:
        """Host blocks for swapped-out sequences: `swap_space` GiB, allocated only in swap mode."""
        if self.config.preemption_mode != "swap":
            return 0
        pool = self.runner.kv_pool
        block_bytes = pool.storage[:, :, 0].numel() * pool.storage.element_size()
        num_host = max(1, int(self.config.swap_space * (1 << 30)) // block_bytes)
        pool.allocate_swap_space(num_host)
        return num_host

    def _make_runner(self, model) -> ModelRunner:
        mc = self.model_config
        if mc.device.type == "cuda":
            from asyncserve.runner.cuda_runner import CudaModelRunner
            return CudaModelRunner(model, mc.vocab_size, self.config.block_size, mc.device, mc.dtype,
                                   max_num_seqs=self.config.max_num_seqs,
                                   max_model_len=mc.max_model_len,
                                   enforce_eager=self.config.enforce_eager)
        return ModelRunner(model, mc.vocab_size, self.config.block_size, mc.device, mc.dtype)

    def _token_budget(self) -> int:
        config, max_len = self.config, self.model_config.max_model_len
        if config.max_num_batched_tokens is not None:
            budget = config.max_num_batched_tokens
            if not config.enable_chunked_prefill and budget < max_len:
                raise ConfigError(f"max_num_batched_tokens={budget} is smaller than max_model_len={max_len} "
                                  "with chunked prefill off: long prompts could never run. Raise it, or "
                                  "enable chunked prefill.")
            return budget
        default = 8192 if self.model_config.device.type == "cuda" else 2048
        return default if config.enable_chunked_prefill else max(default, max_len)

    # ---- requests -------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidParameterError("This engine runs with skip_tokenizer_init: pass prompts as "
                                        "{'prompt_token_ids': [...]}, not text.", "prompt")
        return self.tokenizer.encode(text)

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
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

    def validate_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        max_len = self.model_config.max_model_len
        if not token_ids:
            raise InvalidParameterError("The prompt is empty: give at least one token.", "prompt")
        if any(not 0 <= t < self.model_config.vocab_size for t in token_ids):
            raise InvalidParameterError(
                f"Prompt token ids must be in [0, {self.model_config.vocab_size}).", "prompt")
        if len(token_ids) >= max_len:
            raise PromptTooLongError(
                f"The prompt has {len(token_ids)} tokens; this model's max_model_len is {max_len}, "
                "and at least one token must be generated. Shorten the prompt.", "prompt")
        for name, value in (("logprobs", params.logprobs), ("prompt_logprobs", params.prompt_logprobs)):
            if value is not None and value > self.config.max_logprobs:
                raise InvalidParameterError(
                    f"{name}={value} is more than this server allows (max_logprobs="
                    f"{self.config.max_logprobs}).", name)
        if params.stop and self.tokenizer is None:
            raise InvalidParameterError("Stop strings need a tokenizer; this engine runs with "
                                        "skip_tokenizer_init. Use stop_token_ids.", "stop")
        if params.best_of > self.config.max_num_seqs:
            raise InvalidParameterError(f"best_of/n={params.best_of} exceeds max_num_seqs="
                                        f"{self.config.max_num_seqs}.", "n")

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None) -> Request:
        if request_id in self.requests:
            raise InvalidParameterError(f"Request id {request_id!r} is already in use.", "request_id")
        params = (params or SamplingParams()).clone()
        text, token_ids = self.tokenize_prompt(prompt)
        self.validate_prompt(token_ids, params)
        if params.max_tokens is None:
            params.max_tokens = self.model_config.max_model_len - len(token_ids)
        params.extra_eos_token_ids = [] if params.ignore_eos else list(self.eos_token_ids())
        request = Request(request_id, text, token_ids, params)
        request.num_forks_pending = params.best_of - 1
        request.fork_generators = self._generators(params)
        seq = self._new_sequence(request, list(token_ids), 0)
        self.requests[request_id] = request
        self.scheduler.add(seq)
        self.stats["prompt_tokens"] += len(token_ids)
        return request

    def eos_token_ids(self) -> list[int]:
        ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    def _generators(self, params: SamplingParams) -> list:
        if params.seed is None:
            return [None] * params.best_of
        device = self.model_config.device
        return [torch.Generator(device=device).manual_seed(params.seed + i) for i in range(params.best_of)]

    def _new_sequence(self, request: Request, token_ids: list[int], index: int) -> Sequence:
        seq = Sequence(next(self._seq_ids), request, token_ids, index)
        seq.generator = request.fork_generators[index]
        seq.detokenizer = self.output_processor.make_detokenizer(request)
        request.seqs.append(seq)
        return seq

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        request.num_forks_pending = 0
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = FinishReason.ABORT
        return self.output_processor.request_output(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step ---------------------------------------------------------------------------------

    def schedule(self) -> tuple[StepInput, list]:
        return self.scheduler.schedule()

    def step(self) -> list[RequestOutput]:
        step, scheduled = self.schedule()
        if not scheduled:
            return []
        return self.process(scheduled, self.runner.execute(step))

    def process(self, scheduled: list[tuple[Sequence, int]], output: StepOutput) -> list[RequestOutput]:
        """Applies a step's results; returns the outputs of the requests it changed."""
        processor = self.output_processor
        touched: dict[str, Request] = {}
        now = time.monotonic()
        for (seq, num_new), result in zip(scheduled, output.results):
            request = seq.request
            if seq.is_finished:  # aborted while the step ran
                continue
            seq.num_computed_tokens += num_new
            self.kv_manager.cache_computed_blocks(seq)
            if result.prompt_logprobs:
                processor.add_prompt_logprobs(request, result.prompt_logprobs)
            if not result.token_ids:
                continue
            touched[request.request_id] = request
            if request.first_token_time is None:
                request.first_token_time = now
            targets = [seq]
            if len(result.token_ids) > 1:
                targets += self._fork(seq, len(result.token_ids) - 1)
            for i, (target, token_id) in enumerate(zip(targets, result.token_ids)):
                entry = result.logprobs[i] if result.logprobs else None
                self.stats["generation_tokens"] += 1
                if processor.append_token(target, token_id, entry):
                    self.scheduler.finish(target)
        outputs = []
        for request in touched.values():
            if self.stream_outputs or request.is_finished:
                outputs.append(processor.request_output(request))
            if request.is_finished:
                del self.requests[request.request_id]
                self._record_timings(request)
        return outputs

    def _record_timings(self, request: Request) -> None:
        num_generated = sum(seq.num_output_tokens for seq in request.seqs)
        self.finished_timings[request.request_id] = {
            "arrival_time": request.arrival_time,
            "first_token_time": request.first_token_time,
            "finished_time": time.monotonic(),
            "num_generation_tokens": num_generated,
        }
        if len(self.finished_timings) > 10000:  # nobody is collecting them (offline use)
            self.finished_timings.clear()

    def _fork(self, parent: Sequence, count: int) -> list[Sequence]:
        request = parent.request
        children = []
        for index in range(1, count + 1):
            child = self._new_sequence(request, list(parent.token_ids), index)
            self.kv_manager.fork(parent, child)
            children.append(child)
        request.num_forks_pending = 0
        self.scheduler.admit_forks(children)
        return children

    def live_block_tables(self) -> list[list[int]]:
        return [seq.block_table for request in self.requests.values() for seq in request.seqs
                if not seq.is_finished]
