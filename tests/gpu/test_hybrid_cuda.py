"""Hybrid models on CUDA (fla-core's kernels): decode steps replay CUDA graphs that gather and scatter each
row's recurrent state by slot, mixed steps run eagerly, and both give what the eager engine gives."""
from __future__ import annotations

import pytest

from asyncserve import SamplingParams
from asyncserve.testing.tiny_model import HYBRID_FAMILIES
from tests.conftest import PROMPTS

pytestmark = pytest.mark.gpu

MAX_NEW = 24


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_decode_graphs_with_state_slots_agree_with_eager(family, dtype, make_cuda_llm):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    graphs_llm = make_cuda_llm(family, dtype=dtype, max_num_batched_tokens=40)
    graphs = graphs_llm.generate(PROMPTS, params, use_tqdm=False)
    eager = make_cuda_llm(family, dtype=dtype, enforce_eager=True, max_num_batched_tokens=40).generate(
        PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in graphs] == [o.outputs[0].token_ids for o in eager]
    runner = graphs_llm.llm_engine.executor.runner
    assert runner.num_graph_steps > 0 and runner.mixed_graphs is None
    states = graphs_llm.llm_engine.kv_manager.states
    assert states.num_free == states.num_slots


def test_forks_on_cuda_match_lone_requests_with_their_seeds(make_cuda_llm):
    llm = make_cuda_llm("qwen3_next", dtype="float32")
    prompt = PROMPTS[5]
    forked = llm.generate(prompt, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True),
                          use_tqdm=False)[0]
    alone = [llm.generate(prompt, SamplingParams(temperature=1.0, seed=5 + i, max_tokens=12, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids for i in range(3)]
    assert [c.token_ids for c in forked.outputs] == alone
