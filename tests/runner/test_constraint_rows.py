"""Token constraints built once per request, applied per step with batched ops: exact against the rule."""
from __future__ import annotations

import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncserve import SamplingParams
from asyncserve.sample.bad_words import BadWordAutomaton, bad_words_token_ids, banned_next_tokens
from asyncserve.runner import constraint_rows
from asyncserve.runner.input_batch import InputBatch
from asyncserve.runner.inputs import constraint_bias
from asyncserve.runner.step import NewSequence, ScheduledSequence, StepMessage
from asyncserve.sample.token_constraints import build_token_constraints

VOCAB = 40
EOS = 39
NEG_INF = float("-inf")


class LetterTokenizer:
    """Each letter is its own token (a=1 ... z=26), a space is 27: bad words' encodings are obvious."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [27 if char == " " else ord(char) - 96 for char in text]


def _params(**fields) -> SamplingParams:
    params = SamplingParams(**fields)
    params.token_constraints = build_token_constraints(params, VOCAB, LetterTokenizer(), [EOS])
    return params


def _reference_row(params: SamplingParams, token_ids: list[int], num_prompt_tokens: int) -> torch.Tensor:
    """The bias row as the rule defines it, entry by entry (what each step computed before)."""
    row = torch.zeros(VOCAB)
    if params.allowed_token_ids:
        row.fill_(NEG_INF)
        row[params.allowed_token_ids] = 0.0
    for token_id, value in (params.logit_bias or {}).items():
        row[token_id] += value
    sequences = bad_words_token_ids(params.bad_words or [], LetterTokenizer(), VOCAB)
    for token_id in banned_next_tokens(sequences, token_ids, num_prompt_tokens):
        row[token_id] = NEG_INF
    if len(token_ids) - num_prompt_tokens < params.min_tokens:
        for token_id in set(params.stop_token_ids) | ({EOS} if not params.ignore_eos else set()):
            row[token_id] = NEG_INF
    return row


def test_each_steps_bias_equals_the_rule_for_every_row_forks_included():
    everything = _params(n=2, temperature=1.0, logit_bias={3: 1.5, 4: -2.0, 9: 0.25},
                         allowed_token_ids=list(range(1, 12)), bad_words=["c", "ab", "bab", "abd", "ba"],
                         min_tokens=3, stop_token_ids=[5])
    bad_words_only = _params(bad_words=["aa", "aab", "b"], ignore_eos=True)
    plain = _params()
    batch = InputBatch(torch.device("cpu"))
    prompt = [1, 2, 1]  # a bad word's prefix in the prompt does not count
    batch.apply(StepMessage([], new_seqs=[NewSequence(0, list(prompt), 3, everything),
                                          NewSequence(1, list(prompt), 3, bad_words_only),
                                          NewSequence(2, list(prompt), 3, plain)]))
    batch.apply(StepMessage([], new_seqs=[NewSequence(3, list(prompt), 3, everything, index=1, fork_parent=0)]))
    states = [batch.states[seq_id] for seq_id in (0, 3, 1, 2)]
    assert states[0].constraints is states[1].constraints  # a fork shares its request's device data
    assert states[3].constraints is None
    params = [everything, everything, bad_words_only, plain]
    rng = random.Random(0)
    for step in range(40):
        rows = [states[0], states[0], states[1], states[2], states[3]]  # row 1: a second sample of seq 0
        row_params = [params[0], params[0], params[1], params[2], params[3]]
        bias = constraint_bias(rows, VOCAB, torch.device("cpu"))
        expected = torch.stack([_reference_row(p, s.token_ids, s.num_prompt_tokens) for s, p in zip(rows, row_params)])
        assert torch.equal(bias, expected), f"step {step}"
        for state in states:
            state.token_ids.append(rng.choice([1, 2, 3, 4, 1, 2]))


def test_a_batch_without_constraints_gets_no_bias():
    batch = InputBatch(torch.device("cpu"))
    batch.apply(StepMessage([], new_seqs=[NewSequence(0, [1, 2], 2, _params(min_tokens=2, ignore_eos=True))]))
    assert batch.states[0].constraints is None  # nothing to ban: min_tokens without stop or eos ids
    assert constraint_bias([batch.states[0]], VOCAB, torch.device("cpu")) is None


def test_device_data_is_built_once_per_request_however_many_rows_and_steps(monkeypatch):
    built = []
    real = constraint_rows._fixed_bias
    monkeypatch.setattr(constraint_rows, "_fixed_bias", lambda *args: built.append(1) or real(*args))
    params = _params(n=4, temperature=1.0, logit_bias={t: 0.5 for t in range(VOCAB)}, bad_words=["ab"])
    batch = InputBatch(torch.device("cpu"))
    batch.apply(StepMessage([ScheduledSequence(0, 0, 2, [0], num_samples=4)],
                            new_seqs=[NewSequence(0, [7, 8], 2, params)]))
    batch.apply(StepMessage([], new_seqs=[NewSequence(i, [7, 8], 2, params, index=i, fork_parent=0)
                                          for i in (1, 2, 3)]))
    rows = [batch.states[i] for i in range(4)]
    for _ in range(10):
        constraint_bias(rows, VOCAB, torch.device("cpu"))
        for state in rows:
            state.token_ids.append(1)
    assert built == [1]


@settings(max_examples=200, deadline=None)
@given(words=st.lists(st.lists(st.integers(1, 4), min_size=2, max_size=5), min_size=1, max_size=8),
       output=st.lists(st.integers(1, 4), max_size=30))
def test_the_automaton_bans_what_the_rule_bans_after_every_token(words, output):
    automaton = BadWordAutomaton(words)
    prompt = [1, 2, 3, 4]
    node = BadWordAutomaton.ROOT
    for length in range(len(output) + 1):
        token_ids = prompt + output[:length]
        assert automaton.banned(node) == sorted(set(banned_next_tokens(words, token_ids, len(prompt))))
        if length < len(output):
            node = automaton.next(node, output[length])
