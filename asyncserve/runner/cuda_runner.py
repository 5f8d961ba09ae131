"""The GPU runner: a dedicated CUDA stream, and CUDA graphs replayed for decode-only steps.

A decode step of a small model is a few hundred tiny kernels: launched one by one from Python they take
longer than the GPU needs to run them. Captured once per padded batch size at start-up, a step becomes
one graph launch. Mixed and prefill steps (variable shapes) run eagerly.
"""
from __future__ import annotations

import logging
import time

import torch

from asyncserve.layers.attention import AttentionMetadata
from asyncserve.runner.inputs import build_model_inputs, build_sampling_tensors
from asyncserve.runner.model_runner import ModelRunner
from asyncserve.runner.step import StepInput, StepOutput

logger = logging.getLogger("asyncserve")


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_num_seqs: padding wastes at most 7 rows."""
    sizes = [size for size in (1, 2, 4) if size < max_num_seqs]
    sizes += list(range(8, max_num_seqs + 1, 8))
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sorted(set(sizes))


class _DecodeGraphs:
    """Static input buffers sized for the largest batch, and one captured graph per padded size."""

    def __init__(self, runner: "CudaModelRunner", max_batch: int, max_model_len: int):
        device = runner.device
        self.max_model_len = max_model_len
        max_blocks = -(-max_model_len // runner.block_size)
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.sizes: list[int] = []

    def meta(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch], block_tables=self.block_tables[:batch],
            seq_lens=self.seq_lens[:batch], query_start_loc=self.query_start_loc[:batch + 1],
            max_query_len=1, max_seq_len=self.max_model_len)

    def capture(self, runner: "CudaModelRunner", sizes: list[int]) -> None:
        pool = torch.cuda.graph_pool_handle()
        model = runner.model
        for batch in sorted(sizes, reverse=True):  # largest first: smaller ones reuse its memory
            meta = self.meta(batch)
            for _ in range(2):  # warm-up: compiles the Triton kernels for this shape
                model.compute_logits(model(self.input_ids[:batch], self.positions[:batch], meta))
            torch.cuda.synchronize(runner.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=runner.stream):
                hidden = model(self.input_ids[:batch], self.positions[:batch], meta)
                self.logits[batch] = model.compute_logits(hidden)
            self.graphs[batch] = graph
        self.sizes = sorted(self.graphs)

    def padded_size(self, batch: int) -> int | None:
        for size in self.sizes:
            if size >= batch:
                return size
        return None

    def run(self, inputs, batch: int, padded: int) -> torch.Tensor:
        """Copies this step's inputs into the static buffers and replays; returns [batch, V] logits."""
        meta = inputs.meta
        self.input_ids[:batch].copy_(inputs.input_ids, non_blocking=True)
        self.positions[:batch].copy_(inputs.positions, non_blocking=True)
        self.slot_mapping[:batch].copy_(meta.slot_mapping, non_blocking=True)
        self.slot_mapping[batch:padded].fill_(-1)  # padding rows write nowhere
        width = meta.block_tables.shape[1]
        self.block_tables[:batch, :width].copy_(meta.block_tables, non_blocking=True)
        self.seq_lens[:batch].copy_(meta.seq_lens, non_blocking=True)
        self.seq_lens[batch:padded].fill_(1)
        self.graphs[padded].replay()
        return self.logits[padded][:batch]


class CudaModelRunner(ModelRunner):
    def __init__(self, model, vocab_size: int, block_size: int, device: torch.device, dtype: torch.dtype,
                 max_num_seqs: int, max_model_len: int, enforce_eager: bool = False):
        super().__init__(model, vocab_size, block_size, device, dtype)
        self.stream = torch.cuda.Stream(device=device)
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.enforce_eager = enforce_eager
        self.decode_graphs: _DecodeGraphs | None = None
        self.capture_seconds = 0.0

    @torch.inference_mode()
    def prepare(self) -> None:
        if self.enforce_eager:
            return
        started = time.perf_counter()
        graphs = _DecodeGraphs(self, self.max_num_seqs, self.max_model_len)
        with torch.cuda.stream(self.stream):
            graphs.capture(self, graph_batch_sizes(self.max_num_seqs))
        torch.cuda.synchronize(self.device)
        self.decode_graphs = graphs
        self.capture_seconds = time.perf_counter() - started
        logger.info("captured CUDA graphs for decode batch sizes %s in %.1f s", graphs.sizes,
                    self.capture_seconds)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput:
        with torch.cuda.stream(self.stream):
            return self._execute(step)

    def _execute(self, step: StepInput) -> StepOutput:
        self.apply_block_moves(step)
        inputs = build_model_inputs(step, self.block_size, self.device)
        sampling = build_sampling_tensors(step, self.vocab_size, self.device)
        batch = len(step.seqs)
        padded = None
        replayable = (step.is_decode_only and inputs.prompt_rows is None
                      and all(seq.num_samples == 1 for seq in step.seqs))
        if self.decode_graphs is not None and replayable:
            padded = self.decode_graphs.padded_size(batch)
        if padded is not None:
            logits = self.decode_graphs.run(inputs, batch, padded)
            sampled = self.sampler(logits, sampling) if sampling is not None else None
            return self._to_host(step, sampled, None, inputs)
        hidden = self.forward(inputs.input_ids, inputs.positions, inputs.meta)
        sampled = None
        if sampling is not None:
            sampled = self.sampler(self.model.compute_logits(hidden[inputs.logits_indices]), sampling)
        return self._to_host(step, sampled, self._prompt_logprobs(hidden, inputs, step), inputs)
