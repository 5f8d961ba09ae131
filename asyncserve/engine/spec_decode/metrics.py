"""Counters of speculative decoding, with vLLM's meaning: drafts (sequence-steps that proposed), draft
tokens, accepted tokens, and accepted tokens per draft position."""
from __future__ import annotations


class SpecDecodeStats:
    def __init__(self, num_speculative_tokens: int):
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_accepted_tokens_per_pos = [0] * num_speculative_tokens
        self.num_verify_steps = 0  # steps that verified any drafts (for drafts per step)

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        """One sequence's verify: `num_draft_tokens` proposed, the first `num_accepted` kept."""
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        per_pos = self.num_accepted_tokens_per_pos
        for position in range(num_accepted):
            per_pos[position] += 1

    def observe_step(self) -> None:
        """A step that verified drafts of one or more sequences."""
        self.num_verify_steps += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verify (the accepted drafts plus the target's own), as vLLM logs it."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def as_dict(self) -> dict:
        return {"spec_decode_num_drafts": self.num_drafts,
                "spec_decode_num_draft_tokens": self.num_draft_tokens,
                "spec_decode_num_accepted_tokens": self.num_accepted_tokens,
                "spec_decode_num_accepted_tokens_per_pos": list(self.num_accepted_tokens_per_pos),
                "spec_decode_num_verify_steps": self.num_verify_steps}

    def line(self, since: dict | None = None) -> str:
        """The periodic log's line, over the counts since `since` (an earlier as_dict())."""
        since = since or {}
        drafts = self.num_drafts - since.get("spec_decode_num_drafts", 0)
        draft_tokens = self.num_draft_tokens - since.get("spec_decode_num_draft_tokens", 0)
        accepted = self.num_accepted_tokens - since.get("spec_decode_num_accepted_tokens", 0)
        steps = self.num_verify_steps - since.get("spec_decode_num_verify_steps", 0)
        rate = 100 * accepted / draft_tokens if draft_tokens else 0.0
        mean = 1.0 + accepted / drafts if drafts else 0.0
        per_step = drafts / steps if steps else 0.0
        return (f"speculative decoding: mean acceptance length {mean:.2f}, acceptance rate {rate:.1f}%, "
                f"drafts {drafts} ({per_step:.1f} per verify step), draft tokens {draft_tokens}, "
                f"accepted tokens {accepted}")
