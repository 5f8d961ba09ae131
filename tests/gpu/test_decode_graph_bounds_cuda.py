"""Decode graphs of small batches come in two context bounds (runner/decode_graphs.py): steps whose
sequences all fit the short one replay the graph whose attention is one launch a layer; a step with a longer
sequence replays the other. Greedy tokens stay those of eager steps across the switch."""
from __future__ import annotations

import random

import pytest

from asyncserve import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def short_graphs_on(monkeypatch):
    """The switch this file exists to check before it is turned on by default (ASYNCSERVE_SHORT_CONTEXT_GRAPHS)."""
    from asyncserve.kernels import attention_decode
    from asyncserve.runner import decode_graphs
    monkeypatch.setattr(decode_graphs, "SHORT_CONTEXT_GRAPHS", True)
    monkeypatch.setattr(attention_decode, "LONG_SINGLE_PARTITION", True)  # the kernel's side of the switch

MAX_NEW = 40


def _prompts(vocab_size: int, lengths: list[int]) -> list[dict]:
    rng = random.Random(0)
    return [{"prompt_token_ids": [rng.randrange(3, vocab_size) for _ in range(length)]} for length in lengths]


@pytest.mark.parametrize("lengths", [[240], [30, 250, 120]], ids=["batch-1", "batch-3"])
def test_steps_cross_from_the_short_context_graph_to_the_long_one(lengths, make_cuda_llm):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    llm = make_cuda_llm("qwen2", dtype="float32")
    graphs = llm.llm_engine.executor.runner.decode_graphs
    padded = graphs.padded_size(len(lengths))
    short, long = graphs.bounds[padded]
    assert short < max(lengths) + MAX_NEW <= long
    replayed = []
    replay = graphs.replay
    graphs.replay = lambda key: (replayed.append(key), replay(key))
    prompts = _prompts(llm.llm_engine.model_config.vocab_size, lengths)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert (padded, short) in replayed and (padded, long) in replayed
    assert replayed.index((padded, long)) > replayed.index((padded, short))
    eager = make_cuda_llm("qwen2", dtype="float32", enforce_eager=True).generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in eager]


def test_large_batches_keep_one_graph(make_cuda_llm):
    from asyncserve.runner.decode_graphs import SHORT_CONTEXT_MAX_BATCH
    llm = make_cuda_llm("qwen2", dtype="bfloat16", max_num_seqs=SHORT_CONTEXT_MAX_BATCH + 8)
    graphs = llm.llm_engine.executor.runner.decode_graphs
    assert len(graphs.bounds[1]) == 2 and graphs.bounds[SHORT_CONTEXT_MAX_BATCH + 8] == [graphs.max_model_len]
