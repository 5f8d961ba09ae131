"""The synchronous engine core: add requests, step (schedule -> run -> process), abort."""
from __future__ import annotations

import itertools
import logging
import time


from asyncserve.config import Config, EngineConfig
from asyncserve.engine.block_pool import BlockPool
from asyncserve.engine.bucket_counts import ITERATION_TOKEN_BUCKETS, BucketCounts
from asyncserve.engine.generation_defaults import log_sampling_defaults, sampling_defaults
from asyncserve.engine.kv_cache_manager import KVCacheManager
from asyncserve.engine.lora_manager import LoRAManager
from asyncserve.engine.output_processor import OutputProcessor
from asyncserve.engine.input_processor import InputProcessor, ProcessedRequest, PromptType
from asyncserve.engine.pooling import embedding_output
from asyncserve.engine.resolve_config import resolve_config
from asyncserve.engine.detokenizer import decode_step
from asyncserve.engine.scheduler import Scheduler
from asyncserve.engine.spec_decode import Speculator
from asyncserve.engine.state_slots import StateSlotPool
from asyncserve.engine.sequence import FinishReason, Request, Sequence
from asyncserve.engine.structured import StructuredOutputManager
from asyncserve.engine.warm_up import warm_up
from asyncserve.errors import ConfigError, InvalidParameterError
from asyncserve.config.model import ModelConfig
from asyncserve.checkpoints.tokenizer import load_tokenizer
from asyncserve.models.registry import model_class
from asyncserve.outputs import EmbeddingRequestOutput, RequestOutput
from asyncserve.pooling_params import PoolingParams
from asyncserve.executor import Executor, make_executor
from asyncserve.runner.step import PROPOSED_BY_RUNNER, SequenceResult, StepMessage, StepOutput

logger = logging.getLogger("asyncserve")

__all__ = ["LLMEngine", "PromptType"]


