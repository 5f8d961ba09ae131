"""Proposers whose drafts are known to be right or wrong: either way the output is the target's; stop
conditions landing inside an accepted run cut it exactly where plain decoding stops; logprobs of accepted
tokens; seeded sampling repeats."""
from __future__ import annotations

import pytest

from asyncserve import SamplingParams
from tests.conftest import PROMPTS
from tests.spec_decode.helpers import NGRAM, OracleProposer, WrongProposer, counters, full_sequences

FAMILY = "qwen3"
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _spec_llm(make_llm, proposer_class, expected, **kwargs):
    llm = make_llm(FAMILY, speculative_config=NGRAM, **kwargs)
    llm.llm_engine.speculator.proposer = proposer_class(expected)
    return llm


def _outputs(llm, prompts, params):
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_always_right_drafts_are_all_accepted(family, make_llm):
    expected = full_sequences(make_llm(family), PROMPTS, GREEDY)
    llm = make_llm(family, speculative_config=NGRAM)
    llm.llm_engine.speculator.proposer = OracleProposer(expected)
    outputs = _outputs(llm, PROMPTS, GREEDY)
    assert [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == expected
    assert [len(o.token_ids) for o in outputs] == [24] * len(PROMPTS)
    stats = counters(llm.llm_engine)
    assert stats["spec_decode_num_draft_tokens"] > 0
    assert stats["spec_decode_num_accepted_tokens"] == stats["spec_decode_num_draft_tokens"]
    # Each verify of 4 drafts emits 5 tokens: 1 (prompt) + 5 + 5 + 5 + 5 + 3 (capped by max_tokens).
    assert stats["spec_decode_num_drafts"] == 2 * 5 * len(PROMPTS)  # two generate() calls
    assert stats["spec_decode_num_verify_steps"] == 2 * 5  # the prompts decode together


def test_always_wrong_drafts_are_all_rejected(make_llm):
    expected = full_sequences(make_llm(FAMILY), PROMPTS, GREEDY)
    llm = _spec_llm(make_llm, WrongProposer, expected)
    assert [list(o.prompt_token_ids) + list(o.outputs[0].token_ids)
            for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == expected
    stats = counters(llm.llm_engine)
    assert stats["spec_decode_num_draft_tokens"] > 0
    assert stats["spec_decode_num_accepted_tokens"] == 0
    llm.llm_engine.block_pool.check_invariants([])


class _IgnoresLimits(OracleProposer):
    """Right drafts, 4 every step, whatever max_tokens allows: the engine must still stop at the limit."""

    def propose(self, history, token_ids, max_tokens):
        return self.continuation(token_ids)[:4]


def test_max_tokens_inside_an_accepted_run(make_llm):
    long = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    expected = full_sequences(make_llm(FAMILY), PROMPTS, long)
    llm = _spec_llm(make_llm, _IgnoresLimits, expected)
    for max_tokens in (2, 4, 7):
        outputs = _outputs(llm, PROMPTS, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
        assert [list(o.token_ids) for o in outputs] == [
            full[len(full) - 30:len(full) - 30 + max_tokens] for full in expected]
        assert {o.finish_reason for o in outputs} == {"length"}
    assert counters(llm.llm_engine)["spec_decode_num_accepted_tokens"] > 0


def _compare_with_plain(make_llm, params):
    plain = _outputs(make_llm(FAMILY), PROMPTS, params)
    expected = full_sequences(make_llm(FAMILY), PROMPTS, GREEDY)
    llm = _spec_llm(make_llm, OracleProposer, expected)
    speculative = _outputs(llm, PROMPTS, params)
    for mine, theirs in zip(speculative, plain):
        assert (list(mine.token_ids), mine.text, mine.finish_reason, mine.stop_reason) == (
            list(theirs.token_ids), theirs.text, theirs.finish_reason, theirs.stop_reason)
    assert counters(llm.llm_engine)["spec_decode_num_accepted_tokens"] > 0
    return plain


def test_stop_token_inside_an_accepted_run(make_llm):
    expected = full_sequences(make_llm(FAMILY), PROMPTS[:1], GREEDY)[0]
    stop_id = expected[-24 + 3]  # the 4th output token: inside the first verified run
    plain = _compare_with_plain(make_llm, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                         stop_token_ids=[stop_id]))
    assert plain[0].finish_reason == "stop" and plain[0].stop_reason == stop_id


def test_stop_string_inside_an_accepted_run(make_llm):
    text = _outputs(make_llm(FAMILY), PROMPTS[:1], GREEDY)[0].text
    stop = text[len(text) // 3:len(text) // 3 + 3]
    assert stop.strip()
    plain = _compare_with_plain(make_llm, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                         stop=[stop]))
    assert plain[0].finish_reason == "stop" and plain[0].stop_reason == stop


def test_logprobs_of_accepted_tokens_match_plain_decoding(make_llm):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    plain = _outputs(make_llm(FAMILY), PROMPTS, params)
    expected = full_sequences(make_llm(FAMILY), PROMPTS, GREEDY)
    llm = _spec_llm(make_llm, OracleProposer, expected)
    speculative = _outputs(llm, PROMPTS, params)
    assert counters(llm.llm_engine)["spec_decode_num_accepted_tokens"] > 0
    for mine, theirs in zip(speculative, plain):
        assert list(mine.token_ids) == list(theirs.token_ids)
        assert len(mine.logprobs) == len(theirs.logprobs) == 12
        for position_mine, position_theirs in zip(mine.logprobs, theirs.logprobs):
            assert position_mine.keys() == position_theirs.keys()
            for token_id, entry in position_theirs.items():
                assert position_mine[token_id].logprob == pytest.approx(entry.logprob, abs=1e-4)
                assert position_mine[token_id].rank == entry.rank
        assert mine.cumulative_logprob == pytest.approx(theirs.cumulative_logprob, abs=1e-3)


def test_seeded_sampling_repeats(make_llm):
    params = [SamplingParams(temperature=0.3, top_p=0.9, max_tokens=24, seed=seed, ignore_eos=True)
              for seed in range(len(PROMPTS))]
    llm = make_llm(FAMILY, speculative_config=NGRAM)
    expected = full_sequences(make_llm(FAMILY), PROMPTS, GREEDY)
    # Drafts along the greedy path while a sample follows it: at a low temperature most are kept.
    llm.llm_engine.speculator.proposer = OracleProposer(expected, strict=False)
    first = [list(o.token_ids) for o in _outputs(llm, PROMPTS, params)]
    second = [list(o.token_ids) for o in _outputs(llm, PROMPTS, params)]
    assert first == second
    assert counters(llm.llm_engine)["spec_decode_num_accepted_tokens"] > 0


def test_samples_without_drafts_draw_as_plain_sampling(make_llm):
    """Seeded samples (n = 1, and an n = 2 request's forks) that get no drafts, in steps where greedy
    requests verify theirs, give the tokens plain decoding gives them: the verify rule draws nothing
    extra for rows without drafts."""
    sampled = [SamplingParams(temperature=0.9, max_tokens=16, seed=11, ignore_eos=True),
               SamplingParams(temperature=0.9, max_tokens=16, seed=12, n=2, ignore_eos=True)]
    prompts = PROMPTS[:2] + PROMPTS[2:4]
    params = sampled + [GREEDY, GREEDY]
    plain = [[list(c.token_ids) for c in o.outputs] for o in make_llm(FAMILY).generate(prompts, params,
                                                                                        use_tqdm=False)]
    greedy_paths = full_sequences(make_llm(FAMILY), PROMPTS[2:4], GREEDY)
    llm = make_llm(FAMILY, speculative_config=NGRAM)
    llm.llm_engine.speculator.proposer = OracleProposer(greedy_paths, strict=False)
    speculative = [[list(c.token_ids) for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert speculative == plain
    assert counters(llm.llm_engine)["spec_decode_num_accepted_tokens"] > 0


def test_blocks_of_rejected_drafts_go_back_at_once(make_llm):
    """Every draft rejected, 4 a step, blocks of 8 tokens: after each step a sequence holds no block past
    its tokens (the drafts' slots crossed into new blocks, which went back), ref counts stay right, and all
    blocks are free at the end (make_llm checks)."""
    expected = full_sequences(make_llm(FAMILY), PROMPTS, GREEDY)
    llm = _spec_llm(make_llm, WrongProposer, expected, block_size=8)
    engine = llm.llm_engine
    for index, prompt in enumerate(PROMPTS):
        engine.add_request(str(index), engine.input_processor.process(prompt, GREEDY))
    held_past_tokens = 0
    while engine.has_unfinished_requests():
        message, scheduled = engine.schedule()
        engine.process(scheduled, engine.executor.execute(message))
        engine.block_pool.check_invariants(engine.live_block_tables())
        for seq in engine.scheduler.running:
            held_past_tokens += len(seq.blocks) > -(-seq.num_tokens // 8)
    assert held_past_tokens == 0
    assert counters(engine)["spec_decode_num_draft_tokens"] > 50
    assert counters(engine)["spec_decode_num_accepted_tokens"] == 0


def test_prompt_logprobs_of_a_prompt_computed_beside_verifying_sequences(make_llm):
    """A prompt (with prompt_logprobs) joins while others verify drafts: the step mixes a prefill chunk and
    verify runs, and the prompt's logprobs are plain decoding's."""
    scored = SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=2)
    plain = make_llm(FAMILY).generate(PROMPTS[1:2], scored, use_tqdm=False)[0].prompt_logprobs
    expected = full_sequences(make_llm(FAMILY), PROMPTS[:2], GREEDY)
    llm = _spec_llm(make_llm, OracleProposer, expected)
    engine = llm.llm_engine
    engine.add_request("verifying", engine.input_processor.process(PROMPTS[0], GREEDY))
    outputs, mixed = {}, 0
    for step in range(40):
        if step == 2:
            engine.add_request("scored", engine.input_processor.process(PROMPTS[1], scored))
        message, scheduled = engine.schedule()
        if not scheduled:
            break
        mixed += any(entry.draft_token_ids for entry in message.seqs) and any(
            entry.prompt_logprobs for entry in message.seqs)
        outputs.update((o.request_id, o) for o in engine.process(scheduled, engine.executor.execute(message)))
    assert mixed
    mine = outputs["scored"].prompt_logprobs
    assert len(mine) == len(plain) and mine[0] is None
    for position_mine, position_plain in zip(mine[1:], plain[1:]):
        assert position_mine.keys() == position_plain.keys()
        for token_id, entry in position_plain.items():
            assert position_mine[token_id].logprob == pytest.approx(entry.logprob, abs=1e-4)


def test_beam_search_runs_beside_speculation(make_llm):
    from asyncserve.sampling_params import BeamSearchParams
    params = BeamSearchParams(beam_width=2, max_tokens=6, ignore_eos=True)
    plain = make_llm(FAMILY).beam_search(PROMPTS[:2], params)
    speculative = make_llm(FAMILY, speculative_config=NGRAM).beam_search(PROMPTS[:2], params)
    assert [[beam.tokens for beam in out.sequences] for out in speculative] == \
        [[beam.tokens for beam in out.sequences] for out in plain]
