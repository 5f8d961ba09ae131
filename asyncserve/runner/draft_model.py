"""Speculative decoding's draft model on the runner: a second, smaller causal LM beside the target, with its
own KV pool at the target's block ids, proposing each speculating sequence's drafts at the start of the step
that verifies them.

Per step: one forward over the draft's spans (prompt chunks, the tokens it missed, each speculating
sequence's last token: runner/draft_inputs.py), whose last rows give the first proposals; then one decode
forward per further draft position over the speculating sequences, fed its own argmax on the device
(runner/draft_decode.py: replayed from CUDA graphs on the GPU). The
proposals are greedy (the draft's argmax): a deterministic proposal is a point-mass q, so the rejection
sampler's rule for n-gram drafts (accept x with probability p(x), else draw from p without x) keeps the
target's distribution exactly for sampled requests too. The draft's KV of rejected drafts is overwritten
when those positions are computed again, as the target's is.
"""
from __future__ import annotations

import torch

from asyncserve.config.tree import Config
from asyncserve.layers.attention import AttentionMetadata
from asyncserve.models.base import CausalLM
from asyncserve.runner.draft_decode import DraftDecodeGraphs, propose_columns
from asyncserve.runner.draft_inputs import (
    DraftRow,
    draft_spans,
    flat_proposals,
    pack_spans,
    proposal_rows,
)
from asyncserve.runner.input_batch import ScheduledBatch
from asyncserve.runner.inputs import build_model_inputs
from asyncserve.runner.kv_pool import KVPool, model_block_bytes


class DraftModel:
    name = "draft model"
    profiles_own_forward = True  # the memory profile measures the draft's forward too
    recurrent_hidden_size = None  # its decode forwards read tokens only

    def __init__(self, model: CausalLM, config: Config):
        self.model = model
        self.config = config  # the target's tree: block size, token budget, KV dtype, device
        self.kv_pool: KVPool | None = None
        self.num_forwards = 0  # draft forward passes run (tests read it)
        self.decode_graphs: DraftDecodeGraphs | None = None  # captured by the GPU runner's prepare()

    @property
    def device(self) -> torch.device:
        return self.config.model.device

    def bytes_per_block(self) -> int:
        return model_block_bytes(self.model, self.config.cache.block_size, self.config.kv_cache_torch_dtype)

    def allocate_kv_pool(self, num_blocks: int) -> None:
        """As many blocks as the target's pool: the draft writes at the same block ids."""
        self.kv_pool = KVPool.for_model(self.model, num_blocks, self.config.cache.block_size,
                                        self.config.kv_cache_torch_dtype, self.device)

    def allocate_swap_space(self, num_blocks: int) -> None:
        self.kv_pool.allocate_swap_space(num_blocks)

    def apply_block_moves(self, batch: ScheduledBatch) -> None:
        """The target's swaps and copy-on-write copies, on the draft's pool too."""
        self.kv_pool.apply_block_moves(batch)

    def run(self, batch: ScheduledBatch) -> torch.Tensor | None:
        """The draft's part of a step: its spans computed, then the drafts of every sequence that verifies
        some, flat in batch order on the device (None: nobody speculates this step)."""
        spans = draft_spans(batch)
        if not spans:
            return None
        first = [self._forward_spans(forward) for forward in
                 pack_spans(spans, self.config.scheduler.max_num_batched_tokens)]
        first = [tokens for tokens in first if tokens is not None]
        for span in spans:
            span.seq.draft_num_computed = span.end
        if not first:
            return None
        last_positions, num_drafts, block_tables = proposal_rows(batch)
        tokens = propose_columns(self, torch.cat(first), None, last_positions, num_drafts,
                                 block_tables)  # [D, max drafts]
        for seq in batch.seqs:
            if seq.draft_token_ids:  # the draft fed itself drafts 1 .. d - 1 (the last one is never fed)
                seq.draft_num_computed += len(seq.draft_token_ids) - 1
        return flat_proposals(tokens, num_drafts)

    def _forward_spans(self, spans) -> torch.Tensor | None:
        """One forward over spans; the argmax at each proposing span's last row (None: no such span)."""
        step = ScheduledBatch([DraftRow(span) for span in spans], [], [], [])
        inputs = build_model_inputs(step, self.config.cache.block_size, self.device)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta)
        self.num_forwards += 1
        if not any(span.proposes for span in spans):
            return None
        return self.model.compute_logits(hidden[inputs.logits_indices]).argmax(dim=-1)

    def decode_step(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                    hidden: None) -> tuple[torch.Tensor, None]:
        """One decode forward of the proposing rows -> their greedy next tokens (what the graphs capture)."""
        return self.model.compute_logits(self.model(input_ids, positions, meta)).argmax(dim=-1), None
