"""Runs one engine step on the model: the message's diffs applied to the input batch, inputs to
tensors, forward over the paged pool, sampling."""
from __future__ import annotations

import logging

import torch

from asyncserve.layers.attention import AttentionMetadata
from asyncserve.layers.sampler import Sampler, SamplerOutput, SamplingTensors
from asyncserve.runner.input_batch import InputBatch, ScheduledBatch
from asyncserve.runner.inputs import ModelInputs, build_model_inputs, build_sampling_tensors
from asyncserve.runner.kv_pool import KVPool
from asyncserve.runner.step import SequenceResult, StepMessage, StepOutput

logger = logging.getLogger("asyncserve")


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config):
        self.model = model
        self.config = config
        self.sampler = Sampler()
        self.kv_pool: KVPool | None = None
        self.input_batch = InputBatch(self.device)

    @property
    def device(self) -> torch.device:
        return self.config.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.config.model.dtype

    @property
    def vocab_size(self) -> int:
        return self.config.model.vocab_size

    @property
    def block_size(self) -> int:
        return self.config.cache.block_size

    def apply_block_moves(self, batch: ScheduledBatch) -> None:
        """Swaps and copy-on-write copies, before the forward can overwrite the blocks they read."""
        if batch.swap_out:
            self.kv_pool.swap_out(batch.swap_out)
        if batch.swap_in:
            self.kv_pool.swap_in(batch.swap_in)
        if batch.block_copies:
            self.kv_pool.copy_blocks(batch.block_copies)

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
    def execute(self, message: StepMessage) -> StepOutput:
        batch = self.input_batch.apply(message)
        self.apply_block_moves(batch)
        return self.execute_eager(batch, build_sampling_tensors(batch, self.vocab_size, self.device))

    def execute_eager(self, batch: ScheduledBatch, sampling: SamplingTensors | None) -> StepOutput:
        """The step without graphs: any mix of prefill chunks and decodes."""
        inputs = build_model_inputs(batch, self.block_size, self.device)
        hidden = self.forward(inputs.input_ids, inputs.positions, inputs.meta)
        sampled = None
        if sampling is not None:
            sampled = self.sampler(self.model.compute_logits(hidden[inputs.logits_indices]), sampling)
        return self._to_host(batch, sampled, self._prompt_logprobs(hidden, inputs, batch),
                             inputs.prompt_row_counts)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def _prompt_logprobs(self, hidden: torch.Tensor, inputs: ModelInputs, batch: ScheduledBatch):
        """(logprob of each next prompt token, its rank, top-N values, top-N ids), one row per position."""
        if inputs.prompt_rows is None:
            return None
        num_top = max(seq.prompt_logprobs or 0 for seq in batch.seqs)
        logprobs = self.model.compute_logits(hidden[inputs.prompt_rows]).float().log_softmax(dim=-1)
        chosen = logprobs.gather(1, inputs.prompt_targets[:, None])
        ranks = (logprobs > chosen).sum(dim=-1) + 1
        top_values, top_ids = logprobs.topk(num_top, dim=-1)  # num_top may be 0: empty rows
        return chosen[:, 0].tolist(), ranks.tolist(), top_values.tolist(), top_ids.tolist()

    def _to_host(self, batch: ScheduledBatch, sampled: SamplerOutput | None, prompt_logprobs,
                 prompt_row_counts: list[int]) -> StepOutput:
        token_ids = sampled.token_ids.tolist() if sampled is not None else []
        has_logprobs = sampled is not None and sampled.logprobs is not None
        if has_logprobs:
            values, ids, ranks = (sampled.logprobs.tolist(), sampled.logprob_token_ids.tolist(),
                                  sampled.ranks.tolist())
        results = []
        row = 0
        prompt_row = 0
        for seq, num_prompt_rows in zip(batch.seqs, prompt_row_counts):
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
