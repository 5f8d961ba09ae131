"""Whole-step CUDA graphs of uniform verify steps (runner/verify_graphs.py, ASYNCSERVE_VERIFY_GRAPHS=1): greedy
output stays token-exact with speculation off (fp32 tiny models), for n-gram drafts (uniform only where every
sequence proposes K) and a draft model (always K), and the verify steps that are uniform replay the graphs."""
from __future__ import annotations

import pytest

from tests.conftest import PROMPTS
from tests.spec_decode.conftest import speculate_at_every_step  # noqa: F401 (autouse: speculate at every step)
from tests.spec_decode.helpers import NGRAM, OracleProposer, counters, draft_model_config, generate_ids
from tests.gpu.test_spec_decode_cuda import STAGGERED

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def verify_graphs_on(monkeypatch):
    from asyncserve.runner import cuda_runner
    monkeypatch.setattr(cuda_runner, "VERIFY_GRAPHS", True)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_always_right_drafts_replay_the_verify_graphs_token_exactly(family, make_cuda_llm):
    plain = make_cuda_llm(family, dtype="float32")
    expected = generate_ids(plain, PROMPTS, STAGGERED)
    full = [list(o.prompt_token_ids) + list(o.outputs[0].token_ids)
            for o in plain.generate(PROMPTS, STAGGERED, use_tqdm=False)]
    llm = make_cuda_llm(family, dtype="float32", speculative_config=NGRAM)
    runner = llm.llm_engine.executor.runner
    assert runner.verify_graphs is not None and runner.verify_graphs.query_len == NGRAM["num_speculative_tokens"] + 1
    llm.llm_engine.speculator.proposer = OracleProposer(full)
    assert generate_ids(llm, PROMPTS, STAGGERED) == expected
    assert runner.verify_graphs.num_replays > 0
    stats = counters(llm.llm_engine)
    assert stats["spec_decode_num_accepted_tokens"] == stats["spec_decode_num_draft_tokens"] > 0


def test_a_draft_model_verifies_through_the_graphs(make_cuda_llm, tiny_model_dir):
    expected = generate_ids(make_cuda_llm("llama", dtype="float32"), PROMPTS, STAGGERED)
    llm = make_cuda_llm("llama", dtype="float32",
                        speculative_config=draft_model_config(tiny_model_dir("llama"), 4))
    assert generate_ids(llm, PROMPTS, STAGGERED) == expected
    assert llm.llm_engine.executor.runner.verify_graphs.num_replays > 0
