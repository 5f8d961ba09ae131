"""The runner's own copy of every live sequence, kept up to date by the step messages' diffs.

Like vLLM's persistent input batch: a sequence's prompt, parameters and random generators arrive once;
each step then brings only where it stands and its new blocks, so the message stays small and picklable.
The tokens the runner samples are appended here by the runner itself, once read back ("folded"); until
then a decode's input token exists only on the device, and the runner feeds it from there.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from asyncserve.runner.constraint_rows import BadWordMatch, DeviceConstraints
from asyncserve.runner.step import NewSequence, StepMessage


_UNBOUNDED = 1 << 62


class SequenceState:
    """What the runner knows of one sequence, plus this step's part of it (set by `InputBatch.apply`)."""

    __slots__ = ("seq_id", "token_ids", "num_prompt_tokens", "params", "block_table", "generators",
                 "num_unread", "start_position", "new_token_ids", "num_samples", "prompt_logprobs",
                 "constraints", "bad_word_match", "state_slot", "draft_token_ids", "lora_slot",
                 "multimodal", "rope_delta", "image_embeds", "draft_num_computed")

    def __init__(self, seq_id: int, token_ids: list[int], num_prompt_tokens: int, params,
                 generators: list, constraints: DeviceConstraints | None = None, multimodal=None):
        self.seq_id = seq_id
        self.token_ids = token_ids
        self.num_prompt_tokens = num_prompt_tokens
        self.params = params
        self.block_table: list[int] = []
        # Sample i of a step that completes the prompt draws from generators[i] (None: global RNG).
        self.generators = generators
        self.num_unread = 0  # sampled on the device, not yet appended to token_ids
        self.start_position = 0
        self.new_token_ids: list[int] = []
        self.num_samples = 0
        self.prompt_logprobs: int | None = None
        # The request's logit_bias, allowed ids, bad words and min_tokens bans, on the device (None: none).
        self.constraints = constraints
        self.bad_word_match: BadWordMatch | None = (
            constraints.new_match(num_prompt_tokens) if constraints is not None else None)
        self.state_slot: int | None = None  # hybrid models: its slot of the state pool
        self.draft_token_ids: list[int] | tuple = ()  # this step's proposed tokens (speculative decoding)
        self.lora_slot = -1  # LoRA: its adapter's GPU slot this step (-1: the base model)
        # Images (multimodal/inputs.py): their inputs, the rotary shift of every token after the last one,
        # and the encoder's output of each image whose tokens are still being prefilled (runner/images.py).
        self.multimodal = multimodal
        self.rope_delta = multimodal.rope_delta if multimodal is not None else 0
        self.image_embeds: dict[int, object] = {}
        # Speculative decoding with a draft model: the draft's KV of this sequence is valid below
        # min(draft_num_computed, start_position). Unbounded at first: blocks the target found in the
        # prefix cache (or shares with a fork's parent) were computed by the draft beside it.
        self.draft_num_computed = _UNBOUNDED

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) + self.num_unread - self.num_prompt_tokens


@dataclass
class ScheduledBatch:
    """One step as the runner executes it: the scheduled sequences' states, in the message's order."""

    seqs: list[SequenceState]
    block_copies: list[tuple[int, int]]
    swap_out: list[tuple[int, int]]
    swap_in: list[tuple[int, int]]
    # Sequences (index in `seqs`) whose last input token is still on the device: their
    # new_token_ids end with a 0 that the runner overwrites on the device before the forward.
    unread_inputs: list[int] = field(default_factory=list)
    # Hybrid models' state slots: zeroed (sequences at their first token) and swapped before the forward,
    # copied to forks after it.
    state_resets: list[int] = field(default_factory=list)
    state_swap_out: list[tuple[int, int]] = field(default_factory=list)
    state_swap_in: list[tuple[int, int]] = field(default_factory=list)
    state_fork_copies: list[tuple[int, int]] = field(default_factory=list)
    has_drafts: bool = False  # some sequence verifies proposed tokens (speculative decoding)
    # A draft model's proposals for this step's drafts, flat in batch order, on the device (runner/draft_model.py).
    proposals: torch.Tensor | None = None


