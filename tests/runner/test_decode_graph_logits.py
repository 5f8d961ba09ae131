"""The decode graphs' logits: every batch size's forward writes them into one shared [max_batch, vocab]
buffer, so the graphs together hold one batch-of-logits of memory instead of one per captured size. On the
CPU nothing is captured; the forward the graphs capture (`target_forward`) runs live here."""
from __future__ import annotations

import torch

from asyncserve.runner.decode_graphs import _DecodeGraphs


def test_every_size_writes_its_logits_into_the_one_buffer(make_llm):
    llm = make_llm("qwen3", dtype="float32")
    runner = llm.llm_engine.executor.runner
    model = runner.model
    graphs = _DecodeGraphs(model, torch.device("cpu"), runner.block_size, max_batch=8, max_model_len=64)
    # Eight one-token sequences at position 0, each in its own block of the (unused) pool.
    graphs.input_ids[:8] = torch.arange(5, 13)
    graphs.positions[:8] = 0
    graphs.slot_mapping[:8] = torch.arange(8) * runner.block_size
    graphs.seq_lens[:8] = 1
    graphs.block_tables[:8, 0] = torch.arange(8, dtype=torch.int32)
    with torch.inference_mode():
        large, large_argmax = graphs.target_forward(8)
        large = large.clone()
        small, small_argmax = graphs.target_forward(2)
        expected = model.compute_logits(model(graphs.input_ids[:2], graphs.positions[:2], graphs.meta(2)))
    assert graphs.logits.shape == (8, expected.shape[1])
    assert small.data_ptr() == graphs.logits.data_ptr() and small.shape == (2, expected.shape[1])
    torch.testing.assert_close(small, expected)
    torch.testing.assert_close(small, large[:2])  # rows do not depend on the batch they ran in
    assert torch.equal(small_argmax, expected.argmax(dim=-1))
