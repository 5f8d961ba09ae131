"""The speculation governor: it keeps speculating where speculative steps emit more tokens per second than
plain ones, stops where they emit fewer, per batch-size bucket, measures the slower kind again now and then,
and ignores intervals that a prompt chunk, a switch of kind or idle time would blur. In the engine its
choice never changes the tokens."""
from __future__ import annotations

import pytest

from asyncserve import SamplingParams
from asyncserve.config.speculative import parse_speculative_config
from asyncserve.engine.spec_decode.governor import (EXPLORE_AFTER, MAX_INTERVAL_S, MIN_SAMPLES, SpeculationGovernor,
                                                    batch_bucket)
from tests.conftest import PROMPTS
from tests.spec_decode.helpers import NGRAM, OracleProposer, counters, full_sequences


class SyntheticClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_steps(governor: SpeculationGovernor, clock: SyntheticClock, num_steps: int, num_seqs: int,
              seconds: dict[bool, float], tokens_per_seq: dict[bool, float]) -> list[bool]:
    """Steps as the engine drives them: ask, run (the clock moves by that kind's step time), record."""
    kinds = []
    for _ in range(num_steps):
        speculating = governor.wants(num_seqs)
        clock.now += seconds[speculating]
        governor.record(speculating, num_seqs, round(num_seqs * tokens_per_seq[speculating]), decode_only=True)
        kinds.append(speculating)
    return kinds


PLAIN_STEP = 0.010  # s


def wait_before_measuring_again(slower_rate: float, faster_rate: float) -> int:
    return next(steps for floor, steps in EXPLORE_AFTER if slower_rate / faster_rate >= floor)


@pytest.mark.parametrize(("spec_seconds", "spec_tokens", "keeps_speculating"), [
    (0.012, 3.5, True),    # drafts mostly right: 292 tokens/s per sequence against plain's 100
    (0.012, 1.1, False),   # drafts mostly wrong: 92 against 100, a close call
    (0.040, 3.0, False),   # a compute-bound batch: right drafts, but the verify step costs 4 plain steps
])
def test_it_keeps_the_kind_that_emits_more_tokens_per_second(spec_seconds, spec_tokens, keeps_speculating):
    clock = SyntheticClock()
    governor = SpeculationGovernor(clock)
    kinds = run_steps(governor, clock, 300, 8, {True: spec_seconds, False: PLAIN_STEP}, {True: spec_tokens, False: 1})
    # First speculative steps until their rate is known, then plain ones, then the faster kind, but for
    # MIN_SAMPLES + 1 steps of the slower kind each time the wait for its closeness has passed.
    assert kinds[:MIN_SAMPLES + 1] == [True] * (MIN_SAMPLES + 1)
    assert not any(kinds[MIN_SAMPLES + 1:2 * MIN_SAMPLES + 2])
    rest = kinds[2 * MIN_SAMPLES + 2:]
    spec_rate = round(8 * spec_tokens) / 8 / spec_seconds
    wait = wait_before_measuring_again(min(spec_rate, 1 / PLAIN_STEP), max(spec_rate, 1 / PLAIN_STEP))
    slower_steps = sum(kind != keeps_speculating for kind in rest)
    windows = len(rest) // (wait + MIN_SAMPLES + 1)
    assert rest[:wait - 1] == [keeps_speculating] * (wait - 1)
    assert windows * (MIN_SAMPLES + 1) - (MIN_SAMPLES + 1) <= slower_steps <= (windows + 1) * (MIN_SAMPLES + 1)
    assert slower_steps <= 0.21 * len(rest)
    plain_rate, measured_spec_rate = governor.rates()[batch_bucket(8)]
    assert plain_rate == pytest.approx(1 / PLAIN_STEP)
    assert measured_spec_rate == pytest.approx(spec_rate)


def test_a_close_call_is_checked_again_soon_and_follows_the_traffic():
    """n-gram lookup finds nothing while a reply starts (speculating steps a little slower than plain ones),
    then copies the prompt: speculation comes back within the short wait of a close call."""
    clock = SyntheticClock()
    governor = SpeculationGovernor(clock)
    steps = {True: 0.0105, False: PLAIN_STEP}
    kinds = run_steps(governor, clock, 40, 1, steps, {True: 1.0, False: 1})  # no drafts found: 95 against 100
    assert not kinds[-1]
    kinds = run_steps(governor, clock, 40, 1, steps, {True: 5.0, False: 1})  # every draft right
    wait = EXPLORE_AFTER[0][1]
    assert all(kinds[wait + MIN_SAMPLES + 1:])

def test_batch_sizes_decide_apart():
    clock = SyntheticClock()
    governor = SpeculationGovernor(clock)
    # Batch 1 reads weights: a verify step costs about a plain one. Batch 64 computes: it costs four.
    small = run_steps(governor, clock, 40, 1, {True: 0.011, False: PLAIN_STEP}, {True: 3.0, False: 1})
    large = run_steps(governor, clock, 40, 64, {True: 0.040, False: PLAIN_STEP}, {True: 3.0, False: 1})
    assert small[-1] and not large[-1]
    assert governor.wants(1) and not governor.wants(64)
    assert governor.wants(40) is False and governor.wants(2) is True  # 33..64 shares 64's bucket; 2 is new


