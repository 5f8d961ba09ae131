"""The GPU runner: a dedicated CUDA stream, and CUDA graphs replayed for decode-only steps.

Steps are launched, not run: `launch` queues a step's kernels and the copies of its results into pinned
host memory, and returns. The engine launches step N+1 before it reads step N's tokens, so the GPU always
has the next step queued while the host processes the last one; a decode's input token, sampled by the
step before, is copied on the device from that step's output (runner/model_runner.py).
"""
from __future__ import annotations

import logging
import time

import torch

from asyncserve.config.tree import Config
from asyncserve.layers.attention import AttentionMetadata
from asyncserve.models.base import CausalLM
from asyncserve.runner.decode_graphs import _DecodeGraphs, graph_batch_sizes
from asyncserve.runner.draft_decode import DraftDecodeGraphs, draft_graph_sizes
from asyncserve.runner.input_batch import ScheduledBatch
from asyncserve.runner.inputs import build_sampling_tensors, needs_grammar_masks
from asyncserve.runner.mixed_graphs import (
    DEFAULT_MAX_MIXED_GRAPH_TOKENS,
    MixedStepGraphs,
    mixed_graph_sizes,
)
from asyncserve.runner.model_runner import ModelRunner
from asyncserve.runner.pending import PendingStep
from asyncserve.runner.step import StepMessage
from asyncserve.runner.verify_graphs import VERIFY_GRAPHS, VerifyGraphs, verify_graph_sizes
from asyncserve.sample.sampler import SamplerOutput

logger = logging.getLogger("asyncserve")


