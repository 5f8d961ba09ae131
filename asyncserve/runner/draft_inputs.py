"""What the draft model reads in a step, and where its proposals go.

The draft's KV lives at the target's block ids and slots, in its own smaller pool, so the draft needs no
block tables of its own: a span of a sequence's tokens is computed into the same slots the target uses.
Which spans a step gives the draft (`draft_spans`): every prompt chunk (as the target computes it), and for
a sequence that verifies drafts, the tokens it has not seen yet up to the sequence's last one (whose logits
give the first proposal). Single-token decodes that do not speculate are left for a later catch-up, so that
steps which do not speculate (above disable_by_batch_size, or where it measured slower) cost no draft forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from asyncserve.layers.attention import AttentionMetadata
from asyncserve.runner.input_batch import ScheduledBatch, SequenceState
from asyncserve.runner.inputs import ModelInputs
from asyncserve.sample.rejection_sampler import VerifyLayout
from asyncserve.sample.sampler import SamplingTensors


@dataclass(slots=True)
class DraftSpan:
    """Tokens [begin, end) of `seq` computed by the draft in one forward; `proposes`: its last row's
    logits give the sequence's first proposal."""

    seq: SequenceState
    begin: int
    end: int
    proposes: bool


class DraftRow:
    """A span as `build_model_inputs` reads a sequence: no drafts, images, adapter, state or prompt logprobs.
    `shift` 1 (EAGLE-3): the row at position p reads token p + 1."""

    __slots__ = ("block_table", "new_token_ids", "num_samples", "seq_id", "start_position", "token_ids")
    rope_delta = 0
    state_slot = None
    lora_slot = -1
    draft_token_ids = ()
    prompt_logprobs = None

    def __init__(self, span: DraftSpan, shift: int = 0):
        seq = span.seq
        self.seq_id = seq.seq_id
        self.token_ids = seq.token_ids
        self.start_position = span.begin
        self.new_token_ids = seq.token_ids[span.begin + shift:span.end + shift]
        self.block_table = seq.block_table
        self.num_samples = 1 if span.proposes else 0


def draft_spans(batch: ScheduledBatch) -> list[DraftSpan]:
    """The draft's part of the step's first forward, in batch order (see the module docstring). A
    sequence's draft KV is valid below min(draft_num_computed, start_position): the target's cached or
    kept tokens that the draft has computed too."""
    spans = []
    for seq in batch.seqs:
        num_drafts = len(seq.draft_token_ids)
        start = seq.start_position
        end = start + len(seq.new_token_ids) - num_drafts  # past the last real input token
        begin = min(seq.draft_num_computed, start)
        if num_drafts:
            if end > len(seq.token_ids):
                raise RuntimeError(f"sequence {seq.seq_id} verifies drafts before its last token reached the "
                                   "runner: the engine schedules a speculating step only after processing "
                                   "the one before it.")
            spans.append(DraftSpan(seq, begin, end, True))
        elif end - start > 1 or start < seq.num_prompt_tokens:
            end = min(end, len(seq.token_ids))  # a token still on the device waits for a later catch-up
            if end > begin:
                spans.append(DraftSpan(seq, begin, end, False))
    return spans


def head_spans(batch: ScheduledBatch) -> list[DraftSpan]:
    """An EAGLE-3 head's part of the step's first forward, in batch order. The head's row at position p
    reads the target's hidden state at p (written by an earlier step's forward) and token p + 1, so it
    runs one position behind the target: a sequence's rows below min(start_position, its known tokens - 1).
    Its KV is valid below min(draft_num_computed, start_position - 1) (a prefix hit's last cached row read
    a token the new sequence may not share; a recomputed sequence starts again at 0). Speculating
    sequences catch up to their last token, whose row proposes; prompt chunks follow the target one step
    behind; plain decodes are left for a later catch-up."""
    spans = []
    for seq in batch.seqs:
        start = seq.start_position
        seq.draft_num_computed = begin = min(seq.draft_num_computed, max(0, start - 1))
        end = min(start, len(seq.token_ids) - 1)
        if seq.draft_token_ids:
            if end != start:
                raise RuntimeError(f"sequence {seq.seq_id} verifies drafts before its last token reached the "
                                   "runner: the engine schedules a speculating step only after processing "
                                   "the one before it.")
            spans.append(DraftSpan(seq, min(begin, end - 1), end, True))
        elif start < seq.num_prompt_tokens and end > begin:
            spans.append(DraftSpan(seq, begin, end, False))
    return spans


