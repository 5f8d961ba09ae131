"""Turns a step description into the flat, unpadded tensors the model and the sampler read."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from asyncserve.kernels.lora_segments import lora_chunks
from asyncserve.layers.attention import AttentionMetadata
from asyncserve.sample.rejection_sampler import VerifyLayout
from asyncserve.sample.sampler import SamplingTensors
from asyncserve.runner.input_batch import ScheduledBatch, SequenceState

_NEG_INF = float("-inf")


@dataclass
class ModelInputs:
    input_ids: torch.Tensor        # [T]
    positions: torch.Tensor        # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor   # [S]: the hidden row each sample reads (repeated for forks)
    # (row in the hidden states, target token) for prompt logprobs, grouped per sequence.
    prompt_rows: torch.Tensor | None
    prompt_targets: torch.Tensor | None
    prompt_row_counts: list[int]   # per scheduled sequence
    unread_rows: list[int]         # rows of input_ids that the runner fills on the device
    lora_token_slots: torch.Tensor | None = None  # [T] LoRA: each row's adapter slot; None: no adapter this step
    lora_chunks: torch.Tensor | None = None  # [C, 3] LoRA: prompt rows' chunks (kernels/lora_segments.py)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Pageable on purpose: pinning a fresh buffer costs more than these few bytes take to copy.
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


# Triton specializes kernels on 16-byte pointer alignment and on integers divisible by 16: keeping
# every packed part aligned and block-table rows a multiple of 16 wide means one compiled variant
# per kernel, instead of a fresh compile whenever a step's batch shifts an offset.
_ALIGN = 16


def _round_up(value: int, multiple: int = _ALIGN) -> int:
    return -(-value // multiple) * multiple


def _pack(parts: list[list[int]], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """One host-to-device copy for several int lists; each comes back as an aligned view."""
    flat: list[int] = []
    spans = []
    for part in parts:
        spans.append((len(flat), len(part)))
        flat.extend(part)
        flat.extend([0] * (_round_up(len(flat)) - len(flat)))
    packed = _to_device(flat or [0], dtype, device)
    return [packed[start:start + size] for start, size in spans]


def build_model_inputs(step: ScheduledBatch, block_size: int, device: torch.device) -> ModelInputs:
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    seq_lens: list[int] = []
    query_start_loc = [0]
    logits_indices: list[int] = []
    prompt_rows: list[int] = []
    prompt_targets: list[int] = []
    prompt_row_counts: list[int] = []
    max_blocks = _round_up(max((len(seq.block_table) for seq in step.seqs), default=1))
    block_tables: list[list[int]] = []
    state_slots: list[int] = []
    lora_slots: list[int] = []
    lora_segments: list[tuple[int, int, int]] = []
    with_lora = any(seq.lora_slot >= 0 for seq in step.seqs)
    for seq in step.seqs:
        start, count = seq.start_position, len(seq.new_token_ids)
        row0 = len(input_ids)
        input_ids.extend(seq.new_token_ids)
        delta = seq.rope_delta  # M-RoPE: rows before the last image's end are rewritten (runner/images.py)
        positions.extend(range(start + delta, start + count + delta))
        table = seq.block_table
        slot_mapping.extend(table[p // block_size] * block_size + p % block_size
                            for p in range(start, start + count))
        seq_lens.append(start + count)
        query_start_loc.append(row0 + count)
        block_tables.append(table + [0] * (max_blocks - len(table)))
        if seq.state_slot is not None:
            state_slots.append(seq.state_slot)
        if with_lora:
            lora_slots.extend([seq.lora_slot] * count)
            if seq.lora_slot >= 0:
                lora_segments.append((row0, count, seq.lora_slot))
        num_drafts = len(seq.draft_token_ids)
        if num_drafts:  # speculative decoding: the last input token's row and each draft's
            logits_indices.extend(range(row0 + count - 1 - num_drafts, row0 + count))
        else:
            logits_indices.extend([row0 + count - 1] * seq.num_samples)
        num_rows = 0
        if seq.prompt_logprobs is not None:
            last = min(start + count, seq.num_prompt_tokens - 1)
            for position in range(start, last):
                prompt_rows.append(row0 + position - start)
                prompt_targets.append(seq.prompt_token_ids[position + 1])
            num_rows = max(0, last - start)
        prompt_row_counts.append(num_rows)
    # Two host-to-device copies per step, whatever the batch: one per dtype.
    max_query_len = max(len(seq.new_token_ids) for seq in step.seqs)
    state_starts = query_start_loc if state_slots and max_query_len > 1 else []
    chunk_table = lora_chunks(lora_segments) if with_lora and max_query_len > 1 else []
    ids, pos, slots, logits_rows, rows, targets, states, state_starts_device, loras, chunks = _pack(
        [input_ids, positions, slot_mapping, logits_indices, prompt_rows, prompt_targets, state_slots,
         state_starts, lora_slots, chunk_table], torch.int64, device)
    num_decodes = 0
    if max_query_len > 1:  # a mixed step: its leading decodes go to the decode kernel
        while len(step.seqs[num_decodes].new_token_ids) == 1:
            num_decodes += 1
    prefill_starts, prefill_lens, prefill_tables = [], [], []
    if num_decodes:  # the prefill part's own aligned copies, rather than offset views
        prefill_starts = [start - num_decodes for start in query_start_loc[num_decodes:]]
        prefill_lens = seq_lens[num_decodes:]
        prefill_tables = [b for table in block_tables[num_decodes:] for b in table]
    context_lens = [max(length, len(seq.token_ids)) for length, seq in zip(seq_lens, step.seqs)]
    lens, starts, tables, shifted, part_lens, part_tables, contexts = _pack(
        [seq_lens, query_start_loc, [b for table in block_tables for b in table], prefill_starts,
         prefill_lens, prefill_tables, context_lens], torch.int32, device)
    meta = AttentionMetadata(
        slot_mapping=slots, block_tables=tables.view(len(block_tables), max_blocks), seq_lens=lens,
        query_start_loc=starts, max_query_len=max_query_len, max_seq_len=max(seq_lens),
        num_decodes=num_decodes, prefill_query_start_loc=shifted if num_decodes else None,
        prefill_seq_lens=part_lens if num_decodes else None,
        prefill_block_tables=part_tables.view(-1, max_blocks) if num_decodes else None,
        decode_max_seq_len=max(seq_lens[:num_decodes], default=0),
        prefill_max_seq_len=max(seq_lens[num_decodes:], default=0), context_lens=contexts,
        state_slots=states if state_slots else None,
        state_query_start_loc=state_starts_device if state_starts else None,
        state_query_start_loc_host=torch.tensor(state_starts) if state_starts else None)
    unread_rows = [query_start_loc[index + 1] - 1 for index in step.unread_inputs]
    return ModelInputs(input_ids=ids, positions=pos, meta=meta, logits_indices=logits_rows,
                       prompt_rows=rows if prompt_rows else None,
                       prompt_targets=targets if prompt_rows else None,
                       prompt_row_counts=prompt_row_counts, unread_rows=unread_rows,
                       lora_token_slots=loras if with_lora else None,
                       lora_chunks=chunks.view(-1, 3) if chunk_table else None)


def _padded(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(row) for row in rows))
    return _to_device([row + [pad] * (width - len(row)) for row in rows], torch.int64, device)


def build_sampling_tensors(step: ScheduledBatch, vocab_size: int, device: torch.device) -> SamplingTensors | None:
    """One row per sample (a sequence that completes its prompt with best_of > 1 has several; one with d
    drafts has d + 1, its logits at the last token and each draft)."""
    drafted = None  # per row, the drafts before it: penalties count them as output
    if step.has_drafts:
        rows, drafted = _verify_rows(step)
    else:
        rows = [(seq, generator) for seq in step.seqs if seq.num_samples
                for generator in seq.generators[:seq.num_samples]]
    if not rows:
        return None
    params = [seq.params for seq, _ in rows]
    temperature = [p.temperature for p in params]
    all_greedy = all(p.is_greedy for p in params)
    if all_greedy and not any(p.logprobs is not None or p.best_of > p.n or p.structured_outputs
                              or _has_penalties(p) for p in params) \
            and all(seq.constraints is None for seq, _ in rows):
        return SamplingTensors(temperature=None, top_p=None, top_k=None, min_p=None,
                               generators=[], all_greedy=True, plain_greedy=True)
    t = SamplingTensors(
        temperature=None if all_greedy else _to_device(temperature, torch.float32, device),
        top_p=_to_device([p.top_p for p in params], torch.float32, device)
        if any(p.top_p < 1.0 for p in params) else None,
        top_k=_to_device([min(p.top_k or vocab_size, vocab_size) for p in params], torch.int64, device)
        if any(p.top_k for p in params) else None,
        min_p=_to_device([p.min_p for p in params], torch.float32, device)
        if any(p.min_p > 0.0 for p in params) else None,
        generators=[generator for _, generator in rows],
        all_greedy=all_greedy,
    )
    if any(_has_penalties(p) for p in params):
        t.presence_penalty = _to_device([p.presence_penalty for p in params], torch.float32, device)
        t.frequency_penalty = _to_device([p.frequency_penalty for p in params], torch.float32, device)
        t.repetition_penalty = _to_device([p.repetition_penalty for p in params], torch.float32, device)
        outputs = [seq.output_token_ids for seq, _ in rows]
        if drafted is not None:
            outputs = [output + list(extra) for output, extra in zip(outputs, drafted)]
        t.output_tokens = _padded(outputs, vocab_size, device)
        t.prompt_tokens = _padded([seq.prompt_token_ids for seq, _ in rows], vocab_size, device)
    t.logit_bias = constraint_bias([seq for seq, _ in rows], vocab_size, device)
    num_logprobs = [p.logprobs for p in params if p.logprobs is not None]
    if num_logprobs or any(p.best_of > p.n for p in params):
        t.max_num_logprobs = max(num_logprobs, default=0)
    return t


def _verify_rows(step: ScheduledBatch) -> tuple[list, list]:
    """Sample rows of a verify step (see `build_verify_layout`), and the drafts each row's position follows."""
    rows, drafted = [], []
    for seq in step.seqs:
        if not seq.num_samples:
            continue
        drafts = seq.draft_token_ids
        if drafts:
            generator = seq.generators[0]
            for position in range(len(drafts) + 1):
                rows.append((seq, generator))
                drafted.append(drafts[:position])
        else:
            for generator in seq.generators[:seq.num_samples]:
                rows.append((seq, generator))
                drafted.append(())
    return rows, drafted


