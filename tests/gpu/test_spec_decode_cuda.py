"""Speculative decoding on CUDA: the draft model's and the EAGLE-3 head's per-position decode forwards replay
the CUDA graphs captured at start-up, and greedy output stays token-exact with the eager engine and with
speculation off (fp32 tiny models); the proposals themselves equal the eager drafter's, and the verify step
replays the target's mixed-step graphs."""
from __future__ import annotations

import logging

import pytest

from asyncserve import SamplingParams
from tests.conftest import PROMPTS
from tests.spec_decode.eagle3_heads import eagle3_config, random_head
from tests.spec_decode.helpers import (
    counters,
    draft_model_config,
    generate_ids,
    record_proposals,
)

from tests.spec_decode.conftest import speculate_at_every_step  # noqa: F401 (autouse: proposals compared step by step)

pytestmark = pytest.mark.gpu

# Sequences end one after another: 6, 5, ... 1 of them speculate, so batches of 3, 5 and 6 pad.
STAGGERED = [SamplingParams(temperature=0.0, max_tokens=8 + 5 * index, ignore_eos=True) for index in range(6)]
METHODS = ["draft_model", "eagle3"]
LOG_NAMES = {"draft_model": "draft model", "eagle3": "EAGLE-3 head"}


@pytest.fixture(scope="module")
def llama_head(tiny_model_dir, tmp_path_factory) -> str:
    return random_head(tmp_path_factory.mktemp("eagle3") / "llama", tiny_model_dir("llama"))


def _spec_config(method: str, tiny_model_dir, head: str) -> dict:
    """The draft model: the target itself (every proposal accepted); the head: random (mostly rejected)."""
    return draft_model_config(tiny_model_dir("llama"), 4) if method == "draft_model" else eagle3_config(head, 4)


def _record_verify_graphs(runner) -> list[bool]:
    """Per verify step: whether its forward replayed the mixed-step graphs."""
    replayed, launch_verify = [], runner.launch_verify

    def recording(batch):
        before = runner.num_mixed_graph_steps
        pending = launch_verify(batch)
        replayed.append(runner.num_mixed_graph_steps > before)
        return pending

    runner.launch_verify = recording
    return replayed


@pytest.mark.parametrize("method", METHODS)
def test_draft_graphs_are_token_exact_with_eager_and_with_speculation_off(method, make_cuda_llm, tiny_model_dir,
                                                                         llama_head, caplog):
    config = _spec_config(method, tiny_model_dir, llama_head)
    expected = generate_ids(make_cuda_llm("llama", dtype="float32"), PROMPTS, STAGGERED)
    eager_llm = make_cuda_llm("llama", dtype="float32", enforce_eager=True, speculative_config=config)
    eager_drafter = eager_llm.llm_engine.executor.runner.drafter
    assert eager_drafter.decode_graphs is None
    eager_proposals = record_proposals(eager_drafter)
    assert generate_ids(eager_llm, PROMPTS, STAGGERED) == expected

    with caplog.at_level(logging.INFO, logger="asyncserve"):
        llm = make_cuda_llm("llama", dtype="float32", speculative_config=config)
    assert any(record.getMessage().startswith(f"captured CUDA graphs of the {LOG_NAMES[method]}'s decode forwards")
               for record in caplog.records)
    runner = llm.llm_engine.executor.runner
    graphs = runner.drafter.decode_graphs
    assert graphs.sizes == [1, 2, 4, 8, 16] and sorted(size for size, _ in graphs.inputs.graphs) == graphs.sizes
    proposals = record_proposals(runner.drafter)
    verify_replayed = _record_verify_graphs(runner)
    assert generate_ids(llm, PROMPTS, STAGGERED) == expected
    assert proposals == eager_proposals
    assert graphs.num_runs > 0  # every decode forward of a batch of at most 16 replays a graph
    assert verify_replayed and all(verify_replayed)
    stats = counters(llm.llm_engine)
    assert stats["spec_decode_num_draft_tokens"] > 0
    if method == "draft_model":  # the target as its own draft: the replayed proposals are all accepted
        assert stats["spec_decode_num_accepted_tokens"] == stats["spec_decode_num_draft_tokens"]


@pytest.mark.parametrize("method", METHODS)
def test_batches_above_the_largest_captured_size_run_eagerly_and_exactly(method, make_cuda_llm, tiny_model_dir,
                                                                        llama_head):
    config = _spec_config(method, tiny_model_dir, llama_head)
    expected = generate_ids(make_cuda_llm("llama", dtype="float32"), PROMPTS, STAGGERED)
    llm = make_cuda_llm("llama", dtype="float32", speculative_config=config)
    graphs = llm.llm_engine.executor.runner.drafter.decode_graphs
    graphs.sizes = [1, 2]  # the captures of 4 .. 16 stay unused: 3 .. 6 rows run eagerly
    assert generate_ids(llm, PROMPTS, STAGGERED) == expected
    assert graphs.num_runs > 0
