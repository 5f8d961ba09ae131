"""The plain description of one engine step that the scheduler produces and the runner executes.

No torch here: the scheduler builds it from ints and lists, the runner turns it into tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ScheduledSequence:
    seq_id: int
    new_token_ids: list[int]      # the tokens whose KV this step computes
    start_position: int           # tokens of the sequence already in the cache
    block_table: list[int]
    num_samples: int              # 0 mid-prompt; 1 normally; best_of when the prompt completes
    params: Any                   # SamplingParams
    generators: list[Any]         # one per sample: torch.Generator, or None for the global RNG
    prompt_token_ids: list[int]
    token_ids: list[int]          # the whole sequence (prompt + output), shared with the engine: read only
    prompt_logprobs: int | None = None  # set on prompt chunks of requests that want them
    num_prompt_tokens: int = 0

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass
class StepInput:
    seqs: list[ScheduledSequence]
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write, on the device
    swap_out: list[tuple[int, int]] = field(default_factory=list)      # (device block, host block)
    swap_in: list[tuple[int, int]] = field(default_factory=list)       # (host block, device block)

    @property
    def num_tokens(self) -> int:
        return sum(len(seq.new_token_ids) for seq in self.seqs)

    @property
    def is_decode_only(self) -> bool:
        return all(len(seq.new_token_ids) == 1 for seq in self.seqs)


@dataclass(slots=True)
class SequenceResult:
    token_ids: list[int]                   # num_samples sampled tokens
    # Per sample: (logprob of the chosen token, its rank, [(token_id, logprob), ...] top-N) or None.
    logprobs: list[tuple[float, int, list[tuple[int, float]]]] | None = None
    # Per prompt position computed in this step (targets are the next prompt tokens):
    # (logprob of the actual next token, its rank, top-N list).
    prompt_logprobs: list[tuple[float, int, list[tuple[int, float]]]] | None = None


@dataclass
class StepOutput:
    results: list[SequenceResult]  # aligned with StepInput.seqs
