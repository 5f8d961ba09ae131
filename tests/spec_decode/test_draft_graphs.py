"""The drafters' per-position decode forwards through the static buffers their CUDA graphs read: batch sizes,
padding rows that write no KV and change no real row, greedy output token-exact with speculation off. On
the CPU nothing is captured and `DraftDecodeGraphs.run` computes live what a replay would; tests/gpu
replays the captures."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from asyncserve import SamplingParams
from asyncserve.runner.capture_guard import HostCopyInCapture, capture_check, no_host_copies
from asyncserve.runner.draft_decode import DraftDecodeGraphs, draft_graph_sizes
from asyncserve.runner.draft_inputs import decode_columns
from tests.conftest import PROMPTS
from tests.spec_decode.eagle3_heads import eagle3_config, random_head
from tests.spec_decode.helpers import (
    counters,
    draft_model_config,
    generate_ids,
    record_proposals,
)

# Sequences end one after another: 6, 5, ... 1 of them speculate.
STAGGERED = [SamplingParams(temperature=0.0, max_tokens=8 + 5 * index, ignore_eos=True) for index in range(6)]
METHODS = ["draft_model", "eagle3"]


@pytest.fixture(scope="module")
def llama_head(tiny_model_dir, tmp_path_factory) -> str:
    return random_head(tmp_path_factory.mktemp("eagle3") / "llama", tiny_model_dir("llama"))


@pytest.fixture
def spec_llm(make_llm, tiny_model_dir, llama_head):
    """method -> an fp32 CPU engine over the tiny llama speculating with it (the draft model: the target
    itself, so every draft is accepted; the head: random, mostly rejected)."""
    def make(method: str, **kwargs):
        config = (draft_model_config(tiny_model_dir("llama"), 4) if method == "draft_model"
                  else eagle3_config(llama_head, 4))
        return make_llm("llama", dtype="float32", speculative_config=config, **kwargs)
    return make


def _live_graphs(drafter, sizes: list[int]) -> DraftDecodeGraphs:
    """Buffers as the GPU runner makes them, with sizes but no capture: `run` goes through them live."""
    graphs = DraftDecodeGraphs(drafter, sizes[-1])
    graphs.sizes = sizes
    drafter.decode_graphs = graphs
    return graphs


def test_sizes_are_the_decode_graphs_up_to_the_most_sequences_that_speculate():
    def sizes(max_num_seqs, disable_by_batch_size):
        return draft_graph_sizes(SimpleNamespace(scheduler=SimpleNamespace(max_num_seqs=max_num_seqs),
                                                 speculative=SimpleNamespace(
                                                     disable_by_batch_size=disable_by_batch_size)))
    assert sizes(256, 16) == [1, 2, 4, 8, 16]
    assert sizes(4, 16) == [1, 2, 4]
    assert sizes(256, 20) == [1, 2, 4, 8, 16, 20]


def test_a_batch_takes_the_smallest_size_that_holds_it_and_none_above_the_largest(spec_llm):
    graphs = _live_graphs(spec_llm("draft_model").llm_engine.executor.runner.drafter, [1, 2, 4, 8])
    assert [graphs.padded_size(count) for count in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]


def _column(drafter, last_positions, num_drafts, tables):
    """Column 1's inputs, as `propose_columns` derives them on the device."""
    _, positions, meta = next(decode_columns(last_positions, num_drafts, tables, drafter.config.cache.block_size,
                                             drafter.device))
    return positions, meta


@pytest.mark.parametrize("method", METHODS)
def test_padding_rows_write_no_kv_and_leave_the_real_rows_alone(method, spec_llm):
    """Three rows padded to 8 over stale buffers (tokens, positions, block tables, hidden states of an
    earlier step): only the real rows' slots are written, and their tokens (and the head's hidden states)
    are what the unpadded eager forward gives, in fp32."""
    drafter = spec_llm(method).llm_engine.executor.runner.drafter
    graphs = _live_graphs(drafter, [1, 2, 4, 8])
    graphs.inputs.input_ids.fill_(7)
    graphs.inputs.positions.fill_(40)
    graphs.inputs.block_tables.fill_(5)
    if graphs.hidden is not None:
        graphs.hidden.normal_()
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (3,))
    hidden = torch.randn(3, graphs.hidden.shape[1]) if graphs.hidden is not None else None
    # Rows at positions 4, 9, 2 (+1) in blocks 1, 2, 3; the last row has one draft: no KV at this column.
    positions, meta = _column(drafter, [4, 9, 2], [3, 2, 1], [[1], [2], [3]])
    assert meta.slot_mapping.tolist() == [16 + 5, 32 + 10, -1]
    k_cache = drafter.model.attention_layers()[0].kv_cache[0]
    k_cache.zero_()
    with torch.inference_mode():
        padded_tokens, padded_hidden = graphs.run(tokens, positions, meta, hidden, 8)
    written = k_cache.reshape(-1, *k_cache.shape[2:]).abs().sum(dim=(1, 2)) != 0
    assert written.nonzero().flatten().tolist() == [21, 42]
    assert graphs.inputs.slot_mapping[3:8].eq(-1).all() and graphs.inputs.seq_lens[3:8].eq(1).all()
    k_cache.zero_()
    with torch.inference_mode():
        eager_tokens, eager_hidden = drafter.decode_step(tokens, positions, meta, hidden)
    assert padded_tokens.tolist() == eager_tokens.tolist()
    if method == "eagle3":  # up to float32 reassociation: an 8-row product may block its sums otherwise
        torch.testing.assert_close(padded_hidden, eager_hidden, rtol=1e-4, atol=1e-5)
    else:
        assert padded_hidden is None and eager_hidden is None
    assert graphs.num_runs == 1