class LLMEngine:
    def __init__(self, args: EngineConfig):
        started = time.perf_counter()
        self.config: Config = resolve_config(args)
        config, mc = self.config, self.config.model
        model_class(mc.hf_config)  # an unsupported architecture fails before anything is loaded
        self.sampling_defaults = sampling_defaults(mc.generation_config, mc.path)
        self.tokenizer = None if mc.skip_tokenizer_init else load_tokenizer(mc)
        self.executor: Executor = make_executor(config)
        num_blocks = self.executor.determine_num_blocks()
        block_size = config.cache.block_size
        if num_blocks * block_size < mc.max_model_len:
            raise ConfigError(
                f"The KV pool holds {num_blocks * block_size} tokens, fewer than max_model_len="
                f"{mc.max_model_len}: lower max_model_len, or raise gpu_memory_utilization / "
                "num_gpu_blocks_override / cpu_kv_cache_space.")
        state_bytes = self.executor.state_slot_bytes()
        num_host_blocks, num_host_state_slots = self._swap_space(state_bytes)
        self.executor.initialize_cache(num_blocks, num_host_blocks, num_host_state_slots)
        self.block_pool = BlockPool(num_blocks, config.cache.enable_prefix_caching)
        num_state_slots = config.cache.num_state_slots
        states = StateSlotPool(num_state_slots, num_host_state_slots) if num_state_slots else None
        self.kv_manager = KVCacheManager(self.block_pool, block_size, num_host_blocks, states)
        self.lora = (LoRAManager(config.lora, model_class(mc.hf_config).packed_modules_mapping,
                                 self.executor.lora_shapes())
                     if config.lora is not None else None)
        self.scheduler = Scheduler(config.scheduler, self.kv_manager, self.lora)
        self.output_processor = OutputProcessor(self.tokenizer, mc.max_model_len)
        self._eos_token_ids = self._find_eos_token_ids()
        self.structured = StructuredOutputManager(self.tokenizer, mc.vocab_size, self._eos_token_ids,
                                                  config.structured_outputs_backend,
                                                  pin_memory=mc.device.type == "cuda",
                                                  cache_mb=config.structured_outputs_cache_mb,
                                                  max_bytes=config.structured_outputs_max_bytes,
                                                  compile_timeout=config.structured_outputs_compile_timeout)
        # Speculative decoding (--speculative-config): drafts proposed before each schedule.
        self.speculator = (Speculator(config.speculative, mc.max_model_len, self.structured)
                           if config.speculative else None)
        self.input_processor = InputProcessor(mc, config.scheduler, self.tokenizer, self.structured,
                                              self._eos_token_ids)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._in_flight: tuple[list, object] | None = None  # (scheduled, PendingStep) of step()
        self._to_release: list[Request] = []  # finished or aborted, released at the next schedule()
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0}
        self.finished_timings: dict[str, dict] = {}
        self.iteration_tokens = BucketCounts(ITERATION_TOKEN_BUCKETS)  # tokens per step (vLLM's metric)
        # Streaming callers get every request's output each step; offline ones only finished outputs.
        self.stream_outputs = True
        warm_up(self)  # GPU engines: the first real request no longer pays for compiles
        self.startup_seconds = time.perf_counter() - started
        kv_tokens = num_blocks * block_size
        concurrency = kv_tokens / mc.max_model_len
        state_pool = ""
        if num_state_slots:  # each running sequence holds one slot too
            concurrency = min(concurrency, num_state_slots)
            state_pool = (f" | state pool (linear attention): {num_state_slots} slots of "
                          f"{state_bytes / (1 << 20):.2f} MiB")
        logger.info(
            "asyncserve engine ready in %.1f s: model=%s (%s) dtype=%s device=%s | KV pool: %d blocks "
            "of %d tokens = %d tokens of %s%s | max concurrency at max_model_len=%d: %.2fx",
            self.startup_seconds, mc.model or f"the default model at {mc.path}",
            mc.hf_config.architectures[0] if getattr(mc.hf_config, "architectures", None) else "?",
            str(mc.dtype).removeprefix("torch."), mc.device, num_blocks, block_size, kv_tokens,
            str(config.kv_cache_torch_dtype).removeprefix("torch."), state_pool, mc.max_model_len, concurrency)
        if mc.is_pooling:
            logger.info("serving as an embedding model: %s pooling%s, %d dimensions", mc.pooler.pooling_type,
                        ", normalized" if mc.pooler.normalize else "", mc.hidden_size)
        else:
            log_sampling_defaults(self.sampling_defaults, mc.generation_config)

    @property
    def model_config(self) -> ModelConfig:
        return self.config.model

    def shutdown(self) -> None:
        """Ends the executor's worker processes (tensor parallelism); nothing to do in one process."""
        self.executor.shutdown()

    def _swap_space(self, state_bytes: int) -> tuple[int, int]:
        """(host KV blocks, host state slots) for swapped-out sequences: `swap_space` GiB, used only in swap
        mode; a hybrid model gives half of it to state slots (at most one per max_num_seqs)."""
        if self.config.scheduler.preemption_mode != "swap":
            return 0, 0
        swap_bytes = int(self.config.cache.swap_space * (1 << 30))
        num_state_slots = 0
        if state_bytes:
            num_state_slots = min(self.config.cache.num_state_slots, swap_bytes // 2 // state_bytes)
            swap_bytes -= num_state_slots * state_bytes
        return max(1, swap_bytes // self.executor.bytes_per_block()), num_state_slots

    # ---- requests -------------------------------------------------------------------------------

    def add_request(self, request_id: str, processed: ProcessedRequest, delta: bool = False,
                    lora_request=None, priority: int = 0) -> Request:
        """Admits a request that the input processor made (`input_processor.process(prompt, params)`).
        `delta`: each output carries only what is new since the one before (OutputProcessor.delta_output),
        as a streaming client takes it; otherwise outputs are cumulative."""
        if request_id in self.requests:
            raise InvalidParameterError(f"Request id {request_id!r} is already in use.", "request_id")
        params, token_ids = processed.params, processed.prompt_token_ids
        adapter = None
        if lora_request is not None:  # read (once) and checked before anything is queued
            if self.lora is None:
                raise InvalidParameterError("This engine serves no LoRA adapters: start it with enable_lora=True "
                                            "(--enable-lora) to use a lora_request.", "lora_request")
            if isinstance(params, PoolingParams):
                raise InvalidParameterError("LoRA adapters serve generation requests only.", "lora_request")
            adapter = self.lora.register(lora_request)
        if priority != 0 and self.config.scheduler.scheduling_policy != "priority":
            raise InvalidParameterError(f"priority={priority} needs the priority scheduling policy: start the "
                                        "engine with scheduling_policy='priority' (--scheduling-policy priority).",
                                        "priority")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidParameterError(f"priority must be an integer, got {priority!r}.", "priority")
        request = Request(request_id, processed.prompt, token_ids, params)
        request.priority = priority
        request.lora_request = lora_request
        request.lora_adapter = adapter  # its weights, held until it finishes
        request.cache_salt = processed.cache_salt
        request.multimodal = processed.multimodal
        request.delta = delta and not isinstance(params, PoolingParams) and params.best_of == params.n
        if isinstance(params, PoolingParams):
            seq = Sequence(next(self._seq_ids), request, list(token_ids), 0)
            request.seqs.append(seq)
        else:
            request.grammar = processed.grammar
            request.num_forks_pending = params.best_of - 1
            seq = self._new_sequence(request, list(token_ids), 0)
        self.requests[request_id] = request
        self.scheduler.add(seq)
        self.stats["prompt_tokens"] += len(token_ids)
        return request

    def eos_token_ids(self) -> list[int]:
        return list(self._eos_token_ids)

    def _find_eos_token_ids(self) -> list[int]:
        ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    def _new_sequence(self, request: Request, token_ids: list[int], index: int) -> Sequence:
        # Forks happen at the prompt's end: each starts the grammar afresh.
        matcher = self.structured.new_matcher(request.grammar) if request.grammar is not None else None
        seq = Sequence(next(self._seq_ids), request, token_ids, index,
                       self.output_processor.make_detokenizer(request), matcher)
        request.seqs.append(seq)
        return seq

    def abort_request(self, request_id: str) -> RequestOutput | EmbeddingRequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        request.num_forks_pending = 0
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = FinishReason.ABORT
        self._to_release.append(request)
        if isinstance(request.params, PoolingParams):
            return embedding_output(request)
        return self._output(request)

    def _output(self, request: Request) -> RequestOutput:
        if request.delta:
            return self.output_processor.delta_output(request)
        return self.output_processor.request_output(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or self._in_flight is not None

    # ---- the step ---------------------------------------------------------------------------------

    def schedule(self) -> tuple[StepMessage, list]:
        speculating = self.speculator is not None and self.speculator.propose(self.scheduler.running)
        step = self.scheduler.schedule()
        if step[1]:
            self.iteration_tokens.observe(self.scheduler.num_scheduled_tokens)
            if self.speculator is not None:
                self.speculator.step_launched(speculating)
        if self._to_release:
            # Only now: the step message just announced their last forks, reading `seq.request`.
            for request in self._to_release:
                request.release()
            self._to_release.clear()
        return step

    def step(self) -> list[RequestOutput]:
        """Launches the next step, then applies the one launched before it (the GPU runs one while the
        host processes the other); returns the outputs of the requests that changed. A step that may
        speculate is scheduled only after the one before it was applied: its drafts follow the last tokens."""
        outputs = self.drain() if self._in_flight and self.must_apply_before_scheduling(self._in_flight[1]) \
            else []
        message, scheduled = self.schedule()
        launched = (scheduled, self.executor.launch(message)) if scheduled else None
        previous, self._in_flight = self._in_flight, launched
        if previous is not None:
            outputs += self.process(previous[0], previous[1].result())
        if launched is not None and launched[1].needs_grammar_masks:
            self.sample_under_grammars(*launched)
        return outputs

    def must_apply_before_scheduling(self, pending) -> bool:
        """Whether the launched step `pending` must be processed before the next is scheduled: the next
        may speculate (n-gram drafts need every sequence's last token on the host), or `pending` verified
        drafts (its sequences' lengths are known only then). Never without speculative decoding."""
        if self.speculator is None:
            return False
        if pending.is_verify:
            return True
        if self.speculator.is_active(self.scheduler.num_running):
            self.speculator.cut_short()  # a pipelined step applied as soon as it is launched
            return True
        return False

    def sample_under_grammars(self, scheduled: list[tuple[Sequence, int]], pending) -> None:
        """Has a launched step sampled once the grammar masks of its constrained rows are known: the
        sequences' matchers have accepted every earlier token (`process` of the step before ran), while
        the device computed this step's forward pass. Unconstrained rows get no mask. A sequence that
        verifies d drafts has d + 1 rows, row j masked by its grammar after drafts [0, j)
        (`bitmask_through_drafts`); a draft model's proposals are read back from the device for that."""
        matchers, drafts, rows, expand = [], [], [], []  # expand: each masked sample row's row of the bitmask
        row = offset = mask_rows = 0
        proposals = None
        for (seq, _), num_samples, num_drafts in zip(scheduled, pending.num_samples, pending.num_drafts):
            num_rows = num_drafts + 1 if num_drafts else num_samples
            if num_samples and seq.matcher is not None and not seq.is_finished:
                tokens = seq.draft_token_ids
                if num_drafts and tokens[0] == PROPOSED_BY_RUNNER:
                    if proposals is None:  # waits for the drafter's forwards only, not the target's
                        proposals = pending.proposals()
                    tokens = proposals[offset:offset + num_drafts]
                # A verifying sequence's rows each have their own mask; n > 1 samples share one.
                expand.extend(range(mask_rows, mask_rows + num_rows) if num_drafts else [mask_rows] * num_rows)
                rows.extend(range(row, row + num_rows))
                matchers.append(seq.matcher)
                drafts.append(list(tokens))
                mask_rows += num_drafts + 1
            row += num_rows
            offset += num_drafts
        bitmask = None
        if matchers:
            if mask_rows > len(matchers):
                bitmask = self.structured.bitmask_through_drafts(matchers, drafts)
            else:
                bitmask = self.structured.bitmask(matchers)
            if len(expand) > bitmask.shape[0]:
                bitmask = bitmask[expand]
        self.executor.sample(pending, bitmask, rows)

    def drain(self) -> list[RequestOutput]:
        """Applies the step that `step()` launched last, if any; then schedule/execute/process may be
        driven by hand."""
        previous, self._in_flight = self._in_flight, None
        return [] if previous is None else self.process(previous[0], previous[1].result())

    def process(self, scheduled: list[tuple[Sequence, int]], output: StepOutput) -> list[RequestOutput]:
        """Applies a step's results; returns the outputs of the requests it changed."""
        if self.model_config.is_pooling:
            return self._process_pooled(scheduled, output)
        processor = self.output_processor
        touched: dict[str, Request] = {}
        now = time.monotonic()
        appended: list[tuple[Sequence, int, bool]] = []  # this step's tokens, in order: whether decoded
        to_decode = []  # the detokenizers of those whose text is decoded, in the same order
        continuations: list[tuple[Sequence, list[int], list | None]] = []  # verified runs past their first token
        verified = False
        decode_only = True  # no prompt chunk in the step (the speculation governor times only those)
        tokens_before = self.stats["generation_tokens"]
        for (seq, num_new), result in zip(scheduled, output.results):
            request = seq.request
            if num_new != 1 + result.num_draft_tokens:
                decode_only = False
            if result.token_ids:
                seq.num_in_flight -= 1
            if seq.is_finished:  # aborted (or finished by the step before) while the step ran
                continue
            if result.num_draft_tokens:
                verified = True
                self._roll_back_rejected(seq, result)
                if len(result.token_ids) > 1:
                    continuations.append((seq, result.token_ids, result.logprobs))
                    result = SequenceResult(result.token_ids[:1], result.logprobs[:1] if result.logprobs else None,
                                            result.prompt_logprobs)
            self.kv_manager.cache_computed_blocks(seq)
            if result.prompt_logprobs:
                processor.add_prompt_logprobs(request, result.prompt_logprobs)
            if result.token_ids:
                touched[request.request_id] = request
                if request.first_token_time is None:
                    request.first_token_time = now
                targets = [seq]
                if len(result.token_ids) > 1:
                    targets += self._fork(seq, len(result.token_ids) - 1)
                for i, (target, token_id) in enumerate(zip(targets, result.token_ids)):
                    entry = result.logprobs[i] if result.logprobs else None
                    decode = processor.append_ids(target, token_id, entry)
                    if decode:
                        to_decode.append(target.detokenizer)
                    appended.append((target, token_id, decode))
        self.stats["generation_tokens"] += len(appended)
        # All the step's new text at once (one decode_batch call), then each token's stop conditions.
        deltas = iter(decode_step(to_decode) if to_decode else ())
        for target, token_id, decode in appended:
            finished = processor.check_stop(target, token_id, next(deltas) if decode else "")
            if target.matcher is not None and not finished:
                finished = processor.advance_grammar(target, token_id)
            if finished:
                self.scheduler.finish(target)
        if continuations:
            self._append_runs(continuations)
        if verified:
            self.speculator.stats.observe_step()
        if self.speculator is not None:
            self.speculator.step_applied(len(scheduled), self.stats["generation_tokens"] - tokens_before, decode_only)
        outputs = []
        for request in touched.values():
            if self.stream_outputs or request.is_finished:
                outputs.append(self._output(request))
            if request.is_finished:
                del self.requests[request.request_id]
                self._record_timings(request)
                self._to_release.append(request)
        return outputs

    def _roll_back_rejected(self, seq: Sequence, result: SequenceResult) -> None:
        """A verified run: the KV of the rejected drafts is forgotten and their blocks go back to the pool
        (before any block of the sequence is offered to the prefix cache)."""
        num_accepted = len(result.token_ids) - 1
        self.speculator.observe(result.num_draft_tokens, num_accepted)
        counts = seq.request.spec_decode_counts
        if counts is None:
            counts = seq.request.spec_decode_counts = [0, 0, 0]
        counts[0] += 1
        counts[1] += result.num_draft_tokens
        counts[2] += num_accepted
        self.scheduler.reject_drafts(seq, result.num_draft_tokens - num_accepted)

    def _append_runs(self, runs: list[tuple[Sequence, list[int], list | None]]) -> None:
        """The tokens after the first of each verified run, one position at a time across the runs (one
        batched decode per position), so a stop token, stop string, length limit or the grammar's end ends
        a run exactly where plain decoding would have stopped; what follows it is dropped. Grammars
        advance as in `process`."""
        processor = self.output_processor
        for position in range(1, max(len(tokens) for _, tokens, _ in runs)):
            runs = [run for run in runs if position < len(run[1]) and not run[0].is_finished]
            if not runs:
                return
            decoded = []
            for seq, tokens, entries in runs:
                entry = entries[position] if entries else None
                decoded.append(processor.append_ids(seq, tokens[position], entry))
            self.stats["generation_tokens"] += len(runs)
            to_decode = [seq.detokenizer for (seq, _, _), decode in zip(runs, decoded) if decode]
            deltas = iter(decode_step(to_decode) if to_decode else ())
            for (seq, tokens, _), decode in zip(runs, decoded):
                finished = processor.check_stop(seq, tokens[position], next(deltas) if decode else "")
                if seq.matcher is not None and not finished:
                    finished = processor.advance_grammar(seq, tokens[position])
                if finished:
                    self.scheduler.finish(seq)

    def _process_pooled(self, scheduled: list[tuple[Sequence, int]],
                        output: StepOutput) -> list[EmbeddingRequestOutput]:
        """Applies a pooling step: a sequence whose prompt ended takes its embedding and finishes, which
        frees its blocks; returns the finished requests' outputs."""
        outputs = []
        for (seq, _), result in zip(scheduled, output.results):
            if result.embedding is not None:
                seq.num_in_flight -= 1
            if seq.is_finished:  # aborted while the step ran
                continue
            self.kv_manager.cache_computed_blocks(seq)
            if result.embedding is None:
                continue
            request = seq.request
            request.embedding = result.embedding
            seq.finish_reason = FinishReason.STOP
            self.scheduler.finish(seq)
            del self.requests[request.request_id]
            self._to_release.append(request)
            outputs.append(embedding_output(request))
        return outputs

    def _record_timings(self, request: Request) -> None:
        seq_generation_tokens = [seq.num_output_tokens for seq in request.seqs]
        self.finished_timings[request.request_id] = {
            "arrival_time": request.arrival_time,
            "first_token_time": request.first_token_time,
            "scheduled_time": request.scheduled_time,
            "finished_time": time.monotonic(),
            "num_generation_tokens": sum(seq_generation_tokens),
            "seq_generation_tokens": seq_generation_tokens,  # per sequence, for vLLM's per-request histograms
            "num_prompt_tokens": len(request.prompt_token_ids),
        }
        if len(self.finished_timings) > 10000:  # nobody is collecting them (offline use)
            self.finished_timings.clear()

    def _fork(self, parent: Sequence, count: int) -> list[Sequence]:
        request = parent.request
        children = []
        for index in range(1, count + 1):
            child = self._new_sequence(request, list(parent.token_ids), index)
            # The prompt is the fork point; a parent preempted meanwhile shares nothing.
            self.kv_manager.fork(parent, child, parent.num_tokens if parent.blocks else 0)
            children.append(child)
        self.scheduler.admit_forks(children)
        return children

    def live_block_tables(self) -> list[list[int]]:
        return [seq.block_table for request in self.requests.values() for seq in request.seqs
                if not seq.is_finished]
