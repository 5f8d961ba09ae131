"""Speculative decoding with structured outputs: n-gram drafts are cut at the first token the grammar rejects;
a verify step masks each (sequence, draft position) row by the grammar after the drafts before it, and a
draft model's or EAGLE-3 head's proposals, read back from the device, are rejected where the grammar rejects
them. Greedy output is token-exact with plain decoding, in batches that mix constrained and unconstrained
requests; sampled output keeps the constrained distribution; every output satisfies its grammar; the
matchers end each step where the accepted tokens put them."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from asyncserve import SamplingParams, StructuredOutputsParams
from tests.conftest import PROMPTS
from tests.spec_decode.eagle3_heads import constant_head, eagle3_config, random_head
from tests.spec_decode.helpers import (
    NGRAM,
    OracleProposer,
    counters,
    draft_model_config,
    full_sequences,
    generate_ids,
    two_sample_chi_square,
)
from tests.spec_decode.test_spec_greedy_exact import REPEATING

FAMILY = "qwen3"
BACKENDS = ["xgrammar", "guidance"]
# Arrays of "ab" / "ab ab": the tiny model repeats itself inside them, so prompt lookup proposes.
SCHEMA = {"type": "object",
          "properties": {"a": {"type": "array", "items": {"enum": ["ab", "ab ab"]}, "minItems": 6, "maxItems": 8}},
          "required": ["a"], "additionalProperties": False}
JSON = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
REGEX = r"(ab ){2,8}[0-9]{2}"
CONSTRAINTS = [JSON, StructuredOutputsParams(regex=REGEX), StructuredOutputsParams(choice=["ab ab ab", "no"])]


def _greedy(constraint=None, max_tokens: int = 120, **extra) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, structured_outputs=constraint, **extra)


def _assert_satisfies(text: str, constraint: StructuredOutputsParams) -> None:
    if constraint.json is not None:
        jsonschema.validate(json.loads(text), constraint.json)
    elif constraint.regex is not None:
        assert re.fullmatch(constraint.regex, text), text
    else:
        assert text in constraint.choice, text


def _texts(llm, prompts, params) -> list[str]:
    return [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]


class GrammarBreakingProposer(OracleProposer):
    """The true next token, then tokens outside every constraint here ('{' never follows a first token
    of theirs inside it, 'Z' never does): only the first draft can be kept."""

    def __init__(self, expected, bad_token: int, num_tokens: int = 4):
        super().__init__(expected, num_tokens, strict=False)
        self.bad_token = bad_token

    def propose(self, history, token_ids, max_tokens):
        following = self.continuation(token_ids)[:1]
        return (following + [self.bad_token] * 3)[:min(self.num_tokens, max_tokens)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ngram_greedy_under_grammars_is_token_exact_with_drafts_kept(backend, make_llm):
    prompts = REPEATING[:3]
    params = [_greedy(c) for c in CONSTRAINTS]
    expected = generate_ids(make_llm(FAMILY, structured_outputs_backend=backend), prompts, params)
    llm = make_llm(FAMILY, speculative_config=NGRAM, structured_outputs_backend=backend)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected
    for output, constraint in zip(outputs, CONSTRAINTS):
        _assert_satisfies(output.outputs[0].text, constraint)
        assert output.outputs[0].finish_reason == "stop"
    stats = counters(llm.llm_engine)
    assert stats["spec_decode_num_accepted_tokens"] > 20, stats


@pytest.mark.parametrize("backend", BACKENDS)
def test_drafts_the_grammar_rejects_are_cut_before_the_verify_step(backend, make_llm):
    """Each step proposes the right token and three the grammar rejects: only the first is scored (and
    kept), and the output is plain decoding's."""
    prompts, params = REPEATING[:2], [_greedy(JSON), _greedy(StructuredOutputsParams(regex=REGEX))]
    plain = make_llm(FAMILY, structured_outputs_backend=backend)
    expected = full_sequences(plain, prompts, params)
    llm = make_llm(FAMILY, speculative_config=NGRAM, structured_outputs_backend=backend)
    bad = llm.llm_engine.tokenizer.encode("Z")[0]
    llm.llm_engine.speculator.proposer = GrammarBreakingProposer(expected, bad)
    assert full_sequences(llm, prompts, params) == expected
    stats = counters(llm.llm_engine)
    assert stats["spec_decode_num_drafts"] > 10
    assert stats["spec_decode_num_draft_tokens"] == stats["spec_decode_num_drafts"]  # cut to one each
    assert stats["spec_decode_num_accepted_tokens"] == stats["spec_decode_num_draft_tokens"]


