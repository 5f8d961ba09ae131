"""Before each schedule: draft tokens for the running sequences that can take them, within their limits."""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from asyncserve.config.speculative import SpeculativeConfig
from asyncserve.engine.sequence import Sequence
from asyncserve.engine.spec_decode.governor import SpeculationGovernor
from asyncserve.engine.spec_decode.metrics import SpecDecodeStats
from asyncserve.engine.spec_decode.ngram_proposer import NgramProposer, TokenHistory
from asyncserve.runner.step import PROPOSED_BY_RUNNER

if TYPE_CHECKING:
    from asyncserve.engine.structured import StructuredOutputManager


def can_speculate(seq: Sequence) -> bool:
    """A decoding sequence whose every token is known on the host, sampled by rules the verify step can
    apply at each position. Left out: prompts still computing, a token still in flight, best_of/n > 1
    (forks) and beam search, bad words and min_tokens bans (their masks depend on each earlier token).
    A grammar's masks do too, but the engine computes them per draft position (llm_engine.py
    `sample_under_grammars`)."""
    if seq.num_in_flight or seq.num_computed_tokens != seq.num_tokens - 1:
        return False
    params = seq.params
    if params.best_of != 1:
        return False
    constraints = params.token_constraints
    if constraints is not None and (constraints.bad_words is not None or (
            constraints.min_tokens_banned is not None and seq.num_output_tokens < constraints.min_tokens)):
        return False
    return True


class DraftModelSlots:
    """methods draft_model and eagle3: the runner's draft model (or head) proposes the tokens at the start of the step that
    verifies them (it needs the device); the engine decides only how many, which the scheduler reserves."""

    def __init__(self, num_speculative_tokens: int):
        self.num_speculative_tokens = num_speculative_tokens

    def propose(self, history, token_ids: list[int], max_tokens: int) -> list[int]:
        return [PROPOSED_BY_RUNNER] * max(0, min(self.num_speculative_tokens, max_tokens))


class Speculator:
    def __init__(self, config: SpeculativeConfig, max_model_len: int,
                 structured: StructuredOutputManager | None = None):
        self.config = config
        self.max_model_len = max_model_len
        self.structured = structured  # cuts a constrained sequence's drafts where its grammar rejects one
        if config.method in ("draft_model", "eagle3"):
            self.proposer = DraftModelSlots(config.num_speculative_tokens)
        else:
            self.proposer = NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min,
                                          config.prompt_lookup_max)
        self.stats = SpecDecodeStats(config.num_speculative_tokens)
        self.governor = SpeculationGovernor() if config.disable_when_slower else None
        self._launched: deque[bool] = deque()  # whether each launched, not yet applied step speculated
        self._cut_short = False  # the next applied step is applied early: its interval is not a step's

    def is_active(self, num_running: int) -> bool:
        """Whether steps with this many running sequences speculate. Speculation trades compute (every
        draft is scored, kept or not) for fewer weight reads per token: a win while decode is bound by
        reading the weights and drafts come true, a loss once a large batch makes it compute-bound or the
        drafts are mostly wrong. A speculating step also runs without overlapping the host's work with
        the device's (its drafts need the last tokens). Above `disable_by_batch_size` running sequences,
        or where the governor measured it slower, the engine pipelines plain steps instead."""
        limit = self.config.disable_by_batch_size
        if limit is not None and num_running > limit:
            return False
        return self.governor is None or self.governor.wants(num_running)

    def step_launched(self, speculating: bool) -> None:
        self._launched.append(speculating)

    def cut_short(self) -> None:
        """The engine applies the plain step it just launched before scheduling the next (which may speculate):
        the time since the step before was applied is not a step's, so the governor does not count it."""
        self._cut_short = True

    def step_applied(self, num_seqs: int, num_tokens: int, decode_only: bool) -> None:
        """A launched step's results were applied: the governor times it as the kind it was launched as
        (a speculating step that found no drafts still gave up the overlap)."""
        speculating = self._launched.popleft() if self._launched else False
        clean, self._cut_short = decode_only and not self._cut_short, False
        if self.governor is not None:
            self.governor.record(speculating, num_seqs, num_tokens, clean)

    def propose(self, running: list[Sequence]) -> bool:
        """Sets each running sequence's `draft_token_ids` (empty when it does not speculate this step);
        returns whether this step speculates."""
        if not self.is_active(len(running)):
            return False
        for seq in running:
            if not can_speculate(seq):
                seq.draft_token_ids = []
                continue
            # Every emitted token must fit: at most d + 1 come out of a step with d drafts.
            room = self.max_model_len - seq.num_tokens - 1
            max_tokens = seq.params.max_tokens
            if max_tokens is not None:
                room = min(room, max_tokens - seq.num_output_tokens - 1)
            if seq.token_history is None and self.config.method == "ngram":
                seq.token_history = TokenHistory()
            drafts = self.proposer.propose(seq.token_history, seq.token_ids, room)
            if seq.matcher is not None and drafts and drafts[0] != PROPOSED_BY_RUNNER:
                # Nothing after a token the grammar rejects can be kept: it is not scored. (A draft model's
                # proposals exist only on the device; the verify step's masks reject them there.)
                del drafts[self.structured.num_valid_drafts(seq.matcher, drafts):]
            seq.draft_token_ids = drafts
        return True

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.stats.observe(num_draft_tokens, num_accepted)
