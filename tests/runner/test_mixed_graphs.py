"""Mixed steps through the graph pieces' seams: fixed buffers, padding rows and attention between the
pieces compute what the plain forward does. On the CPU the pieces run live (no graphs); tests/gpu
replays them captured."""
from __future__ import annotations

import pytest
import torch

from asyncserve import SamplingParams
from asyncserve.layers.attention import AttentionMetadata
from asyncserve.runner.mixed_graphs import DEFAULT_MAX_MIXED_GRAPH_TOKENS, MixedStepGraphs, mixed_graph_sizes
from asyncserve.testing.tiny_model import FAMILIES
from tests.conftest import PROMPTS


def test_sizes_are_multiples_of_16_and_fine_where_padding_costs_most():
    sizes = mixed_graph_sizes(DEFAULT_MAX_MIXED_GRAPH_TOKENS)
    assert sizes[0] == 16 and sizes[-1] == DEFAULT_MAX_MIXED_GRAPH_TOKENS
    assert all(size % 16 == 0 for size in sizes) and sizes == sorted(set(sizes))
    # A padded row costs a row of every projection: at most 1/4 extra below 1,024 tokens, 1/8 above.
    for small, large in zip(sizes, sizes[1:]):
        assert large - small <= max(16, small // 4 if large <= 1024 else small // 8)
    assert mixed_graph_sizes(100)[-1] == 96 and mixed_graph_sizes(8) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_steps_through_the_seams_match_the_plain_forward(family, make_llm):
    """Chunked prompts next to running decodes (a 32-token budget), greedy, float32: token-exact."""
    llm = make_llm(family, dtype="float32", max_num_batched_tokens=32, max_num_seqs=4,
                   enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    plain = [out.outputs[0].token_ids for out in llm.generate(PROMPTS, params, use_tqdm=False)]
    runner = llm.llm_engine.executor.runner
    assert MixedStepGraphs.supports(runner.model)
    graphs = MixedStepGraphs(runner.model, runner.device, 32)
    graphs.sizes = mixed_graph_sizes(32)  # no capture on the CPU: `run` goes through the seams live
    runner.mixed_graphs = graphs
    seamed = [out.outputs[0].token_ids for out in llm.generate(PROMPTS, params, use_tqdm=False)]
    assert seamed == plain
    assert runner.num_mixed_graph_steps > 0


def test_padding_rows_write_no_kv_and_leave_the_step_rows_alone(make_llm):
    """A 5-token prefill padded to 16: the 11 padding rows see stale inputs, write no KV slot, and the
    5 real rows equal the plain forward's."""
    llm = make_llm("llama3", dtype="float32", enable_prefix_caching=False)
    runner = llm.llm_engine.executor.runner
    model = runner.model
    graphs = MixedStepGraphs(model, runner.device, 16)
    graphs.input_ids.fill_(7)      # stale inputs from an earlier step
    graphs.positions.fill_(900)
    layer = model.attention_layers()[0]
    k_cache = layer.kv_cache[0]
    k_cache.zero_()
    ids = torch.tensor([3, 9, 27, 81, 5])
    positions = torch.arange(5)
    slots = torch.arange(16, 21)  # block 1 of 16-token blocks
    ints = torch.tensor([5, 0, 5], dtype=torch.int32)
    meta = AttentionMetadata(slot_mapping=slots, block_tables=torch.tensor([[1]], dtype=torch.int32),
                             seq_lens=ints[:1], query_start_loc=ints[1:], max_query_len=5, max_seq_len=5)
    seamed = graphs.run_live(ids, positions, meta, 16)
    written = k_cache.reshape(-1, *k_cache.shape[2:]).abs().sum(dim=(1, 2)) != 0
    assert written.nonzero().flatten().tolist() == list(range(16, 21))
    k_cache.zero_()
    with torch.inference_mode():
        plain = model(ids, positions, meta)
    # Equal up to float32 reassociation: a 16-row product may block its sums unlike a 5-row one.
    torch.testing.assert_close(seamed, plain, rtol=1e-4, atol=1e-5)
    assert graphs.slot_mapping[5:16].eq(-1).all()
