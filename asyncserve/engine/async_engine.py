"""The engine as a coroutine on the caller's event loop: `generate()` streams, the loop never blocks.

The model step runs in one worker thread (torch releases the GIL inside its kernels), so the loop keeps
serving HTTP while the CPU or GPU computes. Everything else — scheduling, block accounting, detokenizing,
streams — happens on the loop thread, so engine state needs no locks.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Protocol

from asyncserve.config import EngineConfig
from asyncserve.engine.beam_search import BeamSearchOutput, beam_search_async
from asyncserve.engine.llm_engine import LLMEngine, PromptType
from asyncserve.engine.step_profile import StepProfile
from asyncserve.errors import EngineDeadError, QueueFullError, RequestAbortedError
from asyncserve.outputs import EmbeddingRequestOutput, RequestOutput
from asyncserve.pooling_params import PoolingParams
from asyncserve.sampling_params import BeamSearchParams, SamplingParams
from asyncserve.utils.tasks import cancel_and_wait

logger = logging.getLogger("asyncserve")

# Sinks told of a step's end between two visits of the loop to its other work (about 1-2 ms of framing
# and socket writes on a CPU core).
_SINKS_PER_SLICE = 64


class OutputSink(Protocol):
    """Where the engine hands one request's outputs, on the loop: `put` for each output or the error that
    ends it, then `end_step` once the step has delivered all its outputs (a sink fed by several requests
    builds one write per step from them). A sink whose `delta` is true gets each step's new text, token ids
    and logprobs only (OutputProcessor.delta_output); otherwise cumulative outputs."""

    delta: bool

    def put(self, item: RequestOutput | BaseException) -> None: ...

    def end_step(self) -> None: ...


class RequestStream:
    """Latest output of one request: outputs are cumulative, so a slow reader just skips to the newest."""

    delta = False

    def __init__(self) -> None:
        self._latest: RequestOutput | BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> None:
        self._latest = item
        self._ready.set()

    def end_step(self) -> None:
        pass

    async def get(self) -> RequestOutput:
        await self._ready.wait()
        self._ready.clear()
        item, self._latest = self._latest, None
        if isinstance(item, BaseException):
            raise item
        return item


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, **kwargs):
        self.llm_engine = LLMEngine(config or EngineConfig(**kwargs))
        self.config = self.llm_engine.config  # the resolved tree
        self.tokenizer = self.llm_engine.tokenizer
        self._streams: dict[str, OutputSink] = {}
        self._touched: list[OutputSink] = []  # sinks given outputs during the current step
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncserve-step")
        self._waiter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncserve-wait")
        self._last_progress = time.monotonic()  # when the loop last finished a step (or found work)
        self._preparer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncserve-token-lists")
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._dead: BaseException | None = None
        self._ids = itertools.count()
        self._last_log = (time.monotonic(), 0, 0)  # time, prompt tokens, generated tokens
        self._last_spec_stats: dict = {}  # speculative decoding's counters at the last log line
        self.step_profile = StepProfile()
        self._last_profile: dict | None = None

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="asyncserve-engine")

    async def stop(self) -> None:
        """Aborts what is in flight and stops the engine coroutine."""
        for request_id in list(self._streams):
            self.abort(request_id)
        await cancel_and_wait(self._task)
        self.step_profile.close()
        self._task = None

    def shutdown(self) -> None:
        """Ends the tensor-parallel worker processes (after `stop`); the engine cannot start again."""
        self.llm_engine.shutdown()

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done() and self._dead is None

    def seconds_without_progress(self) -> float:
        """How long the engine has had work without finishing a step (0 while idle or moving): a device
        hang or a step stuck in a kernel shows here while the loop itself still answers."""
        if not self.llm_engine.has_unfinished_requests():
            return 0.0
        return time.monotonic() - self._last_progress

    def check_health(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"The engine stopped after an internal error: {self._dead!r}")

    # ---- the face the server and other callers use ---------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.config.model.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.config.model.max_model_len

    @property
    def model_path(self) -> str:
        """Where the weights came from: the hub id or directory given, else the default model's path."""
        return self.config.model.model or self.config.model.path

    @property
    def served_model_names(self) -> list[str]:
        return self.config.model.served_model_names

    @property
    def max_logprobs(self) -> int:
        return self.config.model.max_logprobs

    @property
    def is_pooling_model(self) -> bool:
        """Whether the model runs as an embedding model (`embed`), rather than a generative one."""
        return self.config.model.is_pooling

    @property
    def sampling_defaults(self) -> dict:
        """The model's generation-config defaults (--generation-config) for fields a request leaves out."""
        return self.llm_engine.sampling_defaults

    def default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.llm_engine.sampling_defaults)

    def eos_token_ids(self) -> list[int]:
        return self.llm_engine.eos_token_ids()

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(text or None, token ids) for any prompt form `generate` takes."""
        return self.llm_engine.input_processor.tokenize(prompt)

    @property
    def supports_images(self) -> bool:
        return self.llm_engine.input_processor.images is not None

    @property
    def allowed_local_media_path(self) -> str | None:
        return self.config.model.allowed_local_media_path

    def process_images(self, prompt_token_ids: list[int], images: list, where: str = "multi_modal_data.image"):
        """(token ids with image placeholders expanded, MultiModalInputs): the model's image processor, for a
        caller that prepares requests off the loop (the server's worker thread); raises InvalidParameterError
        (InvalidImageError naming the image) for what cannot be used."""
        return self.llm_engine.input_processor.images.process(prompt_token_ids, images, where)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams | PoolingParams) -> None:
        """Every engine-side rule a request must meet, raised before anything is queued. The params' token
        lists are tokenized and made compact here, kept on `params` for `add_request` (so call this off the
        loop for a big request, and do not change those lists afterwards)."""
        self.llm_engine.input_processor.validate(prompt_token_ids, params)

    async def compile_structured_outputs(self, params: SamplingParams):
        """The grammar of `params.structured_outputs` (None without one), compiled in a thread under the
        compile deadline (see engine/structured/compile_lanes.py) and cached; raises InvalidParameterError
        naming what is wrong, QueueFullError when the compiler is too busy."""
        if params.structured_outputs is None:
            return None
        return await self.llm_engine.structured.compile_async(params.structured_outputs)

    async def prepare_token_constraints(self, params: SamplingParams) -> None:
        """Checks and tokenizes the params' token lists (logit_bias, allowed_token_ids, bad_words,
        stop_token_ids) in a thread when there are any, so that a big list never holds the loop;
        `add_request` then finds them done. Raises InvalidParameterError naming the field."""
        if params.token_constraints is None and (params.logit_bias or params.allowed_token_ids
                                                 or params.bad_words or params.stop_token_ids):
            await asyncio.get_running_loop().run_in_executor(
                self._preparer, self.llm_engine.input_processor.prepare_token_constraints, params)

    # ---- requests -------------------------------------------------------------------------------

    async def prepare_lora(self, lora_request) -> None:
        """Reads a LoRA adapter's files off the loop the first time a request names it (then kept in host
        memory); raises LoRAAdapterError / InvalidParameterError as add_request would."""
        manager = self.llm_engine.lora
        if lora_request is None or manager is None or manager.is_loaded(lora_request):
            return
        adapter = await asyncio.get_running_loop().run_in_executor(self._preparer, manager.read, lora_request)
        manager.register(lora_request, adapter)

    def add_request(self, prompt: PromptType, params: SamplingParams, request_id: str | None = None,
                    sink: OutputSink | None = None, lora_request=None, priority: int = 0):
        """Validates and queues a request; raises InvalidParameterError / QueueFullError before anything runs.
        Its outputs go to `sink`, called on the loop as each step is processed (a new RequestStream, to be
        awaited, without one)."""
        self.check_health()
        if self._task is None:
            raise EngineDeadError("The engine is not started: `await engine.start()` first, or mount "
                                  "its app so that start-up runs it.")
        bound = self.config.scheduler.max_num_waiting
        if bound is not None:
            # Only what cannot start at the next step waits: free running slots take the first arrivals.
            scheduler = self.llm_engine.scheduler
            free_slots = max(0, self.config.scheduler.max_num_seqs - scheduler.num_running)
            num_beyond = scheduler.num_waiting - free_slots
            if num_beyond >= bound:
                raise QueueFullError(f"{num_beyond} requests already wait beyond the {free_slots} free running "
                                     f"slots (max_num_waiting={bound}); try again later.")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        # On the loop, as cheap as it is for a small request: `generate` compiled the grammar and built the
        # token lists off the loop, and the server checks a big prompt off the loop first.
        processed = self.llm_engine.input_processor.process(prompt, params)
        request = self.llm_engine.add_request(request_id, processed,
                                              delta=sink is not None and getattr(sink, "delta", False),
                                              lora_request=lora_request, priority=priority)
        stream = sink if sink is not None else RequestStream()
        self._streams[request_id] = stream
        self._wakeup.set()
        return request, stream

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, lora_request=None,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yields cumulative outputs until the request finishes; leaving early aborts it."""
        # A copy: what is prepared for this request is kept on it, not on the caller's object.
        sampling_params = (sampling_params or self.default_sampling_params()).clone()
        grammar = await self.compile_structured_outputs(sampling_params)
        if grammar is not None:  # found by add_request without compiling on the loop, cached or not
            self.llm_engine.structured.hand_over(sampling_params.structured_outputs, grammar)
        await self.prepare_token_constraints(sampling_params)
        await self.prepare_lora(lora_request)
        request, stream = self.add_request(prompt, sampling_params, request_id, lora_request=lora_request,
                                           priority=priority)
        finished = False
        try:
            while not finished:
                output = await stream.get()
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.abort(request.request_id)

    async def embed(self, prompt: PromptType, pooling_params: PoolingParams | None = None,
                    request_id: str | None = None) -> EmbeddingRequestOutput:
        """The prompt's embedding, computed with whatever else runs (an embedding model only); being
        cancelled aborts it."""
        request, stream = self.add_request(prompt, pooling_params or PoolingParams(), request_id)
        finished = False
        try:
            output = await stream.get()
            finished = True
        finally:
            if not finished:
                self.abort(request.request_id)
        if output.outputs is None:
            raise RequestAbortedError(f"Request {request.request_id} was aborted before its embedding was ready.")
        return output

    async def beam_search(self, prompt: PromptType, params: BeamSearchParams) -> BeamSearchOutput:
        """Beam search for one prompt, sharing the engine with everything else in flight."""
        _, prompt_ids = self.tokenize_prompt(prompt)
        return await beam_search_async(self, prompt_ids, params)

    def abort(self, request_id: str) -> None:
        """Frees the request's KV blocks now; its stream ends with finish_reason 'abort'."""
        stream = self._streams.pop(request_id, None)
        output = self.llm_engine.abort_request(request_id)
        if stream is not None and output is not None:
            stream.put(output)
            stream.end_step()

    # ---- the loop -------------------------------------------------------------------------------

    async def _run(self) -> None:
        """The pipeline: launch step N+1 on the worker thread, then process step N on the loop while the
        device (or, on the CPU, the worker) computes N+1."""
        loop = asyncio.get_running_loop()
        engine = self.llm_engine
        in_flight = None  # (scheduled, PendingStep)
        try:
            while True:
                if in_flight is None and not engine.has_unfinished_requests():
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    self._last_progress = time.monotonic()  # work arrived: the clock starts now
                    continue
                profile = self.step_profile
                profile.start()
                if in_flight is not None and engine.must_apply_before_scheduling(in_flight[1]):
                    # Speculative decoding: the drafts of the next step follow the tokens of this one.
                    await self._apply(*in_flight, profile)
                    in_flight = None
                message, scheduled = engine.schedule()
                launch = (loop.run_in_executor(self._executor, engine.executor.launch, message)
                          if scheduled else None)
                profile.mark("schedule")
                if in_flight is not None:
                    await self._apply(*in_flight, profile)
                in_flight = (scheduled, await launch) if launch is not None else None
                profile.mark("wait_launch")
                if in_flight is not None and in_flight[1].needs_grammar_masks:
                    # Masks from the tokens just processed, filled and applied while nothing else runs
                    # on the worker; the forward pass of this step is already on the device.
                    await loop.run_in_executor(self._executor, engine.sample_under_grammars, *in_flight)
                    profile.mark("grammar")
                profile.end_step(scheduled, engine.scheduler.num_waiting)
                self._last_progress = time.monotonic()
                if in_flight is None and scheduled == [] and engine.has_unfinished_requests():
                    await asyncio.sleep(0.001)  # everything waits on blocks held by finishing requests
                self._log_stats()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug or a device failure: fail every stream, refuse new work
            logger.exception("engine loop failed")
            self._dead = exc
            self._touched.clear()
            for request_id, stream in list(self._streams.items()):
                stream.put(EngineDeadError(f"The engine failed: {exc!r}"))
                stream.end_step()
                self._streams.pop(request_id, None)

    async def _apply(self, scheduled: list, pending, profile: StepProfile) -> None:
        """Waits for a launched step's results (off the loop) and hands its outputs to their sinks."""
        if not pending.done():  # wait for the device off the loop
            await asyncio.get_running_loop().run_in_executor(self._waiter, pending.result)
        profile.mark("wait_device")
        for result in self.llm_engine.process(scheduled, pending.result()):
            self._deliver(result)
        await self._end_step()
        profile.mark("process")

    def _deliver(self, output: RequestOutput) -> None:
        stream = self._streams.get(output.request_id)
        if stream is None:
            return
        if output.finished:
            del self._streams[output.request_id]
            request_metrics(output, self.llm_engine)
        stream.put(output)
        self._touched.append(stream)

    async def _end_step(self) -> None:
        """Tells each sink that got outputs this step that the step is complete (a sink fed by several
        requests is told once per request: `end_step` after the first finds nothing new). A sink may frame
        and write its client's step there: the loop is let in between slices of sinks, so that hundreds of
        clients' writes never hold it in one piece (the next step is already computing meanwhile)."""
        touched, self._touched = self._touched, []
        for start in range(0, len(touched), _SINKS_PER_SLICE):
            if start:
                await asyncio.sleep(0)
            for stream in touched[start:start + _SINKS_PER_SLICE]:
                stream.end_step()

    # ---- what the server reports ----------------------------------------------------------------

    def _log_stats(self, interval: float = 10.0) -> None:
        """One line every `interval` seconds while busy: throughput, queues, KV use, prefix-cache hits."""
        now = time.monotonic()
        if self.config.disable_log_stats or now - self._last_log[0] < interval:
            return
        stats = self.stats()
        last_time, last_prompt, last_generated = self._last_log
        elapsed = now - last_time
        queries = stats["prefix_cache_queries_total"]
        logger.info(
            "prompt %.1f tokens/s, generation %.1f tokens/s | running %d, waiting %d | KV cache %.1f%% | "
            "prefix cache hit rate %.1f%%", (stats["prompt_tokens_total"] - last_prompt) / elapsed,
            (stats["generation_tokens_total"] - last_generated) / elapsed, stats["num_requests_running"],
            stats["num_requests_waiting"], 100 * stats["kv_cache_usage_perc"],
            100 * stats["prefix_cache_hits_total"] / queries if queries else 0.0)
        speculator = self.llm_engine.speculator
        if speculator is not None:
            line = speculator.stats.line(self._last_spec_stats)
            if speculator.governor is not None and speculator.governor.rates():
                line += f"; {speculator.governor.summary()}"
            logger.info(line)
            self._last_spec_stats = speculator.stats.as_dict()
        logger.info("engine loop: %s", self.step_profile.line(self._last_profile))
        self._last_profile = self.step_profile.stats()
        self._last_log = (now, stats["prompt_tokens_total"], stats["generation_tokens_total"])

    def stats(self) -> dict:
        scheduler, pool = self.llm_engine.scheduler, self.llm_engine.block_pool
        return {
            "num_requests_running": scheduler.num_running,
            "num_requests_waiting": scheduler.num_waiting,
            "kv_cache_usage_perc": pool.usage(),
            "prompt_tokens_total": self.llm_engine.stats["prompt_tokens"],
            "generation_tokens_total": self.llm_engine.stats["generation_tokens"],
            "num_preemptions_total": scheduler.num_preemptions,
            "prefix_cache_queries_total": pool.num_cache_queries,
            "prefix_cache_hits_total": pool.num_cache_hits,
            "iteration_tokens_total": self.llm_engine.iteration_tokens,
            **self.step_profile.stats(),
            **self._spec_decode_stats(),
        }

    def _spec_decode_stats(self) -> dict:
        """vLLM's speculative decoding counters (their names with _total), none without speculation."""
        speculator = self.llm_engine.speculator
        if speculator is None:
            return {}
        stats = speculator.stats
        return {"spec_decode_num_drafts_total": stats.num_drafts,
                "spec_decode_num_draft_tokens_total": stats.num_draft_tokens,
                "spec_decode_num_accepted_tokens_total": stats.num_accepted_tokens,
                "spec_decode_num_accepted_tokens_per_pos_total": list(stats.num_accepted_tokens_per_pos)}


def request_metrics(output: RequestOutput, engine: LLMEngine) -> None:
    """Timings of a finished request, for the server's latency histograms."""
    request = engine.finished_timings.pop(output.request_id, None)
    if request is not None:
        output.metrics.update(request)
