"""The step message the engine hands the executor, and what comes back.

Plain, picklable data over ints and lists, so a step can cross a process boundary (tensor-parallel
workers): a sequence's prompt, parameters and seed travel once (`NewSequence`); afterwards each step
sends only diffs (`ScheduledSequence`: where it stands, how many tokens to compute, the blocks added to
its table). The runner keeps the rest (runner/input_batch.py), including the tokens it sampled itself:
a decode's input token may still be on the device when the next step is launched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


# A draft position whose token the runner's draft model proposes at the start of the step (speculative
# decoding with method draft_model): the engine schedules the drafts' count, the runner fills in their values.
PROPOSED_BY_RUNNER = -1


@dataclass(slots=True)
class NewSequence:
    """Sent once, the first time a sequence is scheduled."""

    seq_id: int
    token_ids: list[int]          # prompt + any output so far (a fork starts with its parent's tokens)
    num_prompt_tokens: int
    params: Any                   # SamplingParams (a plain dataclass)
    # A fork continues the seeded random stream of sample `index` of its parent's request.
    index: int = 0
    fork_parent: int | None = None
    multimodal: Any = None        # MultiModalInputs: the request's images and M-RoPE positions (None: text)


@dataclass(slots=True)
class ScheduledSequence:
    """One sequence's part of one step, as a diff against what the runner already holds."""

    seq_id: int
    start_position: int           # tokens of the sequence already in the cache
    num_new_tokens: int           # tokens whose KV this step computes
    new_block_ids: list[int]      # appended to the runner's block table ...
    replace_block_table: bool = False  # ... or, when True, the whole table (after CoW, swap, preemption)
    num_samples: int = 1          # 0 mid-prompt; 1 normally; best_of when the prompt completes
    prompt_logprobs: int | None = None  # set on prompt chunks of requests that want them
    state_slot: int | None = None  # hybrid models: its slot of recurrent state (zeroed when start_position is 0)
    # Speculative decoding: tokens proposed after the sequence's last one, scored in this step (counted in
    # num_new_tokens); the step returns the ones the target kept and one more token. PROPOSED_BY_RUNNER
    # entries are proposed by the runner's draft model.
    draft_token_ids: list[int] | tuple = ()
    lora_slot: int = -1  # LoRA: the GPU slot of its adapter (-1: the base model)


@dataclass
class StepMessage:
    seqs: list[ScheduledSequence]
    new_seqs: list[NewSequence] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)  # the runner drops their state
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write, on the device
    swap_out: list[tuple[int, int]] = field(default_factory=list)      # (device block, host block)
    swap_in: list[tuple[int, int]] = field(default_factory=list)       # (host block, device block)
    # Hybrid models' state slots: swapped before the forward, copied to forks' slots after it.
    state_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device slot, host slot)
    state_swap_in: list[tuple[int, int]] = field(default_factory=list)   # (host slot, device slot)
    state_fork_copies: list[tuple[int, int]] = field(default_factory=list)  # (parent's slot, fork's slot)
    # LoRA: adapters to copy into GPU slots before this step's forward: (slot, lora id, weights by module, or
    # None: the runner keeps them from an earlier load, scaling); then the adapters whose weights it drops.
    lora_loads: list[tuple[int, int, dict | None, float]] = field(default_factory=list)
    lora_forgets: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(seq.num_new_tokens for seq in self.seqs)


@dataclass(slots=True)
class SequenceResult:
    token_ids: list[int]                   # num_samples sampled tokens
    # Per sample: (logprob of the chosen token, its rank, [(token_id, logprob), ...] top-N) or None.
    logprobs: list[tuple[float, int, list[tuple[int, float]]]] | None = None
    # Per prompt position computed in this step (targets are the next prompt tokens):
    # (logprob of the actual next token, its rank, top-N list).
    prompt_logprobs: list[tuple[float, int, list[tuple[int, float]]]] | None = None
    # An embedding model's result for a sequence whose prompt ended this step: [D] float32, on the host.
    embedding: Any = None
    # Speculative decoding: how many drafts this step verified; then token_ids is the sequence's run of
    # emitted tokens (the kept drafts, then the target's token), and logprobs one entry per token.
    num_draft_tokens: int = 0


@dataclass
class StepOutput:
    results: list[SequenceResult]  # aligned with StepMessage.seqs