@pytest.mark.parametrize("method", METHODS)
def test_greedy_through_the_padded_buffers_is_token_exact_with_speculation_off(method, spec_llm, make_llm):
    """Output equals plain decoding's, and every proposal equals the eager drafter's (output alone would not
    show wrong proposals: verification keeps greedy output exact whatever they are)."""
    expected = generate_ids(make_llm("llama", dtype="float32"), PROMPTS, STAGGERED)
    eager_llm = spec_llm(method)
    eager_proposals = record_proposals(eager_llm.llm_engine.executor.runner.drafter)
    assert generate_ids(eager_llm, PROMPTS, STAGGERED) == expected
    llm = spec_llm(method)
    drafter = llm.llm_engine.executor.runner.drafter
    graphs = _live_graphs(drafter, [1, 2, 4, 8])
    padded = []
    run = graphs.run

    def recording_run(input_ids, positions, meta, hidden, size):
        padded.append(size > input_ids.shape[0])
        return run(input_ids, positions, meta, hidden, size)

    graphs.run = recording_run
    eager = _count_eager_steps(drafter)
    proposals = record_proposals(drafter)
    assert generate_ids(llm, PROMPTS, STAGGERED) == expected
    assert proposals == eager_proposals
    assert graphs.num_runs > 0 and eager == []  # every decode forward went through the buffers
    assert any(padded) and not all(padded)  # 3, 5 and 6 rows pad to 4 and 8
    if method == "draft_model":  # the target as its own draft: the buffers' proposals are all accepted
        stats = counters(llm.llm_engine)
        assert stats["spec_decode_num_accepted_tokens"] == stats["spec_decode_num_draft_tokens"] > 0


def _count_eager_steps(drafter) -> list[int]:
    """Rows of each decode forward that runs eagerly (after `_live_graphs`, whose buffers call the step
    they were built with)."""
    rows, step = [], drafter.decode_step

    def counting_step(input_ids, positions, meta, hidden):
        rows.append(input_ids.shape[0])
        return step(input_ids, positions, meta, hidden)

    drafter.decode_step = counting_step
    return rows


@pytest.mark.parametrize("method", METHODS)
def test_more_speculating_sequences_than_the_largest_size_run_eagerly(method, spec_llm, make_llm):
    expected = generate_ids(make_llm("llama", dtype="float32"), PROMPTS, STAGGERED)
    llm = spec_llm(method)
    drafter = llm.llm_engine.executor.runner.drafter
    graphs = _live_graphs(drafter, [1, 2])
    eager = _count_eager_steps(drafter)
    assert generate_ids(llm, PROMPTS, STAGGERED) == expected
    assert graphs.num_runs > 0 and eager and min(eager) > 2  # 3 .. 6 rows: eager; 2 and 1: the buffers


def test_the_capture_guard_names_host_data_and_host_copies():
    on_device = torch.zeros(3, device="meta")
    for make in (lambda: torch.tensor([1, 2, 3]), lambda: torch.ones(3).to("meta"),
                 lambda: on_device.copy_(torch.ones(3))):
        with pytest.raises(HostCopyInCapture, match="decode graph"), no_host_copies("capturing the decode graph"):
            make()
    with no_host_copies("capturing"):  # device work, host work and scalars pass
        (on_device + torch.tensor(2.0)).argmax()
        torch.arange(4).sum()


def test_the_guard_runs_around_captures_only_where_switched_on(monkeypatch):
    monkeypatch.delenv("ASYNCSERVE_CHECK_CAPTURES", raising=False)
    with capture_check("capturing"):
        torch.tensor([1, 2, 3])  # a server's start-up never pays for the check, nor stops on it
    monkeypatch.setenv("ASYNCSERVE_CHECK_CAPTURES", "1")
    with pytest.raises(HostCopyInCapture), capture_check("capturing"):
        torch.tensor([1, 2, 3])


@pytest.mark.parametrize("method", METHODS)
def test_the_drafters_decode_forwards_build_nothing_from_host_data(method, spec_llm):
    """What the GPU runner captures, run twice first as the capture does, then under the guard: no table
    built from Python data inside the forward (an lru_cache that misses during capture would)."""
    drafter = spec_llm(method).llm_engine.executor.runner.drafter
    graphs = _live_graphs(drafter, [1, 2, 4])
    with torch.inference_mode():
        for _ in range(2):
            graphs._forward(4)
        with no_host_copies("the drafter's decode forward"):
            graphs._forward(4)
