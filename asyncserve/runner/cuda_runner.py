"""The GPU runner: a dedicated CUDA stream, CUDA graphs replayed for decode-only steps, and a
one-step lookahead that hides the engine's host work behind the GPU.

Lookahead: after a plain greedy decode step, if every sequence's next token stays in its current block,
the runner launches the next step at once, fed on the device with the ids just sampled, and only then
waits for this step's ids. While the GPU runs it, the engine detokenizes, checks stops and schedules.
If the engine then asks for exactly that step, it is already running; if anything changed (a sequence
finished, a request arrived, a block is needed), its results are simply not used: it wrote KV only into
slots past each sequence's computed length, which the next real write overwrites before anyone reads.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from asyncserve.runner.decode_graphs import _DecodeGraphs, graph_batch_sizes
from asyncserve.runner.inputs import build_model_inputs, build_sampling_tensors
from asyncserve.runner.matvec_tuning import tune_single_row_products
from asyncserve.runner.model_runner import ModelRunner
from asyncserve.runner.step import SequenceResult, StepInput, StepOutput

logger = logging.getLogger("asyncserve")


@dataclass
class _Lookahead:
    """A decode step launched before the engine asked for it."""

    seq_ids: list[int]
    positions: list[int]
    padded: int

    def matches(self, step: StepInput, padded: int) -> bool:
        return (padded == self.padded and len(step.seqs) == len(self.seq_ids)
                and all(seq.seq_id == seq_id and seq.start_position == position
                        for seq, seq_id, position in zip(step.seqs, self.seq_ids, self.positions)))


def _plain_greedy(sampling) -> bool:
    """Argmax of the raw logits is the answer: no bias, penalty or logprob to apply."""
    return (sampling.all_greedy and sampling.logit_bias is None and sampling.output_tokens is None
            and sampling.max_num_logprobs < 0)


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
        self.lookahead: _Lookahead | None = None
        self.num_lookahead_hits = 0
        self._host_tokens = torch.zeros(max(1, max_num_seqs), dtype=torch.int64, pin_memory=True)
        # Before the memory profile: the timing briefly holds extra weight copies.
        tune_single_row_products(model)

    @torch.inference_mode()
    def prepare(self) -> None:
        if self.enforce_eager:
            return
        started = time.perf_counter()
        logger.info("capturing CUDA graphs of decode steps (--enforce-eager skips this)")
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
        lookahead, self.lookahead = self.lookahead, None
        self.apply_block_moves(step)
        sampling = build_sampling_tensors(step, self.vocab_size, self.device)
        padded = None
        if self.decode_graphs is not None and all(
                len(seq.new_token_ids) == 1 and seq.num_samples == 1 and seq.prompt_logprobs is None
                for seq in step.seqs):
            padded = self.decode_graphs.padded_size(len(step.seqs))
        if padded is not None:
            if _plain_greedy(sampling):
                moved = step.block_copies or step.swap_in or step.swap_out
                if lookahead is not None and not moved and lookahead.matches(step, padded):
                    self.num_lookahead_hits += 1  # this step is already on the GPU
                else:
                    self.decode_graphs.run(step, padded)
                return StepOutput([SequenceResult([token]) for token in self._greedy_ids(step, padded)])
            logits, _ = self.decode_graphs.run(step, padded)
            return self._to_host(step, self.sampler(logits, sampling), None, [0] * len(step.seqs))
        inputs = build_model_inputs(step, self.block_size, self.device)
        hidden = self.forward(inputs.input_ids, inputs.positions, inputs.meta)
        sampled = None
        if sampling is not None:
            sampled = self.sampler(self.model.compute_logits(hidden[inputs.logits_indices]), sampling)
        return self._to_host(step, sampled, self._prompt_logprobs(hidden, inputs, step),
                             inputs.prompt_row_counts)

    def _greedy_ids(self, step: StepInput, padded: int) -> list[int]:
        """This step's ids, read back only after the next step (if it can be foreseen) is launched."""
        graphs, batch = self.decode_graphs, len(step.seqs)
        host = self._host_tokens[:batch]
        host.copy_(graphs.greedy_tokens[padded][:batch], non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        block_size = self.block_size
        positions = [seq.start_position + 1 for seq in step.seqs]
        if all(position % block_size != 0 for position in positions):
            graphs.advance(batch)
            graphs.replay(padded)
            self.lookahead = _Lookahead([seq.seq_id for seq in step.seqs], positions, padded)
        done.synchronize()
        return host.tolist()