class CudaModelRunner(ModelRunner):
    def __init__(self, model: CausalLM, config: Config, draft_model: CausalLM | None = None):
        super().__init__(model, config, draft_model)
        self.stream = torch.cuda.Stream(device=self.device)
        self.decode_graphs: _DecodeGraphs | None = None
        self.verify_graphs: VerifyGraphs | None = None
        self.capture_seconds = 0.0
        self.num_graph_steps = 0

    @torch.inference_mode()
    def prepare(self) -> None:
        # The pool (and below, the graphs' buffers) were zeroed on the default stream; steps run on ours.
        torch.cuda.synchronize(self.device)
        if self.config.model.enforce_eager or self.pooling is not None:  # an embedding model never decodes
            return
        started = time.perf_counter()
        logger.info("capturing CUDA graphs of decode steps (--enforce-eager skips this)")
        max_num_seqs = self.config.scheduler.max_num_seqs
        padding_state_slot = self.state_pool.padding_slot if self.state_pool is not None else None
        graphs = _DecodeGraphs(self.model, self.device, self.block_size, max_num_seqs,
                               self.config.model.max_model_len, padding_state_slot)
        torch.cuda.synchronize(self.device)
        with torch.cuda.stream(self.stream):
            graphs.capture(graph_batch_sizes(max_num_seqs), self.stream)
        torch.cuda.synchronize(self.device)
        self.decode_graphs = graphs
        logger.info("captured CUDA graphs for decode batch sizes %s in %.1f s", graphs.sizes,
                    time.perf_counter() - started)
        self._capture_draft_steps()
        self._capture_mixed_steps()
        self._capture_verify_steps()
        self.capture_seconds = time.perf_counter() - started

    def _capture_draft_steps(self) -> None:
        """A draft model's or EAGLE-3 head's per-position decode forwards, at start-up beside the target's
        decode graphs and from the memory left after the KV pool, as theirs are."""
        if self.drafter is None or self.config.speculative.num_speculative_tokens < 2:  # no such forwards
            return
        started = time.perf_counter()
        before = torch.cuda.memory_reserved(self.device)
        sizes = draft_graph_sizes(self.config)
        graphs = DraftDecodeGraphs(self.drafter, sizes[-1])
        torch.cuda.synchronize(self.device)
        with torch.cuda.stream(self.stream):
            graphs.capture(sizes, self.stream)
        torch.cuda.synchronize(self.device)
        self.drafter.decode_graphs = graphs
        logger.info("captured CUDA graphs of the %s's decode forwards (drafts 2 .. %d) for batch sizes %s in "
                    "%.1f s, %.0f MiB", self.drafter.name, self.config.speculative.num_speculative_tokens,
                    graphs.sizes, time.perf_counter() - started,
                    (torch.cuda.memory_reserved(self.device) - before) / (1 << 20))

    def _capture_mixed_steps(self) -> None:
        config = self.config
        limit = config.model.max_cudagraph_capture_size
        limit = DEFAULT_MAX_MIXED_GRAPH_TOKENS if limit is None else limit
        sizes = mixed_graph_sizes(min(limit, config.scheduler.max_num_batched_tokens))
        if not sizes:
            return
        if not MixedStepGraphs.supports(self.model) or config.parallel.tensor_parallel_size > 1:
            logger.info("mixed prefill+decode steps run eagerly: this model's layers read the step's "
                        "metadata outside attention" if config.parallel.tensor_parallel_size == 1 else
                        "mixed prefill+decode steps run eagerly under tensor parallelism")
            return
        started = time.perf_counter()
        graphs = MixedStepGraphs(self.model, self.device, sizes[-1])
        graphs.capture(sizes, self.stream, self.block_size)
        self.mixed_graphs = graphs
        logger.info("captured CUDA graphs of mixed prefill+decode steps for %d token counts up to %d "
                    "(%d pieces each) in %.1f s", len(sizes), sizes[-1], len(graphs.pieces[sizes[-1]]),
                    time.perf_counter() - started)

    def _capture_verify_steps(self) -> None:
        """Whole-step graphs of uniform verify steps (runner/verify_graphs.py), behind their switch."""
        config = self.config
        if not VERIFY_GRAPHS or config.speculative is None or config.speculative.method == "eagle3" \
                or self.lora_slots is not None \
                or config.parallel.tensor_parallel_size > 1 or not MixedStepGraphs.supports(self.model) \
                or self.model.state_layers() or getattr(self.model, "supports_images", False):
            return
        started = time.perf_counter()
        sizes = verify_graph_sizes(config.scheduler.max_num_seqs)
        graphs = VerifyGraphs(self.model, self.device, config.speculative.num_speculative_tokens + 1,
                              sizes[-1], config.model.max_model_len, self.block_size)
        with torch.cuda.stream(self.stream):
            graphs.capture(sizes, self.stream)
        torch.cuda.synchronize(self.device)
        self.verify_graphs = graphs
        logger.info("captured CUDA graphs of verify steps (%d tokens per sequence) for batch sizes %s in %.1f s",
                    graphs.query_len, graphs.sizes, time.perf_counter() - started)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """A uniform verify step replays its whole-step graph; any other step as the base runner runs it."""
        graphs = self.verify_graphs
        if graphs is not None:
            padded = graphs.takes(input_ids, meta)
            if padded is not None:
                return graphs.run(input_ids, positions, meta, padded)
        return super().forward(input_ids, positions, meta)

    @torch.inference_mode()
    def launch(self, message: StepMessage) -> PendingStep:
        with torch.cuda.stream(self.stream):
            batch = self.begin(message)
            if self.pooling is not None:
                return self.launch_pooling(batch, message.finished_seq_ids)
            if batch.has_drafts:
                return self.launch_verify(batch)
            return self._launch(batch)

    def _launch(self, batch: ScheduledBatch) -> PendingStep:
        sampling = build_sampling_tensors(batch, self.vocab_size, self.device)
        padded = None
        if self.decode_graphs is not None and all(
                len(seq.new_token_ids) == 1 and seq.num_samples == 1 and seq.prompt_logprobs is None
                for seq in batch.seqs):
            padded = self.decode_graphs.padded_size(len(batch.seqs))
        if padded is None:
            return self.launch_eager(batch, sampling)
        graphs = self.decode_graphs
        key = graphs.load_inputs(batch, padded)
        if self.lora_slots is not None:  # one row per sequence; the padding rows run the base model
            self.set_lora_rows(_lora_rows(batch, self.device))
        self.feed_unread_inputs(graphs.input_ids, batch, batch.unread_inputs)
        graphs.replay(key)
        self.num_graph_steps += 1
        num_seqs = len(batch.seqs)
        deferred = None
        logits, greedy_tokens = graphs.outputs[key]
        if sampling.plain_greedy:  # the argmax ran inside the graph
            sampled = SamplerOutput(token_ids=greedy_tokens[:num_seqs])
        elif needs_grammar_masks(batch):  # sampled by sample() once the masks are known
            sampled, deferred = None, (logits[:num_seqs], sampling)
        else:
            sampled = self.sampler(logits[:num_seqs], sampling)
        return self.pending(batch, sampled, None, [0] * num_seqs, deferred)

    @torch.inference_mode()
    def sample(self, pending: PendingStep, bitmask: torch.Tensor, rows: list[int]) -> None:
        with torch.cuda.stream(self.stream):
            super().sample(pending, bitmask, rows)


def _lora_rows(batch: ScheduledBatch, device: torch.device) -> torch.Tensor | None:
    slots = [seq.lora_slot for seq in batch.seqs]
    if max(slots) < 0:
        return None
    return torch.tensor(slots, dtype=torch.int32).to(device, non_blocking=True)