def pack_spans(spans: list[DraftSpan], max_tokens: int) -> list[list[DraftSpan]]:
    """Spans in forwards of at most `max_tokens` tokens (the step's token budget: the draft's activations
    stay within what the memory profile measured); a span too long for one is split, its proposal row in
    the last piece."""
    forwards, current, size = [], [], 0
    for span in spans:
        begin = span.begin
        while begin < span.end:
            take = min(span.end - begin, max_tokens - size)
            current.append(DraftSpan(span.seq, begin, begin + take, span.proposes and begin + take == span.end))
            size += take
            begin += take
            if size == max_tokens:
                forwards.append(current)
                current, size = [], 0
    if current:
        forwards.append(current)
    return forwards


def proposal_rows(batch: ScheduledBatch) -> tuple[list[int], list[int], list[list[int]]]:
    """Per proposing sequence, in batch order: its last token's position, its number of drafts, its block
    table."""
    last_positions, num_drafts, block_tables = [], [], []
    for seq in batch.seqs:
        count = len(seq.draft_token_ids)
        if count:
            last_positions.append(seq.start_position + len(seq.new_token_ids) - count - 1)
            num_drafts.append(count)
            block_tables.append(seq.block_table)
    return last_positions, num_drafts, block_tables


def decode_columns(last_positions: list[int], num_drafts: list[int], block_tables: list[list[int]],
                   block_size: int, device: torch.device):
    """The decode forwards that propose draft columns 1 .. max(num_drafts) - 1: yields (column, positions
    [D], AttentionMetadata), the row of column j at position last + j. A row past its own drafts stays at
    its last draft's position and writes no KV (slot -1). Every forward's metadata is derived on the device
    from one copy of the host's lists."""
    count, width = len(num_drafts), max(num_drafts)
    max_blocks = max(len(table) for table in block_tables)
    padded = [block for table in block_tables for block in table + [0] * (max_blocks - len(table))]
    packed = torch.tensor(last_positions + num_drafts + padded, dtype=torch.int64).to(device, non_blocking=True)
    last, drafts, tables = packed[:count], packed[count:2 * count], packed[2 * count:].view(count, max_blocks)
    tables32 = tables.to(torch.int32)
    query_start_loc = torch.arange(count + 1, dtype=torch.int32, device=device)
    for column in range(1, width):
        positions = last + torch.clamp(drafts - 1, max=column)
        block = tables.gather(1, (positions // block_size)[:, None])[:, 0]
        slots = torch.where(column < drafts, block * block_size + positions % block_size, -1)
        seq_lens = (positions + 1).to(torch.int32)
        yield column, positions, AttentionMetadata(
            slot_mapping=slots, block_tables=tables32, seq_lens=seq_lens, query_start_loc=query_start_loc,
            max_query_len=1, max_seq_len=max(last_positions) + column + 1, context_lens=seq_lens)


def flat_proposals(tokens: torch.Tensor, num_drafts: list[int]) -> torch.Tensor:
    """[D, width] proposals -> each row's first num_drafts[row], flat in batch order (on the device)."""
    width = tokens.shape[1]
    flat = [row * width + column for row, count in enumerate(num_drafts) for column in range(count)]
    return tokens.flatten()[torch.tensor(flat, dtype=torch.int64).to(tokens.device, non_blocking=True)]


def place_proposals(batch: ScheduledBatch, proposals: torch.Tensor, inputs: ModelInputs, layout: VerifyLayout,
                    sampling: SamplingTensors | None) -> None:
    """Writes the flat proposals (device, batch order) where the verify step reads drafts: the target's
    input rows, the rejection sampler's draft rows and, with penalties, each verify row's earlier drafts
    counted as output. The host built those with placeholders; one index_put each, no sync."""
    input_rows, layout_rows, cells, sources, cell_sources = [], [], [], [], []
    row = group_row = offset = 0
    for seq in batch.seqs:
        count = len(seq.draft_token_ids)
        row += len(seq.new_token_ids)
        if count:
            input_rows.extend(range(row - count, row))
            layout_rows.extend(range(group_row, group_row + count))
            sources.extend(range(offset, offset + count))
            num_output = len(seq.token_ids) - seq.num_prompt_tokens
            for position in range(1, count + 1):  # verify row `position` follows drafts [0, position)
                for earlier in range(position):
                    cells.append((group_row + position, num_output + earlier))
                    cell_sources.append(offset + earlier)
            offset += count
            group_row += count + 1
        elif seq.num_samples:
            group_row += seq.num_samples
    device = proposals.device
    index = torch.tensor([input_rows, layout_rows, sources], dtype=torch.int64).to(device, non_blocking=True)
    values = proposals[index[2]]
    inputs.input_ids[index[0]] = values
    layout.draft_token_ids[index[1]] = values
    if sampling is not None and sampling.output_tokens is not None and cells:
        where = torch.tensor([[r for r, _ in cells], [c for _, c in cells], cell_sources],
                             dtype=torch.int64).to(device, non_blocking=True)
        sampling.output_tokens[where[0], where[1]] = proposals[where[2]]