def test_the_slower_kind_is_measured_again_and_wins_back_when_the_traffic_changes():
    clock = SyntheticClock()
    governor = SpeculationGovernor(clock)
    wrong = {True: 1.0, False: 1}  # drafts always rejected
    right = {True: 4.0, False: 1}  # then a workload the drafts copy
    steps = {True: 0.012, False: PLAIN_STEP}
    wait = wait_before_measuring_again(1.0 / 0.012, 1 / PLAIN_STEP)  # 83 against 100
    kinds = run_steps(governor, clock, 2 * MIN_SAMPLES + 2 + wait - 1, 4, steps, wrong)
    assert not any(kinds[2 * MIN_SAMPLES + 2:])
    kinds = run_steps(governor, clock, MIN_SAMPLES + 3, 4, steps, right)
    assert kinds[:MIN_SAMPLES + 1] == [True] * (MIN_SAMPLES + 1)  # the forgotten kind, timed afresh
    assert all(kinds[MIN_SAMPLES + 1:])  # and now kept


def test_blurred_intervals_do_not_count():
    clock = SyntheticClock()
    governor = SpeculationGovernor(clock)
    for speculating, decode_only, seconds in [(True, False, 0.01),   # a prompt chunk: no interval from it
                                              (True, True, 0.01),    # after a prompt chunk: not counted
                                              (False, True, 0.01),   # a switch of kind: not counted
                                              (False, True, MAX_INTERVAL_S + 1),  # idle in between
                                              (False, True, 0.01)]:  # the only clean interval
        clock.now += seconds
        governor.record(speculating, 4, 4, decode_only)
    assert governor.rates()[batch_bucket(4)] == (pytest.approx(100.0), 0.0)


def test_the_default_speculative_config_has_it_and_vllms_limit_stays(monkeypatch):
    monkeypatch.undo()  # the shipped default, not this folder's (conftest.py)
    assert parse_speculative_config(NGRAM).disable_when_slower is True
    assert parse_speculative_config(NGRAM).disable_by_batch_size is None
    config = parse_speculative_config({**NGRAM, "disable_when_slower": False, "disable_by_batch_size": 8})
    assert config.disable_when_slower is False and config.disable_by_batch_size == 8


class _StepCostGovernor(SpeculationGovernor):
    """The engine's governor on a synthetic clock: each applied step advances it by its kind's cost."""

    def __init__(self, seconds: dict[bool, float]):
        self.clock = SyntheticClock()
        self.seconds = seconds
        super().__init__(self.clock)

    def record(self, speculated, num_seqs, num_tokens, decode_only):
        self.clock.now += self.seconds[speculated]
        super().record(speculated, num_seqs, num_tokens, decode_only)


@pytest.mark.parametrize(("spec_seconds", "speculates_on"), [(0.001, True), (0.5, False)])
def test_in_the_engine_it_switches_speculation_without_changing_tokens(spec_seconds, speculates_on, make_llm):
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    expected = full_sequences(make_llm("qwen3"), PROMPTS, params)
    llm = make_llm("qwen3", speculative_config={**NGRAM, "disable_when_slower": True})
    speculator = llm.llm_engine.speculator
    speculator.proposer = OracleProposer(expected)  # drafts always right: the step costs decide
    speculator.governor = _StepCostGovernor({True: spec_seconds, False: 0.01})
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in outputs] == expected
    stats = counters(llm.llm_engine)
    plain_rate, spec_rate = speculator.governor.rates()[batch_bucket(len(PROMPTS))]
    assert (spec_rate > plain_rate) == speculates_on
    # Verify steps: one per 5 tokens while speculating throughout; only the first few when it stops.
    if speculates_on:
        assert stats["spec_decode_num_verify_steps"] >= 48 // 5 - 2 * MIN_SAMPLES
    else:
        assert stats["spec_decode_num_verify_steps"] <= MIN_SAMPLES + 2
    assert not speculator._launched  # every launched step was applied


def test_the_log_says_which_batch_sizes_speculate():
    clock = SyntheticClock()
    governor = SpeculationGovernor(clock)
    run_steps(governor, clock, 20, 1, {True: 0.011, False: PLAIN_STEP}, {True: 3.0, False: 1})
    run_steps(governor, clock, 20, 40, {True: 0.040, False: PLAIN_STEP}, {True: 3.0, False: 1})
    run_steps(governor, clock, 2, 3, {True: 0.011, False: PLAIN_STEP}, {True: 3.0, False: 1})
    assert governor.summary() == ("speculation by batch size: 1 on (2.73x), 3-4 measuring, "
                                  "33-64 off (0.75x)")


def test_a_pipelined_step_applied_early_does_not_count_as_a_step(make_llm):
    """Time passes only while the executor runs a step (as on a GPU), and the engine applies the plain step
    it just launched as soon as the governor asks to speculate again: that step's interval is not a step's
    and must not make plain decoding look infinitely fast. Drafts always right, a verify step costing 1.2
    plain steps: the governor keeps speculating."""
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    expected = full_sequences(make_llm("qwen3"), PROMPTS[:1], params)
    llm = make_llm("qwen3", speculative_config={**NGRAM, "disable_when_slower": True})
    engine = llm.llm_engine
    speculator = engine.speculator
    speculator.proposer = OracleProposer(expected)
    clock = SyntheticClock()
    speculator.governor = SpeculationGovernor(clock)
    launch = engine.executor.launch

    def timed_launch(message):
        clock.now += 0.012 if speculator._launched[-1] else 0.010
        return launch(message)

    engine.executor.launch = timed_launch
    record = speculator.governor.record

    def host_work_then_record(*args):
        clock.now += 0.0005  # applying a step takes the host a little time
        record(*args)

    speculator.governor.record = host_work_then_record
    outputs = llm.generate(PROMPTS[:1], params, use_tqdm=False)
    assert [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in outputs] == expected
    plain_rate, spec_rate = speculator.governor.rates()[batch_bucket(1)]
    assert plain_rate == pytest.approx(100.0, rel=0.1)
    assert spec_rate > 3 * plain_rate and speculator.governor.wants(1)
