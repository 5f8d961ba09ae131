"""The step message crosses a process boundary: pickled both ways, the engine produces the same tokens."""
from __future__ import annotations

import pickle

from asyncserve import SamplingParams, StructuredOutputsParams
from asyncserve.executor.base import Executor
from asyncserve.runner.step import StepMessage

from tests.conftest import PROMPTS, assert_pool_clean


class PicklingExecutor(Executor):
    """Wraps the in-process executor; every message and output goes through pickle, as to a worker."""

    def __init__(self, inner):
        self.inner = inner
        self.messages: list[StepMessage] = []
        self.num_bytes: list[int] = []

    def determine_num_blocks(self):
        return self.inner.determine_num_blocks()

    def initialize_cache(self, num_blocks, num_host_blocks):
        self.inner.initialize_cache(num_blocks, num_host_blocks)

    def bytes_per_block(self):
        return self.inner.bytes_per_block()

    def launch(self, message):
        data = pickle.dumps(message)
        self.num_bytes.append(len(data))
        received = pickle.loads(data)
        self.messages.append(received)
        return _PickledResult(self.inner.launch(received))

    def sample(self, pending, bitmask, rows):
        self.inner.sample(pending.pending, pickle.loads(pickle.dumps(bitmask)), pickle.loads(pickle.dumps(rows)))


class _PickledResult:
    def __init__(self, pending):
        self.pending = pending

    def done(self):
        return self.pending.done()

    @property
    def needs_grammar_masks(self):
        return self.pending.needs_grammar_masks

    @property
    def num_samples(self):
        return self.pending.num_samples

    @property
    def num_drafts(self):
        return self.pending.num_drafts

    def result(self):
        return pickle.loads(pickle.dumps(self.pending.result()))


def _workload():
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7, n=2, best_of=3, max_tokens=10)
    penalised = SamplingParams(temperature=0.8, seed=3, repetition_penalty=1.3, presence_penalty=0.5,
                               max_tokens=8, logprobs=2)
    constrained = SamplingParams(temperature=1.0, seed=5, max_tokens=10,
                                 structured_outputs=StructuredOutputsParams(regex="[a-z]{4,12}"))
    prompts = PROMPTS + PROMPTS[:2]
    params = [greedy, seeded, penalised, constrained] * 2
    return prompts, params[:len(prompts)]


def _run(llm):
    prompts, params = _workload()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in outputs]


def test_pickled_messages_give_the_same_tokens(make_llm):
    # A small pool with chunked prefill: preemption, copy-on-write forks and prefix hits all happen.
    settings = dict(num_gpu_blocks_override=34, max_model_len=272, max_num_batched_tokens=32, block_size=8)
    expected = _run(make_llm("llama", **settings))
    llm = make_llm("llama", **settings)
    engine = llm.llm_engine
    engine.executor = PicklingExecutor(engine.executor)
    assert _run(llm) == expected
    assert engine.scheduler.num_preemptions > 0
    assert any(m.block_copies for m in engine.executor.messages)
    assert_pool_clean(engine)


def test_decode_steps_send_only_diffs(make_llm):
    llm = make_llm("qwen3")
    engine = llm.llm_engine
    engine.executor = PicklingExecutor(engine.executor)
    prompt = " ".join(["many words in a long prompt"] * 20)
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    first, *decodes = engine.executor.messages
    assert len(first.new_seqs) == 1 and len(first.new_seqs[0].token_ids) > 100
    for message in decodes:  # one token and at most one new block each, never the prompt again
        (entry,) = message.seqs
        assert not message.new_seqs
        assert entry.num_new_tokens == 1
        assert len(entry.new_block_ids) <= 1 and not entry.replace_block_table
    assert max(engine.executor.num_bytes[1:]) < 500
    finished = [m.finished_seq_ids for m in engine.executor.messages if m.finished_seq_ids]
    assert finished == []  # the last step's finish travels with the next message, if any


def test_token_constraints_cross_the_process_boundary_once_and_give_the_same_tokens(make_llm):
    tokenizer = make_llm("qwen3").get_tokenizer()
    allowed = [7, 100, 300, 500]
    words = [tokenizer.decode([a, b]) for a in allowed for b in allowed][:6] + [tokenizer.decode([allowed[1]])]
    constrained = SamplingParams(temperature=1.0, seed=2, n=3, max_tokens=12, min_tokens=3, ignore_eos=True,
                                 logit_bias={7: 2.0, 500: -1.0}, allowed_token_ids=allowed, bad_words=words,
                                 stop_token_ids=[300])

    def run(llm):
        outputs = llm.generate(PROMPTS[:2], [constrained, SamplingParams(temperature=0.0, max_tokens=12)],
                               use_tqdm=False)
        return [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in outputs]

    expected = run(make_llm("qwen3"))
    llm = make_llm("qwen3")
    engine = llm.llm_engine
    engine.executor = PicklingExecutor(engine.executor)
    assert run(llm) == expected
    assert all(set(tokens) <= set(allowed) for tokens, _ in expected[0])
    announced = [new for message in engine.executor.messages for new in message.new_seqs
                 if new.params.token_constraints.bad_words is not None]
    assert len(announced) == 3  # the request's three samples, each announced once