def build_verify_layout(step: ScheduledBatch, device: torch.device) -> VerifyLayout:
    """The rejection sampler's groups, in sample-row order: a sequence with d drafts is one group of d + 1
    rows; every other sample (best_of forks too) a group of one row, sampled plainly."""
    row_drafts: list[int] = []
    starts: list[int] = []
    counts: list[int] = []
    rows_with_drafts: list[int] = []
    for seq in step.seqs:
        if not seq.num_samples:
            continue
        drafts = seq.draft_token_ids
        if drafts:
            starts.append(len(row_drafts))
            counts.append(len(drafts))
            rows_with_drafts.extend(range(len(row_drafts), len(row_drafts) + len(drafts)))
            row_drafts.extend(drafts)  # a draft model's placeholders are replaced on the device
            row_drafts.append(-1)
        else:
            for _ in range(seq.num_samples):
                starts.append(len(row_drafts))
                counts.append(0)
                row_drafts.append(-1)
    drafts_tensor, starts_tensor, counts_tensor = _pack([row_drafts, starts, counts], torch.int64, device)
    return VerifyLayout(drafts_tensor, starts_tensor, counts_tensor, max(counts, default=0),
                        frozenset(rows_with_drafts), tuple(starts))


def constraint_bias(rows: list[SequenceState], vocab_size: int, device: torch.device) -> torch.Tensor | None:
    """[S, V], row i for sample row i: its request's fixed bias (logit_bias, allowed_token_ids, single-token
    bad words), and -inf on what it may not sample now (stop/eos ids before min_tokens, bad words' last
    tokens). Every part is a device tensor built once per request (runner/constraint_rows.py): a step
    costs O(S) on the host and a few batched ops, whatever the size of the requests' lists."""
    fixed_rows, fixed, ban_rows, bans = [], [], [], []
    for index, seq in enumerate(rows):
        constraints = seq.constraints
        if constraints is None:
            continue
        if constraints.fixed_bias is not None:
            fixed_rows.append(index)
            fixed.append(constraints.fixed_bias)
        for banned in constraints.bans(seq.num_output_tokens, seq.bad_word_match, seq.token_ids):
            ban_rows.append(index)
            bans.append(banned)
    if not fixed and not bans:
        return None
    counts = [banned.numel() for banned in bans]
    fixed_index, ban_index, ban_counts = _pack([fixed_rows, ban_rows, counts], torch.int64, device)
    if len(fixed) == len(rows):
        bias = torch.stack(fixed)
    else:
        bias = torch.zeros(len(rows), vocab_size, dtype=torch.float32, device=device)
        if fixed:
            bias[fixed_index] = torch.stack(fixed)
    if bans:
        row_ids = torch.repeat_interleave(ban_index, ban_counts, output_size=sum(counts))
        bias[row_ids, torch.cat(bans)] = _NEG_INF
    return bias


def _has_penalties(params) -> bool:
    return bool(params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0)


def needs_grammar_masks(step: ScheduledBatch) -> bool:
    """Whether a row samples under a grammar: then sampling waits for the engine's masks."""
    return any(seq.num_samples and seq.params.structured_outputs is not None for seq in step.seqs)


def needs_output_token_values(step: ScheduledBatch) -> bool:
    """Whether sampling this step reads the values of generated tokens (penalties, multi-token bad
    words), not just their count: then the runner waits for the previous step's tokens."""
    return any(seq.num_samples and (_has_penalties(seq.params) or (
        seq.constraints is not None and seq.constraints.reads_output_tokens)) for seq in step.seqs)
