"""The verify rule: greedy keeps the drafts equal to the argmax, then the argmax; sampled keeps the target's
distribution exactly (a statistical test that wrong rules fail); seeded draws repeat."""
from __future__ import annotations

import math

import pytest
import torch

from asyncserve.sample.rejection_sampler import RejectionSampler, VerifyLayout
from asyncserve.sample.sampler import SamplingTensors

VOCAB = 8


def _greedy_tensors() -> SamplingTensors:
    return SamplingTensors(temperature=None, top_p=None, top_k=None, min_p=None, generators=[], all_greedy=True)


def _layout(groups: list[list[int]]) -> VerifyLayout:
    """groups: each group's drafts; rows are the drafts then one bonus row."""
    drafts, starts = [], []
    for group in groups:
        starts.append(len(drafts))
        drafts.extend(group + [-1])
    return VerifyLayout(torch.tensor(drafts), torch.tensor(starts), torch.tensor([len(g) for g in groups]),
                        max(len(g) for g in groups), frozenset(i for i, d in enumerate(drafts) if d >= 0))


def _argmax_logits(targets: list[int]) -> torch.Tensor:
    logits = torch.zeros(len(targets), VOCAB)
    logits[torch.arange(len(targets)), torch.tensor(targets)] = 5.0
    return logits


def _verify_greedy(groups, targets):
    out = RejectionSampler()(_argmax_logits(targets), _greedy_tensors(), _layout(groups))
    return out.token_ids.tolist(), out.num_accepted.tolist()


def test_greedy_all_accepted_then_the_bonus_token():
    assert _verify_greedy([[3, 4, 5]], [3, 4, 5, 6]) == ([[3, 4, 5, 6]], [3])


def test_greedy_first_rejected_gives_the_target_token():
    assert _verify_greedy([[3, 4, 5]], [2, 4, 5, 6]) == ([[2, -1, -1, -1]], [0])


def test_greedy_middle_rejected_keeps_the_prefix():
    assert _verify_greedy([[3, 4, 5]], [3, 1, 5, 6]) == ([[3, 1, -1, -1]], [1])


def test_greedy_groups_of_different_lengths_and_plain_rows():
    # A group with 2 drafts (both right), a plain sample (no drafts), a group with 1 wrong draft.
    tokens, accepted = _verify_greedy([[1, 2], [], [7]], [1, 2, 3, 6, 0, 4])
    assert tokens == [[1, 2, 3], [6, -1, -1], [0, -1, -1]]
    assert accepted == [2, 0, 0]


def _sampled_tensors(num_rows: int, generators=None, top_k=None) -> SamplingTensors:
    return SamplingTensors(temperature=torch.ones(num_rows), top_p=None,
                           top_k=torch.full((num_rows,), top_k) if top_k else None, min_p=None,
                           generators=generators or [None] * num_rows, all_greedy=False)


TARGET = [0.05, 0.1, 0.15, 0.2, 0.25, 0.1, 0.1, 0.05]


def _first_tokens(draft: int, num_groups: int, top_k=None, sampler=None) -> torch.Tensor:
    """The first emitted token of `num_groups` independent verifies of one draft against TARGET."""
    logits = torch.tensor(TARGET).log().repeat(2 * num_groups, 1)
    layout = _layout([[draft]] * num_groups)
    out = (sampler or RejectionSampler())(logits, _sampled_tensors(2 * num_groups, top_k=top_k), layout)
    return out.token_ids[:, 0]


def _chi_square(tokens: torch.Tensor, expected: list[float]) -> float:
    counts = torch.bincount(tokens, minlength=VOCAB).double()
    total = counts.sum().item()
    return sum((counts[i].item() - total * p) ** 2 / (total * p) for i, p in enumerate(expected) if p > 0) + \
        sum(math.inf for i, p in enumerate(expected) if p == 0 and counts[i] > 0)


# 7 degrees of freedom: P(chi2 > 30) < 1e-4, so a right rule fails about once in 10,000 runs; the
# wrong rules below land in the thousands at this sample size.
_BOUND = 30.0
_SAMPLES = 40000


@pytest.mark.parametrize("draft", [4, 0])
def test_first_token_has_the_target_distribution(draft):
    torch.manual_seed(1234)
    assert _chi_square(_first_tokens(draft, _SAMPLES), TARGET) < _BOUND


def test_the_distribution_is_the_processed_one():
    """top_k=3 keeps tokens 4, 3, 2: a draft outside them is always rejected, the rest renormalized."""
    torch.manual_seed(99)
    kept = [p if i in (2, 3, 4) else 0.0 for i, p in enumerate(TARGET)]
    expected = [p / sum(kept) for p in kept]
    tokens = _first_tokens(0, _SAMPLES, top_k=3)
    assert _chi_square(tokens, expected) < _BOUND


class _AlwaysAccept(RejectionSampler):
    def forward(self, logits, t, layout):
        out = super().forward(logits, t, layout)
        out.token_ids[:, 0] = layout.draft_token_ids[layout.group_starts]
        return out


def _resample_without_removing(logits, t, layout):
    """A wrong rule: on rejection draw from p itself (the draft not removed)."""
    probs = logits.softmax(dim=-1)
    drafts = layout.draft_token_ids[layout.group_starts]
    accept = torch.rand(len(drafts)) < probs[layout.group_starts].gather(1, drafts[:, None])[:, 0]
    resampled = torch.multinomial(probs[layout.group_starts], 1)[:, 0]
    return torch.where(accept, drafts, resampled)


def test_the_bound_fails_wrong_rules():
    torch.manual_seed(7)
    assert _chi_square(_first_tokens(4, _SAMPLES, sampler=_AlwaysAccept()), TARGET) > 100 * _BOUND
    logits = torch.tensor(TARGET).log().repeat(2 * _SAMPLES, 1)
    wrong = _resample_without_removing(logits, None, _layout([[4]] * _SAMPLES))
    assert _chi_square(wrong, TARGET) > 10 * _BOUND


def test_seeded_verifies_repeat_and_seeds_differ():
    logits = torch.tensor(TARGET).log().repeat(6, 1)
    layout = _layout([[4, 4, 4, 4, 4]])

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed + 1000)  # the global stream must not matter for seeded rows
        return RejectionSampler()(logits, _sampled_tensors(6, [generator] * 6), layout).token_ids.tolist()

    assert run(5) == run(5)
    assert len({str(run(seed)) for seed in range(8)}) > 1


def test_logprobs_are_those_of_the_emitted_tokens():
    logits = torch.randn(4, VOCAB)
    targets = logits.argmax(dim=-1).tolist()
    tensors = _greedy_tensors()
    tensors.max_num_logprobs = 2
    out = RejectionSampler()(logits, tensors, _layout([[targets[0], targets[1], (targets[2] + 1) % VOCAB]]))
    assert out.token_ids.tolist() == [[targets[0], targets[1], targets[2], -1]]
    reference = logits.log_softmax(dim=-1)
    for row in range(3):
        assert out.logprobs.logprob_token_ids[row, 0].item() == targets[row]
        assert out.logprobs.logprobs[row, 0].item() == pytest.approx(reference[row, targets[row]].item())
        assert out.logprobs.ranks[row].item() == 1
