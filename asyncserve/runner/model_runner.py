"""Runs one engine step on the model: the message's diffs applied to the input batch, inputs to
tensors, forward over the paged pool, sampling."""
from __future__ import annotations

import dataclasses
import logging

import torch

from asyncserve.config.tree import Config
from asyncserve.layers.attention import AttentionMetadata
from asyncserve.layers.lora import LoRASlots, enable_lora
from asyncserve.models.base import CausalLM
from asyncserve.runner.draft_inputs import place_proposals
from asyncserve.runner.draft_model import DraftModel
from asyncserve.runner.images import image_step_inputs
from asyncserve.runner.input_batch import InputBatch, ScheduledBatch
from asyncserve.runner.inputs import (
    ModelInputs,
    build_model_inputs,
    build_sampling_tensors,
    build_verify_layout,
    needs_grammar_masks,
    needs_output_token_values,
)
from asyncserve.runner.kv_pool import KVPool, model_block_bytes
from asyncserve.runner.mixed_graphs import MixedStepGraphs
from asyncserve.runner.pending import HostCopy, PendingStep, VerifiedStep
from asyncserve.runner.pooling import PoolingRunner
from asyncserve.runner.state_pool import StatePool
from asyncserve.runner.step import StepMessage, StepOutput
from asyncserve.sample.rejection_sampler import RejectionSampler
from asyncserve.sample.sampler import Sampler, SamplerOutput, SamplingTensors

logger = logging.getLogger("asyncserve")


def _logprob_tensors(sampled: SamplerOutput | None):
    if sampled is None or sampled.logprobs is None:
        return None
    return sampled.logprobs, sampled.logprob_token_ids, sampled.ranks


