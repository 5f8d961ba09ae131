"""A drafter's per-position decode forwards (drafts 2 .. k of every speculating sequence, each fed the
column before it on the device): eager, or replayed from CUDA graphs captured at start-up per padded batch
size.

They are k - 1 forwards of a handful of rows through a small model each step: launched kernel by kernel from
Python they cost more host time than the GPU needs to run them, which is what the target's decode graphs
(runner/decode_graphs.py) solved for its own steps. The graphs here take the same static buffers and batch
sizes, filled from the device instead of the host: each column's positions, slots and lengths are derived
on the device (`decode_columns`) and copied in, the padding rows write no KV (slot -1) and read one key
(length 1), and every row of those layers is independent of the others. An EAGLE-3 head also reads a
hidden state per row, its own pre-norm output of the column before, which a third buffer holds. Eager stays
where no graph was captured (the CPU, --enforce-eager) or the sequences outnumber the largest size.
"""
from __future__ import annotations

import torch

from asyncserve.config.tree import Config
from asyncserve.layers.attention import AttentionMetadata
from asyncserve.runner.decode_graphs import _DecodeGraphs, graph_batch_sizes
from asyncserve.runner.draft_inputs import decode_columns


def draft_graph_sizes(config: Config) -> list[int]:
    """The target's decode sizes up to the most sequences that may speculate in one step: more than
    `disable_by_batch_size` running turns speculation off."""
    limit = config.speculative.disable_by_batch_size
    return graph_batch_sizes(config.scheduler.max_num_seqs if limit is None else min(config.scheduler.max_num_seqs, limit))


class DraftDecodeGraphs:
    """The drafter's `decode_step` over static buffers, one graph per padded batch size. Without a capture
    (the CPU tests set `sizes`), `run` computes the same thing live: the same buffers, padding and rows."""

    def __init__(self, drafter, max_batch: int):
        config = drafter.config
        self.decode_step = drafter.decode_step
        self.inputs = _DecodeGraphs(drafter.model, drafter.device, config.cache.block_size, max_batch,
                                    config.model.max_model_len)
        # The warm-up forwards before each capture write no KV and read one key per row.
        self.inputs.slot_mapping.fill_(-1)
        self.inputs.seq_lens.fill_(1)
        hidden_size = drafter.recurrent_hidden_size
        self.hidden = None if hidden_size is None else torch.zeros(max_batch, hidden_size, dtype=config.model.dtype,
                                                                   device=drafter.device)
        self.num_runs = 0  # forwards run through the buffers: replays (tests read it)

    @property
    def sizes(self) -> list[int]:
        return self.inputs.sizes

    @sizes.setter
    def sizes(self, sizes: list[int]) -> None:
        self.inputs.sizes = sorted(sizes)

    def padded_size(self, count: int) -> int | None:
        return self.inputs.padded_size(count)

    def _forward(self, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        inputs = self.inputs
        hidden = None if self.hidden is None else self.hidden[:batch]
        return self.decode_step(inputs.input_ids[:batch], inputs.positions[:batch], inputs.meta(batch), hidden)

    def capture(self, sizes: list[int], stream: torch.cuda.Stream) -> None:
        self.inputs.capture(sizes, stream, self._forward)

    def _load(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
              hidden: torch.Tensor | None, size: int) -> None:
        """The column's rows into the buffers (device copies); rows count .. size pad: no KV written, one key
        read through a block table row of earlier steps (a valid block id), their tokens stale."""
        inputs, count = self.inputs, input_ids.shape[0]
        inputs.input_ids[:count].copy_(input_ids)
        inputs.positions[:count].copy_(positions)
        inputs.slot_mapping[:count].copy_(meta.slot_mapping)
        inputs.slot_mapping[count:size].fill_(-1)
        inputs.seq_lens[:count].copy_(meta.seq_lens)
        inputs.seq_lens[count:size].fill_(1)
        inputs.block_tables[:count, :meta.block_tables.shape[1]].copy_(meta.block_tables)
        if hidden is not None:
            self.hidden[:count].copy_(hidden)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            hidden: torch.Tensor | None, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`decode_step` of the column's rows, padded to `size`: (tokens [D], the head's hidden [D, E] or
        None), views of the graph's outputs, valid until its next replay."""
        count = input_ids.shape[0]
        self._load(input_ids, positions, meta, hidden, size)
        self.num_runs += 1
        key = size, self.inputs.max_model_len  # a drafter's graphs are captured at the full context bound
        if key in self.inputs.graphs:
            self.inputs.graphs[key].replay()
            tokens, hidden_out = self.inputs.outputs[key]
        else:
            tokens, hidden_out = self._forward(size)
        return tokens[:count], None if hidden_out is None else hidden_out[:count]


def propose_columns(drafter, first: torch.Tensor, first_hidden: torch.Tensor | None, row_positions: list[int],
                    num_drafts: list[int], block_tables: list[list[int]]) -> torch.Tensor:
    """[D, max(num_drafts)] greedy drafts: column 0 is `first`; column j comes from a decode forward of the
    drafter that reads column j - 1 (and an EAGLE-3 head the hidden state the forward before left) at
    position row + j. A sequence with fewer drafts rides along without writing KV past its own slots
    (slot -1), its extra columns ignored. Replayed from the drafter's graphs where one fits."""
    tokens = torch.empty(len(num_drafts), max(num_drafts), dtype=torch.int64, device=first.device)
    tokens[:, 0] = first
    if tokens.shape[1] == 1:  # one draft each: no decode forward (nor the copy of their block tables)
        return tokens
    graphs = drafter.decode_graphs
    size = graphs.padded_size(len(num_drafts)) if graphs is not None else None
    hidden = first_hidden
    for column, positions, meta in decode_columns(row_positions, num_drafts, block_tables,
                                                  drafter.config.cache.block_size, first.device):
        if size is None:
            column_tokens, hidden = drafter.decode_step(tokens[:, column - 1], positions, meta, hidden)
        else:
            column_tokens, hidden = graphs.run(tokens[:, column - 1], positions, meta, hidden, size)
        drafter.num_forwards += 1
        tokens[:, column] = column_tokens
    return tokens
