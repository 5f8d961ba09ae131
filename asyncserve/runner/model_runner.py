"""Runs one engine step on the model: inputs to tensors, forward over the paged pool, sampling."""
from __future__ import annotations

import logging

import torch

from asyncserve.layers.attention import AttentionMetadata
from asyncserve.layers.sampler import Sampler, SamplerOutput
from asyncserve.models.base import CausalLM
from asyncserve.runner.inputs import ModelInputs, build_model_inputs, build_sampling_tensors
from asyncserve.runner.kv_pool import KVPool
from asyncserve.runner.step import SequenceResult, StepInput, StepOutput

logger = logging.getLogger("asyncserve")


class ModelRunner:
    def __init__(self, model: CausalLM, vocab_size: int, block_size: int,
                 device: torch.device, dtype: torch.dtype):
        self.model = model
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        self.sampler = Sampler()
        self.kv_pool: KVPool | None = None

    def apply_block_moves(self, step: StepInput) -> None:
        """Swaps and copy-on-write copies, before the forward can overwrite the blocks they read."""
        if step.swap_out:
            self.kv_pool.swap_out(step.swap_out)
        if step.swap_in:
            self.kv_pool.swap_in(step.swap_in)
        if step.block_copies:
            self.kv_pool.copy_blocks(step.block_copies)

    def allocate_kv_pool(self, num_blocks: int) -> None:
        attention_layers = self.model.attention_layers()
        first = attention_layers[0]
        self.kv_pool = KVPool(len(attention_layers), num_blocks, self.block_size, first.num_kv_heads,
                              first.head_dim, self.dtype, self.device)
        for layer, cache in zip(attention_layers, self.kv_pool.layer_caches()):
            layer.kv_cache = cache

    def prepare(self) -> None:
        """Work done once the pool exists (CUDA graph capture on the GPU runner)."""

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput:
        self.apply_block_moves(step)
        inputs = build_model_inputs(step, self.block_size, self.device)
        hidden = self.forward(inputs.input_ids, inputs.positions, inputs.meta)
        sampling = build_sampling_tensors(step, self.vocab_size, self.device)
        sampled = None
        if sampling is not None:
            logits = self.model.compute_logits(hidden[inputs.logits_indices])
            sampled = self.sampler(logits, sampling)
        prompt_logprobs = self._prompt_logprobs(hidden, inputs, step)
        return self._to_host(step, sampled, prompt_logprobs, inputs.prompt_row_counts)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def _prompt_logprobs(self, hidden: torch.Tensor, inputs: ModelInputs, step: StepInput):
        """(logprob of each next prompt token, its rank, top-N values, top-N ids), one row per position."""
        if inputs.prompt_rows is None:
            return None
        num_top = max(seq.prompt_logprobs or 0 for seq in step.seqs)
        logprobs = self.model.compute_logits(hidden[inputs.prompt_rows]).float().log_softmax(dim=-1)
        chosen = logprobs.gather(1, inputs.prompt_targets[:, None])
        ranks = (logprobs > chosen).sum(dim=-1) + 1
        top_values, top_ids = logprobs.topk(num_top, dim=-1)  # num_top may be 0: empty rows
        return chosen[:, 0].tolist(), ranks.tolist(), top_values.tolist(), top_ids.tolist()

    def _to_host(self, step: StepInput, sampled: SamplerOutput | None, prompt_logprobs,
                 prompt_row_counts: list[int]) -> StepOutput:
        token_ids = sampled.token_ids.tolist() if sampled is not None else []
        has_logprobs = sampled is not None and sampled.logprobs is not None
        if has_logprobs:
            values, ids, ranks = (sampled.logprobs.tolist(), sampled.logprob_token_ids.tolist(),
                                  sampled.ranks.tolist())
        results = []
        row = 0
        prompt_row = 0
        for seq, num_prompt_rows in zip(step.seqs, prompt_row_counts):
            result = SequenceResult(token_ids=token_ids[row:row + seq.num_samples])
            if has_logprobs and seq.num_samples:
                num_top = seq.params.logprobs or 0
                result.logprobs = [
                    (values[r][0], ranks[r], list(zip(ids[r][1:1 + num_top], values[r][1:1 + num_top])))
                    for r in range(row, row + seq.num_samples)]
            if num_prompt_rows:
                chosen, prompt_ranks, top_values, top_ids = prompt_logprobs
                num_top = seq.prompt_logprobs
                result.prompt_logprobs = [
                    (chosen[r], prompt_ranks[r], list(zip(top_ids[r][:num_top], top_values[r][:num_top])))
                    for r in range(prompt_row, prompt_row + num_prompt_rows)]
                prompt_row += num_prompt_rows
            row += seq.num_samples
            results.append(result)
        return StepOutput(results)