def test_a_batch_mixing_constrained_and_unconstrained_requests_is_token_exact(make_llm):
    """Greedy constrained and unconstrained requests verify drafts in the same steps, beside a seeded
    constrained n = 2 request (whose forks sample plainly, each under its own matcher)."""
    prompts = REPEATING[:5] + [PROMPTS[0]]
    params = [_greedy(JSON), _greedy(None, 40, frequency_penalty=-1.0), _greedy(StructuredOutputsParams(regex=REGEX)),
              _greedy(None, 40), _greedy(CONSTRAINTS[2]),
              SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=40, structured_outputs=JSON)]

    def run(llm):
        return [[list(c.token_ids) for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]

    expected = run(make_llm(FAMILY))
    llm = make_llm(FAMILY, speculative_config=NGRAM)
    assert run(llm) == expected
    stats = counters(llm.llm_engine)
    assert stats["spec_decode_num_accepted_tokens"] > 20, stats


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_draft_model_that_ignores_the_grammar_is_rejected_and_exact(backend, make_llm, tiny_model_dir):
    """The target as its own draft proposes its unconstrained argmax, which the grammar mostly forbids: the
    verify rows' masks reject those proposals, and the output is plain decoding's."""
    prompts, params = REPEATING[:3], [_greedy(c) for c in CONSTRAINTS]
    expected = generate_ids(make_llm(FAMILY, structured_outputs_backend=backend), prompts, params)
    llm = make_llm(FAMILY, speculative_config=draft_model_config(tiny_model_dir(FAMILY)),
                   structured_outputs_backend=backend)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected
    for output, constraint in zip(outputs, CONSTRAINTS):
        _assert_satisfies(output.outputs[0].text, constraint)
    stats = counters(llm.llm_engine)
    assert stats["spec_decode_num_draft_tokens"] > 50
    assert stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_draft_model_proposals_are_kept_while_the_grammar_allows_them(backend, make_llm, tiny_model_dir):
    """A grammar that allows the target's own greedy text for 3 tokens, then forces "ZZ": the target as its
    own draft has its first two proposals kept and the third (which the target itself would pick
    unconstrained) rejected in the same verify step. That takes each verify row's mask computed through
    the proposals read back from the device: a row masked after the wrong prefix would let it through."""
    plain = make_llm(FAMILY, structured_outputs_backend=backend)
    prompts = REPEATING[5:]  # its first tokens decode to ASCII: 'ys stos stososos st st st st'
    free = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    text = _texts(plain, prompts, free)[0]
    assert text.isascii() and text.isprintable()
    constraint = StructuredOutputsParams(choice=[text + "ZZ", "no"])
    expected = generate_ids(plain, prompts, _greedy(constraint))
    assert expected[0][:3] == generate_ids(plain, prompts, free)[0]
    llm = make_llm(FAMILY, speculative_config=draft_model_config(tiny_model_dir(FAMILY)),
                   structured_outputs_backend=backend)
    outputs = llm.generate(prompts, _greedy(constraint), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected
    assert outputs[0].outputs[0].text == text + "ZZ"
    stats = counters(llm.llm_engine)
    assert stats["spec_decode_num_accepted_tokens_per_pos"][:3] == [1, 1, 0], stats
    assert stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"], stats


def test_eagle3_heads_under_grammars_are_token_exact(make_llm, tiny_model_dir, tmp_path):
    """A random head, and one that always proposes a token the grammars forbid."""
    prompts, params = REPEATING[:3], [_greedy(c) for c in CONSTRAINTS]
    expected = generate_ids(make_llm(FAMILY), prompts, params)
    target = tiny_model_dir(FAMILY)
    bad = make_llm(FAMILY).llm_engine.tokenizer.encode("Z")[0]
    for head in (random_head(tmp_path / "random", target), constant_head(tmp_path / "constant", target, bad)):
        llm = make_llm(FAMILY, speculative_config=eagle3_config(head, 3))
        assert generate_ids(llm, prompts, params) == expected
        assert counters(llm.llm_engine)["spec_decode_num_draft_tokens"] > 50


def test_sampled_constrained_tokens_keep_the_constrained_distribution(make_llm):
    """Many unseeded samples of three tokens under a grammar, with drafts along the greedy constrained path
    and without: a two-sample chi-square test of their joint distribution. top_k=2 applies after the
    mask, so each position has two allowed tokens; the verify rule must accept a draft with its masked
    probability (>= 1/2), not its unmasked one."""
    constraint = StructuredOutputsParams(regex=r"[a-d]{1,3}( [a-d]{1,3}){3}")
    params = SamplingParams(temperature=1.0, top_k=2, max_tokens=3, structured_outputs=constraint)
    prompts = [PROMPTS[1]] * 500
    plain = make_llm(FAMILY, max_num_seqs=512)
    greedy_path = full_sequences(plain, prompts[:1], SamplingParams(temperature=0.0, max_tokens=3,
                                                                    structured_outputs=constraint))
    torch.manual_seed(0)
    expected = [tuple(t) for t in generate_ids(plain, prompts, params)]
    llm = make_llm(FAMILY, max_num_seqs=512,
                   speculative_config={**NGRAM, "num_speculative_tokens": 2, "disable_by_batch_size": 1024})
    llm.llm_engine.speculator.proposer = OracleProposer(greedy_path, num_tokens=2, strict=False)
    torch.manual_seed(1)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    speculative = [tuple(o.outputs[0].token_ids) for o in outputs]
    statistic, degrees = two_sample_chi_square(expected, speculative)
    assert degrees <= 7
    # P(chi2(7) > 30) < 1e-4: a right rule fails about once in 10,000 runs (the seeds fix this run).
    assert statistic < 30, (statistic, degrees)
    stats = counters(llm.llm_engine)
    assert 0 < stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"], stats
    prefix = re.compile(r"[a-d]{1,3}( [a-d]{0,3}){0,3}|[a-d]{1,3}( [a-d]{1,3}){0,3} ?")
    assert all(prefix.fullmatch(o.outputs[0].text) for o in outputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_masks_follow_the_drafts_and_leave_the_matcher_where_it_was(backend, make_llm):
    """Row j of a matcher's rows is the mask after drafts [0, j); rows past a rejected draft allow
    everything; an empty draft list is one plain row; the matchers end where they began."""
    engine = make_llm(FAMILY, structured_outputs_backend=backend).llm_engine
    manager, tokenizer = engine.structured, engine.tokenizer
    grammar = manager.compile(StructuredOutputsParams(regex=REGEX))
    tokens = tokenizer.encode("ab ab ab 12")
    bad = tokenizer.encode("Z")[0]
    first, second = manager.new_matcher(grammar), manager.new_matcher(grammar)
    assert first.accept_token(tokens[0])
    drafts = [tokens[1:4] + [bad, tokens[4]], []]
    rows = manager.bitmask_through_drafts([first, second], drafts).clone()
    assert rows.shape[0] == 6 + 1

    def mask_after(prefix: list[int]) -> torch.Tensor:
        matcher = manager.new_matcher(grammar)
        for token_id in prefix:
            assert matcher.accept_token(token_id)
        return manager.bitmask([matcher])[0].clone()

    for j in range(4):
        assert torch.equal(rows[j], mask_after(tokens[:1 + j]))
    assert not rows[3, bad // 32] >> (bad % 32) & 1  # the bad draft's own row forbids it
    assert (rows[4:6] == -1).all()
    assert torch.equal(rows[6], mask_after([]))
    now = manager.bitmask([first, second]).clone()
    assert torch.equal(now, torch.stack([mask_after(tokens[:1]), mask_after([])]))
    assert manager.num_valid_drafts(first, drafts[0]) == 3
    assert torch.equal(manager.bitmask([first])[0], mask_after(tokens[:1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stop_token_among_the_drafts_ends_the_valid_ones(backend, make_llm):
    """After a stop token the grammar accepts, nothing more is valid, and its row past it allows everything
    (the output ends at the stop token)."""
    engine = make_llm(FAMILY, structured_outputs_backend=backend).llm_engine
    manager = engine.structured
    grammar = manager.compile(StructuredOutputsParams(choice=["ab"]))
    ab = engine.tokenizer.encode("ab")
    eos = engine.tokenizer.eos_token_id
    matcher = manager.new_matcher(grammar)
    assert manager.num_valid_drafts(matcher, ab + [eos, ab[0]]) == len(ab) + 1
    rows = manager.bitmask_through_drafts([matcher], [ab + [eos, ab[0]]]).clone()
    assert rows[len(ab), eos // 32] >> (eos % 32) & 1
    assert (rows[len(ab) + 1:] == -1).all()
    assert not matcher.is_terminated()
    for token_id in ab:
        assert matcher.accept_token(token_id)
