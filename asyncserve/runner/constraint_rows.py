"""A request's token constraints on the runner's device: built once, when the runner first sees the request,
and shared by its forks. Each step asks every row for its fixed bias row and for the ids it may not sample
now (device tensors it already holds), and runner/inputs.py applies them all with a few batched ops."""
from __future__ import annotations

import torch

from asyncserve.sample.bad_words import BadWordAutomaton
from asyncserve.sample.token_constraints import TokenConstraints

_NEG_INF = float("-inf")


def _on(device: torch.device, tensor: torch.Tensor) -> torch.Tensor:
    # Pageable host memory, as runner/inputs.py's copies: staged before `to` returns, no stream sync.
    return tensor.to(device, non_blocking=True)


def _fixed_bias(constraints: TokenConstraints, device: torch.device) -> torch.Tensor:
    """[V] float32: vLLM's allowed_token_ids (-inf elsewhere), plus logit_bias, -inf on single-token bad words."""
    vocab_size = constraints.vocab_size
    if constraints.allowed_token_ids is not None:
        row = torch.full((vocab_size,), _NEG_INF, device=device)
        row[_on(device, constraints.allowed_token_ids)] = 0.0
    else:
        row = torch.zeros(vocab_size, device=device)
    if constraints.logit_bias_ids is not None:  # distinct ids (a dict's keys)
        row.index_add_(0, _on(device, constraints.logit_bias_ids), _on(device, constraints.logit_bias_values))
    if constraints.banned_token_ids is not None:
        row[_on(device, constraints.banned_token_ids)] = _NEG_INF
    return row


class BadWordMatch:
    """Where one row's generated tokens stand in its request's bad-word automaton."""

    __slots__ = ("node", "num_seen")

    def __init__(self, num_prompt_tokens: int):
        self.node = BadWordAutomaton.ROOT
        self.num_seen = num_prompt_tokens  # only generated tokens count

    def advance(self, automaton: BadWordAutomaton, token_ids: list[int]) -> int:
        """Feeds the tokens appended since the last call (one per step) and returns the state."""
        node = self.node
        for token in token_ids[self.num_seen:]:
            node = automaton.next(node, token)
        self.node, self.num_seen = node, len(token_ids)
        return node


class DeviceConstraints:
    """What sampling one request's rows needs, on the device."""

    def __init__(self, constraints: TokenConstraints, device: torch.device):
        self.device = device
        self.fixed_bias = _fixed_bias(constraints, device) if constraints.has_fixed_bias else None  # [V]
        self.min_tokens = constraints.min_tokens
        self.min_tokens_banned = (_on(device, constraints.min_tokens_banned)
                                  if constraints.min_tokens_banned is not None else None)
        self.bad_words = constraints.bad_words
        self._banned_at: dict[int, torch.Tensor] = {}  # automaton state -> the ids it bans, on the device

    @property
    def reads_output_tokens(self) -> bool:
        """Whether a step's bans depend on the values of the tokens generated so far."""
        return self.bad_words is not None

    def new_match(self, num_prompt_tokens: int) -> BadWordMatch | None:
        return BadWordMatch(num_prompt_tokens) if self.bad_words is not None else None

    def bans(self, num_output_tokens: int, match: BadWordMatch | None, token_ids: list[int]) -> list[torch.Tensor]:
        """The id tensors one row may not sample at this step: stop and eos ids before min_tokens, and the
        last tokens of the bad words whose prefix its output ends with."""
        bans = []
        if self.min_tokens_banned is not None and num_output_tokens < self.min_tokens:
            bans.append(self.min_tokens_banned)
        if match is not None:
            node = match.advance(self.bad_words, token_ids)
            if node != BadWordAutomaton.ROOT:
                banned = self._banned_at.get(node)
                if banned is None:  # once per state reached: the union along its failure chain
                    banned = _on(self.device, torch.tensor(self.bad_words.banned(node), dtype=torch.int64))
                    self._banned_at[node] = banned
                if banned.numel():
                    bans.append(banned)
        return bans
