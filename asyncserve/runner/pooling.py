"""The runner's side of embedding models: a step's hidden states pooled on the device, for every sequence
of the step in one go, and the vectors of the prompts that ended copied back to the host.

A pooling sequence is prompt-only: the step that computes its last prompt token (`num_samples` > 0 in the
step message) yields its embedding instead of a sampled token.
"""
from __future__ import annotations

import torch

from asyncserve.layers.pooler import Pooler
from asyncserve.runner.input_batch import ScheduledBatch
from asyncserve.runner.inputs import _pack
from asyncserve.runner.pending import to_host
from asyncserve.runner.step import SequenceResult, StepOutput


class PendingPooling:
    """A launched pooling step: its embeddings on their way to the host (PendingStep's face)."""

    def __init__(self, num_seqs: int, finished: list[tuple[int, int | None]], values: torch.Tensor | None):
        self._num_seqs = num_seqs
        self._finished = finished            # (index in the step, dimensions or None)
        self._host = to_host(values)
        self._event = None
        if values is not None and values.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()
        self._output: StepOutput | None = None

    needs_grammar_masks = False  # pooling steps sample nothing

    def done(self) -> bool:
        return self._event is None or self._event.query()

    def result(self) -> StepOutput:
        if self._output is None:
            if self._event is not None:
                self._event.synchronize()
            results = [SequenceResult(token_ids=[]) for _ in range(self._num_seqs)]
            for row, (index, dimensions) in enumerate(self._finished):
                results[index].embedding = self._host[row, :dimensions]
            self._output = StepOutput(results)
        return self._output


class PoolingRunner:
    def __init__(self, pooler_config, device: torch.device):
        self.pooler = Pooler(pooler_config.pooling_type, pooler_config.normalize)
        self.device = device
        # seq_id -> [E] float32 carried to the prompt's next chunk (MEAN: running sum; CLS: first row).
        self.partials: dict[int, torch.Tensor] = {}

    def forget(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self.partials.pop(seq_id, None)

    def pool(self, hidden: torch.Tensor, batch: ScheduledBatch) -> PendingPooling:
        seqs = batch.seqs
        counts = [len(seq.new_token_ids) for seq in seqs]
        first_rows, last_rows, row = [], [], 0
        for count in counts:
            first_rows.append(row)
            row += count
            last_rows.append(row - 1)
        finished = [index for index, seq in enumerate(seqs) if seq.num_samples]
        carried = [index for index, seq in enumerate(seqs)
                   if seq.start_position > 0 and seq.seq_id in self.partials]  # 0: (re)computed from scratch
        first, last, counts_dev, carried_index, finished_index = _pack(
            [first_rows, last_rows, counts, carried, finished], torch.int64, self.device)
        pooler = self.pooler
        segment_ids = None
        if pooler.pooling_type == "MEAN":
            segment_ids = torch.repeat_interleave(torch.arange(len(seqs), device=self.device), counts_dev,
                                                  output_size=row)
        values = pooler.step_values(hidden, first, last, segment_ids, len(seqs))
        if pooler.carries_partials:
            if carried:
                values = pooler.combine(values, carried_index,
                                        torch.stack([self.partials.pop(seqs[i].seq_id) for i in carried]))
            for index, seq in enumerate(seqs):
                if not seq.num_samples:  # the prompt goes on next step
                    self.partials[seq.seq_id] = values[index]
        if not finished:
            return PendingPooling(len(seqs), [], None)
        params = [seqs[index].params for index in finished]
        num_tokens = dimensions = normalize = None
        if pooler.pooling_type == "MEAN":
            num_tokens = torch.tensor([seqs[i].num_prompt_tokens for i in finished],
                                      dtype=torch.float32).to(self.device, non_blocking=True)
        if any(p.dimensions is not None for p in params):
            width = hidden.shape[1]
            dimensions = torch.tensor([p.dimensions or width for p in params]).to(self.device, non_blocking=True)
        if any(p.normalize is not None and p.normalize != pooler.normalize for p in params):
            normalize = torch.tensor([pooler.normalize if p.normalize is None else p.normalize for p in params]
                                     ).to(self.device, non_blocking=True)
        embeddings = pooler.finish(values[finished_index], num_tokens, dimensions, normalize)
        return PendingPooling(len(seqs), [(i, p.dimensions) for i, p in zip(finished, params)], embeddings)
