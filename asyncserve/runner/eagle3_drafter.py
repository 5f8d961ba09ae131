"""Speculative decoding with an EAGLE-3 head on the runner: the target hands the hidden states entering
three of its layers to the head's `fc` at the end of every forward, which the runner keeps per KV slot
(a `HiddenStatePool` at the target's block ids); at the start of a step that verifies drafts, the head
proposes them from those.

The head's row at position p reads token p + 1 and the target's fused hidden state at p, so it runs one
position behind the target (runner/draft_inputs.py `head_spans`). Per step: one forward over the head's
spans, whose last row per speculating sequence (position last - 1, reading the last token) gives the first
proposal; then k - 1 decode forwards, each reading the previous draft and the head's own pre-norm output
(EAGLE-3's test-time recurrence; runner/draft_decode.py: replayed from CUDA graphs on the GPU). Those rows' KV is overwritten the next step, when the accepted positions
are computed again from the target's hidden states. Proposals are the head's argmax over its draft
vocabulary, mapped to target ids by `d2t`: a point mass, so the rejection sampler keeps the target's
distribution exactly, as with a draft model.
"""
from __future__ import annotations

import torch

from asyncserve.config.tree import Config
from asyncserve.layers.attention import AttentionMetadata
from asyncserve.models.base import CausalLM
from asyncserve.models.eagle3 import Eagle3Head, aux_layer_ids
from asyncserve.runner.draft_decode import DraftDecodeGraphs, propose_columns
from asyncserve.runner.draft_inputs import (
    DraftRow,
    flat_proposals,
    head_spans,
    pack_spans,
    proposal_rows,
)
from asyncserve.runner.input_batch import ScheduledBatch
from asyncserve.runner.inputs import build_model_inputs
from asyncserve.runner.kv_pool import HiddenStatePool, KVPool, model_block_bytes


class Eagle3Drafter:
    name = "EAGLE-3 head"
    # The head's one layer over the step's token budget peaks below the target's forward over it: the
    # memory profile measures the target's only.
    profiles_own_forward = False

    def __init__(self, head: Eagle3Head, target: CausalLM, config: Config):
        self.model = head
        self.config = config  # the target's tree: block size, token budget, KV dtype, device
        self.kv_pool: KVPool | None = None
        self.hidden_pool: HiddenStatePool | None = None
        self.num_forwards = 0  # head forward passes run (tests read it)
        self.decode_graphs: DraftDecodeGraphs | None = None  # captured by the GPU runner's prepare()
        self.recurrent_hidden_size = head.hf_config.hidden_size  # each decode forward reads the one before's output
        target.expose_aux_hidden_states(aux_layer_ids(head.hf_config, target.hf_config.num_hidden_layers),
                                        self._keep_hidden_states)

    @property
    def device(self) -> torch.device:
        return self.config.model.device

    def _keep_hidden_states(self, aux: list[torch.Tensor], meta) -> None:
        """Called inside every target forward: fc of the aux hidden states, kept at the rows' KV slots (the
        memory profile's forward, before the pool exists, computes it without keeping it)."""
        fused = self.model.combine(aux)  # [T, E]
        if self.hidden_pool is not None:
            self.hidden_pool.write(meta.slot_mapping, fused)

    def bytes_per_block(self) -> int:
        block_size = self.config.cache.block_size
        hidden_bytes = block_size * self.model.hf_config.hidden_size * self.config.model.dtype.itemsize
        return model_block_bytes(self.model, block_size, self.config.kv_cache_torch_dtype) + hidden_bytes

    def allocate_kv_pool(self, num_blocks: int) -> None:
        """As many blocks as the target's pool: the head's KV and the kept hidden states at the same ids."""
        block_size = self.config.cache.block_size
        self.kv_pool = KVPool.for_model(self.model, num_blocks, block_size, self.config.kv_cache_torch_dtype,
                                        self.device)
        self.hidden_pool = HiddenStatePool(num_blocks, block_size, self.model.hf_config.hidden_size,
                                           self.config.model.dtype, self.device)

    def allocate_swap_space(self, num_blocks: int) -> None:
        self.kv_pool.allocate_swap_space(num_blocks)
        self.hidden_pool.allocate_swap_space(num_blocks)

    def apply_block_moves(self, batch: ScheduledBatch) -> None:
        """The target's swaps and copy-on-write copies, on the head's pools too."""
        self.kv_pool.apply_block_moves(batch)
        self.hidden_pool.apply_block_moves(batch)

    def run(self, batch: ScheduledBatch) -> torch.Tensor | None:
        """The head's part of a step: its spans computed, then the drafts of every sequence that verifies
        some, flat in batch order on the device (None: nobody speculates this step)."""
        spans = head_spans(batch)
        if not spans:
            return None
        first = [self._forward_spans(forward) for forward in
                 pack_spans(spans, self.config.scheduler.max_num_batched_tokens)]
        first = [rows for rows in first if rows is not None]
        for span in spans:
            span.seq.draft_num_computed = span.end
        if not first:
            return None
        last_positions, num_drafts, block_tables = proposal_rows(batch)
        tokens = propose_columns(self, torch.cat([tokens for tokens, _ in first]),
                                 torch.cat([hidden for _, hidden in first]),
                                 [position - 1 for position in last_positions], num_drafts, block_tables)
        return flat_proposals(tokens, num_drafts)

    def _forward_spans(self, spans) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One forward over spans; at each proposing span's last row, the proposal and the head's pre-norm
        output (None: no such span)."""
        step = ScheduledBatch([DraftRow(span, shift=1) for span in spans], [], [], [])
        inputs = build_model_inputs(step, self.config.cache.block_size, self.device)
        hidden = self.hidden_pool.rows[inputs.meta.slot_mapping]  # the target's, at the same positions
        normed, prenorm = self.model(inputs.input_ids, inputs.positions, hidden, inputs.meta)
        self.num_forwards += 1
        if not any(span.proposes for span in spans):
            return None
        rows = inputs.logits_indices
        return self.model.draft_tokens(normed[rows]), prenorm[rows]

    def decode_step(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                    hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode forward of the proposing rows over the previous draft and the head's own hidden state
        -> (their proposals, the pre-norm output the next position reads); what the graphs capture."""
        normed, prenorm = self.model(input_ids, positions, hidden, meta)
        return self.model.draft_tokens(normed), prenorm