def _to_device(rows: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    packed = torch.tensor(rows, dtype=torch.int64)
    return list(packed.to(device, non_blocking=True))


def _make_drafter(model: CausalLM, draft_model, config: Config):
    if config.speculative is not None and config.speculative.method == "eagle3":
        from asyncserve.runner.eagle3_drafter import Eagle3Drafter
        return Eagle3Drafter(draft_model, model, config)
    return DraftModel(draft_model, config)


class ModelRunner:
    def __init__(self, model: CausalLM, config: Config, draft_model: CausalLM | None = None):
        self.model = model
        self.config = config
        # Speculative decoding with a draft model or an EAGLE-3 head: it proposes the drafts a step
        # verifies, at its start.
        self.drafter = _make_drafter(model, draft_model, config) if draft_model is not None else None
        self.sampler = Sampler()
        self.rejection_sampler = RejectionSampler()  # speculative decoding's verify steps
        self.kv_pool: KVPool | None = None
        self.state_pool: StatePool | None = None  # hybrid models: the linear-attention layers' states
        self.input_batch = InputBatch(self.device)
        self._in_flight: list[PendingStep] = []  # launched steps not yet folded into the input batch
        self.num_device_fed_steps = 0  # steps launched before the host knew their input tokens
        self.mixed_graphs: MixedStepGraphs | None = None  # set by the GPU runner's prepare()
        self.num_mixed_graph_steps = 0
        pooler = config.model.pooler
        self.pooling = PoolingRunner(pooler, self.device) if pooler is not None else None  # embedding models
        for layer in model.state_layers():  # before the memory profile sizes the state pool
            layer.ssm_state_dtype = config.ssm_state_torch_dtype
        self.lora_slots: LoRASlots | None = None  # LoRA: adapters' GPU slots, wrapped into the linear layers
        self._lora_rows_set = False  # whether token_slots holds any adapter row (else all -1)
        self.lora_weights: dict[int, dict] = {}  # adapters' host weights, kept as the engine's LoRAManager says
        if config.lora is not None:  # before the memory profile: the stacked adapter weights count
            scheduler = config.scheduler
            self.lora_slots = LoRASlots(config.lora.max_loras, config.lora.max_lora_rank,
                                        max(scheduler.max_num_batched_tokens, scheduler.max_num_seqs), self.device,
                                        config.model.dtype)
            enable_lora(model, self.lora_slots)
        # Before the memory profile: the timing briefly holds extra weight copies.
        model.tune_single_row()
        if draft_model is not None:
            draft_model.tune_single_row()

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
        """Swaps and copy-on-write copies, before the forward can overwrite the blocks they read; state
        slots swapped, then zeroed for sequences at their first token (a slot just swapped out may be one)."""
        if batch.state_swap_out:
            self.state_pool.swap_out(batch.state_swap_out)
        if batch.state_swap_in:
            self.state_pool.swap_in(batch.state_swap_in)
        if batch.state_resets:
            self.state_pool.reset(batch.state_resets)
        self.kv_pool.apply_block_moves(batch)
        if self.drafter is not None:
            self.drafter.apply_block_moves(batch)

    def kv_bytes_per_block(self) -> int:
        """Device bytes of one block id: the target's KV and, with a draft model (an EAGLE-3 head), the draft's
        at the same id (the head's KV and the kept hidden states)."""
        block_bytes = model_block_bytes(self.model, self.block_size, self.config.kv_cache_torch_dtype)
        return block_bytes + (self.drafter.bytes_per_block() if self.drafter is not None else 0)

    def allocate_kv_pool(self, num_blocks: int) -> None:
        self.kv_pool = KVPool.for_model(self.model, num_blocks, self.block_size, self.config.kv_cache_torch_dtype,
                                        self.device)
        if self.drafter is not None:
            self.drafter.allocate_kv_pool(num_blocks)
        state_layers = self.model.state_layers()
        if state_layers:
            self.state_pool = StatePool(state_layers, self.config.cache.num_state_slots, self.device)

    def prepare(self) -> None:
        """Work done once the pool exists (CUDA graph capture on the GPU runner)."""

    def execute(self, message: StepMessage) -> StepOutput:
        return self.launch(message).result()

    @torch.inference_mode()
    def launch(self, message: StepMessage) -> PendingStep:
        """Queues the step's work and returns before its results reach the host."""
        batch = self.begin(message)
        if self.pooling is not None:
            return self.launch_pooling(batch, message.finished_seq_ids)
        if batch.has_drafts:
            return self.launch_verify(batch)
        return self.launch_eager(batch, build_sampling_tensors(batch, self.vocab_size, self.device))

    def launch_pooling(self, batch: ScheduledBatch, finished_seq_ids: list[int]):
        """An embedding model's step: the forward, then the pooled vectors of the prompts that ended."""
        self.pooling.forget(finished_seq_ids)
        inputs = build_model_inputs(batch, self.block_size, self.device)
        self.set_lora_rows(inputs.lora_token_slots, inputs.lora_chunks)
        hidden = self.forward_step(batch, inputs)
        return self.pooling.pool(hidden, batch)

    def begin(self, message: StepMessage) -> ScheduledBatch:
        """The message applied to the input batch; block moves queued before anything reads the pool; a
        draft model's part of the step run (runner/draft_model.py)."""
        if self._in_flight and self._in_flight[-1].needs_grammar_masks:
            raise RuntimeError("A step was launched before the previous one was sampled under its grammar "
                               "masks (executor.sample).")
        self._fold_read_steps()
        batch = self.input_batch.apply(message)
        self._load_lora_slots(message)
        if batch.unread_inputs and (needs_output_token_values(batch)
                                    or any(pending.is_verify for pending in self._in_flight)):
            for pending in self._in_flight:  # the sampler needs those tokens' values on the host
                pending.result()
            self._fold_read_steps()
            self.input_batch.refresh_inputs(batch)
        self.apply_block_moves(batch)
        if self.drafter is not None:  # before the target's forward, which verifies the draft's proposals
            batch.proposals = self.drafter.run(batch)
        return batch

    def launch_eager(self, batch: ScheduledBatch, sampling: SamplingTensors | None) -> PendingStep:
        """The step without graphs: any mix of prefill chunks and decodes."""
        inputs = build_model_inputs(batch, self.block_size, self.device)
        self.set_lora_rows(inputs.lora_token_slots, inputs.lora_chunks)
        self.feed_unread_inputs(inputs.input_ids, batch, inputs.unread_rows)
        hidden = self.forward_step(batch, inputs)
        if batch.state_fork_copies:  # the prompt's final state, before a later step advances the parent's
            self.state_pool.copy(batch.state_fork_copies)
        sampled = deferred = None
        if sampling is not None:
            logits = self.model.compute_logits(hidden[inputs.logits_indices])
            if needs_grammar_masks(batch):
                deferred = (logits, sampling)
            else:
                sampled = self.sampler(logits, sampling)
        return self.pending(batch, sampled, self._prompt_logprobs(hidden, inputs, batch),
                            inputs.prompt_row_counts, deferred)

    def launch_verify(self, batch: ScheduledBatch) -> VerifiedStep:
        """A step where some sequences score proposed tokens (speculative decoding): each such sequence's
        last token and drafts run as a short chunk over the paged KV, like a prefill chunk, and the
        rejection sampler keeps a prefix of the drafts plus one token. Eager. With grammar-constrained
        rows it waits, as a plain step does, for the engine's masks (one per verify row): a draft model's
        proposals are copied to the host before the target's forward is queued, so the engine can read
        them (and fill the masks) while that forward runs."""
        sampling = build_sampling_tensors(batch, self.vocab_size, self.device)
        layout = build_verify_layout(batch, self.device)
        inputs = build_model_inputs(batch, self.block_size, self.device)
        masked = needs_grammar_masks(batch)
        proposals = None
        if batch.proposals is not None:
            place_proposals(batch, batch.proposals, inputs, layout, sampling)
            if masked:
                proposals = HostCopy(batch.proposals)
        self.set_lora_rows(inputs.lora_token_slots, inputs.lora_chunks)
        self.feed_unread_inputs(inputs.input_ids, batch, inputs.unread_rows)
        hidden = self.forward_step(batch, inputs)
        if batch.state_fork_copies:
            self.state_pool.copy(batch.state_fork_copies)
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        verified = None if masked else self.rejection_sampler(logits, sampling, layout)
        sampled_rows = {}  # seq_id -> its own group
        group = 0
        for seq in batch.seqs:
            if seq.num_samples:
                sampled_rows[seq.seq_id] = group
                seq.num_unread += 1
                group += 1 if seq.draft_token_ids else seq.num_samples
        pending = VerifiedStep(batch.seqs, verified.token_ids if verified is not None else None,
                               list(layout.first_rows), sampled_rows,
                               _logprob_tensors(verified.logprobs) if verified is not None else None,
                               self._prompt_logprobs(hidden, inputs, batch), inputs.prompt_row_counts,
                               (logits, sampling, layout) if masked else None, proposals)
        self._in_flight.append(pending)
        return pending

    @torch.inference_mode()
    def sample(self, pending: PendingStep, bitmask: torch.Tensor, rows: list[int]) -> None:
        """Samples a launched step whose grammar-constrained rows waited for their masks: bitmask row i
        (host, int32) masks sample row rows[i], all in one kernel; the other rows sample as usual. A verify
        step's rows are its rejection sampler's, whose rule then reads the masked distribution."""
        logits, sampling = pending.deferred[:2]
        if rows:
            sampling.token_bitmask = bitmask.to(self.device, non_blocking=True)
            sampling.bitmask_rows = torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True)
        if pending.is_verify:
            verified = self.rejection_sampler(logits, sampling, pending.deferred[2])
            pending.sampled(verified.token_ids, _logprob_tensors(verified.logprobs))
            return
        sampled = self.sampler(logits, sampling)
        pending.sampled(sampled.token_ids, _logprob_tensors(sampled))

    def feed_unread_inputs(self, input_ids: torch.Tensor, batch: ScheduledBatch, rows: list[int]) -> None:
        """Writes, on the device, the input tokens that the previous step sampled and nobody read yet."""
        if not rows:
            return
        self.num_device_fed_steps += 1
        previous = self._in_flight[-1]
        sources = [previous.sampled_rows[batch.seqs[index].seq_id] for index in batch.unread_inputs]
        tokens = previous.device_token_ids
        if sources == rows == list(range(rows[0], rows[0] + len(rows))):  # steady decode: one copy
            input_ids[rows[0]:rows[0] + len(rows)].copy_(tokens[rows[0]:rows[0] + len(rows)])
            return
        source, target = _to_device([sources, rows], self.device)
        input_ids[target] = tokens[source]

    def pending(self, batch: ScheduledBatch, sampled: SamplerOutput | None, prompt_logprobs,
                prompt_row_counts: list[int], deferred=None) -> PendingStep:
        sampled_rows = {}
        row = 0
        for seq in batch.seqs:
            if seq.num_samples:
                sampled_rows[seq.seq_id] = row
                seq.num_unread += 1
                row += seq.num_samples
        pending = PendingStep(batch.seqs, sampled.token_ids if sampled is not None else None, sampled_rows,
                              _logprob_tensors(sampled), prompt_logprobs, prompt_row_counts, deferred)
        self._in_flight.append(pending)
        return pending

    def _fold_read_steps(self) -> None:
        """Appends the tokens of every step whose results were read, oldest first, to the input batch."""
        in_flight = self._in_flight
        while in_flight and (in_flight[0].token_ids is not None or len(in_flight) > 1):
            pending = in_flight.pop(0)
            pending.result()  # an older step nobody read (the engine reads each one before the next but one)
            if pending.is_verify:
                self.input_batch.fold_runs(*pending.own_runs())
            else:
                self.input_batch.fold(*pending.own_tokens())

    def _load_lora_slots(self, message: StepMessage) -> None:
        """Adapters entering GPU slots, before any forward; the weights come once (to every tensor-parallel
        rank with the message) and are kept until the engine says to drop them."""
        for slot, lora_id, weights, scaling in message.lora_loads:
            if weights is None:
                weights = self.lora_weights[lora_id]
            else:
                self.lora_weights[lora_id] = weights
            self.lora_slots.load(slot, weights, scaling)
        for lora_id in message.lora_forgets:
            self.lora_weights.pop(lora_id, None)

    def set_lora_rows(self, token_slots: torch.Tensor | None, chunks: torch.Tensor | None = None) -> None:
        """Each row's adapter slot for the next forward (None: every row runs the base model), and the
        prompt rows' chunks for the tiled kernels (None: the per-row ones)."""
        if self.lora_slots is None:
            return
        self.lora_slots.active = token_slots is not None  # eager steps of the base model alone skip LoRA
        self.lora_slots.chunks = chunks
        if token_slots is None and not self._lora_rows_set:
            return
        if token_slots is None:
            self.lora_slots.clear_token_slots()
        else:
            self.lora_slots.set_token_slots(token_slots)
        self._lora_rows_set = token_slots is not None

    def forward_step(self, batch: ScheduledBatch, inputs: ModelInputs) -> torch.Tensor:
        """The step's forward; a model that takes images gets its image rows and M-RoPE positions first
        (runner/images.py), and such a step runs eagerly."""
        if getattr(self.model, "supports_images", False):
            positions, image_embeds, key_ends = image_step_inputs(batch, self.model, inputs.positions, self.device)
            if image_embeds is not None or positions.dim() > 1:
                meta = inputs.meta if key_ends is None else dataclasses.replace(inputs.meta, key_ends=key_ends)
                return self.model(inputs.input_ids, positions, meta, image_embeds=image_embeds)
        return self.forward(inputs.input_ids, inputs.positions, inputs.meta)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """Any step that the decode graphs do not take: replayed in pieces if a capture fits it."""
        graphs = self.mixed_graphs
        if graphs is not None and graphs.padded_size(input_ids.shape[0]) is not None:
            self.num_mixed_graph_steps += 1
            return graphs.run(input_ids, positions, meta)
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
        return chosen[:, 0], ranks, top_values, top_ids