class InputBatch:
    def __init__(self, device: torch.device):
        self.device = device
        self.states: dict[int, SequenceState] = {}

    def apply(self, message: StepMessage) -> ScheduledBatch:
        states = self.states
        for new in message.new_seqs:
            states[new.seq_id] = SequenceState(new.seq_id, list(new.token_ids), new.num_prompt_tokens,
                                               new.params, self._generators(new), self._constraints(new),
                                               new.multimodal)
        for seq_id in message.finished_seq_ids:  # after the new ones: a fork may draw on its parent
            states.pop(seq_id, None)
        seqs = []
        unread_inputs = []
        state_resets = []
        has_drafts = False
        for index, entry in enumerate(message.seqs):
            state = states[entry.seq_id]
            if entry.replace_block_table:
                state.block_table = list(entry.new_block_ids)
            elif entry.new_block_ids:
                state.block_table.extend(entry.new_block_ids)
            drafts = entry.draft_token_ids
            start, end = entry.start_position, entry.start_position + entry.num_new_tokens - len(drafts)
            state.start_position = start
            state.new_token_ids = state.token_ids[start:end]
            if end > len(state.token_ids):  # the token sampled last step, not read back yet
                state.new_token_ids.append(0)
                unread_inputs.append(index)
            state.draft_token_ids = drafts
            if drafts:
                state.new_token_ids.extend(drafts)
                has_drafts = True
            state.num_samples = entry.num_samples
            state.prompt_logprobs = entry.prompt_logprobs
            state.state_slot = entry.state_slot
            state.lora_slot = entry.lora_slot
            if entry.state_slot is not None and start == 0:
                state_resets.append(entry.state_slot)
            seqs.append(state)
        return ScheduledBatch(seqs, message.block_copies, message.swap_out, message.swap_in, unread_inputs,
                              state_resets, message.state_swap_out, message.state_swap_in,
                              message.state_fork_copies, has_drafts)

    def refresh_inputs(self, batch: ScheduledBatch) -> None:
        """After a fold made the unread tokens known on the host: input ids straight from token_ids."""
        for index in batch.unread_inputs:
            state = batch.seqs[index]
            state.new_token_ids = state.token_ids[state.start_position:
                                                  state.start_position + len(state.new_token_ids)]
        batch.unread_inputs = []

    def fold(self, seq_ids: list[int], token_ids: list[int]) -> None:
        """Appends each sequence's own sampled token (a finished sequence may be gone: skipped)."""
        states = self.states
        for seq_id, token_id in zip(seq_ids, token_ids):
            state = states.get(seq_id)
            if state is not None:
                state.token_ids.append(token_id)
                state.num_unread -= 1

    def fold_runs(self, seq_ids: list[int], runs: list[list[int]]) -> None:
        """`fold` for a verify step: each sequence's run of kept drafts and the token after them."""
        states = self.states
        for seq_id, run in zip(seq_ids, runs):
            state = states.get(seq_id)
            if state is not None:
                state.token_ids.extend(run)
                state.num_unread -= 1

    def _constraints(self, new: NewSequence) -> DeviceConstraints | None:
        """Built on the device once per request: a fork shares its parent's."""
        if new.fork_parent is not None:
            return self.states[new.fork_parent].constraints
        constraints = getattr(new.params, "token_constraints", None)
        if constraints is None or not constraints.shapes_sampling:
            return None
        return DeviceConstraints(constraints, self.device)

    def _generators(self, new: NewSequence) -> list:
        """Seeded streams: sample i of a request draws from seed + i, whichever sequence carries it."""
        if new.fork_parent is not None:
            parent = self.states[new.fork_parent]
            return [parent.generators[new.index]]
        params = new.params
        if params.seed is None:
            return [None] * params.best_of
        return [torch.Generator(device=self.device).manual_seed(params.seed + i)
                for i in range(params.best_of)]
