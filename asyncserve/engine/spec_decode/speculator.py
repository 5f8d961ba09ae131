"""Before each schedule: draft tokens for the running sequences that can take them, within their limits."""
from __future__ import annotations

from asyncserve.config.speculative import SpeculativeConfig
from asyncserve.engine.sequence import Sequence
from asyncserve.engine.spec_decode.metrics import SpecDecodeStats
from asyncserve.engine.spec_decode.ngram_proposer import NgramProposer, TokenHistory
from asyncserve.runner.step import PROPOSED_BY_RUNNER


def can_speculate(seq: Sequence) -> bool:
    """A decoding sequence whose every token is known on the host, sampled by rules that do not change
    between the positions of one step. Left out: prompts still computing, a token still in flight,
    best_of/n > 1 (forks) and beam search, grammars (refused with speculation at admission), bad words
    and min_tokens bans (their masks depend on each earlier token)."""
    if seq.num_in_flight or seq.num_computed_tokens != seq.num_tokens - 1 or seq.matcher is not None:
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
    def __init__(self, config: SpeculativeConfig, max_model_len: int):
        self.config = config
        self.max_model_len = max_model_len
        if config.method in ("draft_model", "eagle3"):
            self.proposer = DraftModelSlots(config.num_speculative_tokens)
        else:
            self.proposer = NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min,
                                          config.prompt_lookup_max)
        self.stats = SpecDecodeStats(config.num_speculative_tokens)

    def is_active(self, num_running: int) -> bool:
        """Whether steps with this many running sequences speculate. Speculation trades compute (every
        draft is scored, kept or not) for fewer weight reads per token: a win while decode is bound by
        reading the weights, a loss once a large batch makes it compute-bound. A speculating step also
        runs without overlapping the host's work with the device's (its drafts need the last tokens),
        so above `disable_by_batch_size` running sequences the engine pipelines plain steps instead."""
        return num_running <= self.config.disable_by_batch_size

    def propose(self, running: list[Sequence]) -> None:
        """Sets each running sequence's `draft_token_ids` (empty when it does not speculate this step)."""
        if not self.is_active(len(running)):
            return
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
            seq.draft_token_ids = self.proposer.propose(seq.token_history, seq.token_ids, room)

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.stats.observe(num_draft_tokens, num_accepted)
