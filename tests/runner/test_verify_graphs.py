"""Whole-step graphs of uniform verify steps (runner/verify_graphs.py): which forwards they take, and that
the forward they capture, fed through their static buffers (padding sequences included), computes what the
step's own eager forward computes. On the CPU nothing is captured: `run` computes the captured forward live."""
from __future__ import annotations

import torch

from asyncserve.layers.attention import AttentionMetadata
from asyncserve.runner.verify_graphs import VerifyGraphs

Q = 3  # a last token and two drafts per sequence


def _uniform_step(block_size: int, contexts: list[int], vocab: int, seed: int = 0):
    """Sequences with `contexts[i]` tokens already in the pool (their own blocks) and Q new ones each."""
    gen = torch.Generator().manual_seed(seed)
    input_ids, positions, slots, seq_lens, tables = [], [], [], [], []
    next_block = 0
    for context in contexts:
        total = context + Q
        blocks = list(range(next_block, next_block + -(-total // block_size)))
        next_block += len(blocks)
        tables.append(blocks)
        seq_lens.append(total)
        for position in range(context, total):
            positions.append(position)
            slots.append(blocks[position // block_size] * block_size + position % block_size)
        input_ids += torch.randint(0, vocab, (Q,), generator=gen).tolist()
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                                                   dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.arange(0, (len(contexts) + 1) * Q, Q, dtype=torch.int32), max_query_len=Q,
        max_seq_len=max(seq_lens))
    return torch.tensor(input_ids), torch.tensor(positions), meta


def test_the_captured_forward_through_the_static_buffers_is_the_steps_own(make_llm):
    llm = make_llm("qwen3", dtype="float32")
    runner = llm.llm_engine.executor.runner
    model, block_size = runner.model, runner.block_size
    vocab = llm.llm_engine.model_config.hf_config.vocab_size
    graphs = VerifyGraphs(model, torch.device("cpu"), Q, max_batch=4, max_model_len=64, block_size=block_size)
    graphs.sizes = [1, 2, 4]  # as if captured: three sequences take the graph of four
    # Context tokens first (an eager prefill writes their KV), then the uniform step over them.
    contexts = [5, 0, 18]
    with torch.inference_mode():
        for index, context in enumerate(contexts):
            if context:
                ids, pos, meta = _uniform_step(block_size, contexts, vocab, seed=1)
                prefill_ids = torch.randint(0, vocab, (context,), generator=torch.Generator().manual_seed(index))
                table = meta.block_tables[index:index + 1]
                slot = torch.tensor([int(table[0, p // block_size]) * block_size + p % block_size
                                     for p in range(context)])
                model(prefill_ids, torch.arange(context), AttentionMetadata(
                    slot_mapping=slot, block_tables=table, seq_lens=torch.tensor([context], dtype=torch.int32),
                    query_start_loc=torch.tensor([0, context], dtype=torch.int32), max_query_len=context,
                    max_seq_len=context))
        ids, pos, meta = _uniform_step(block_size, contexts, vocab, seed=1)
        assert graphs.takes(ids, meta) == 4
        replayed = graphs.run(ids, pos, meta, 4).clone()
        eager = model(ids, pos, meta)
    torch.testing.assert_close(replayed, eager)
    assert (graphs.slot_mapping[len(ids):4 * Q] == -1).all()  # the padding sequence writes no KV


def test_only_uniform_steps_take_a_graph():
    graphs = VerifyGraphs(torch.nn.Identity(), torch.device("cpu"), Q, max_batch=8, max_model_len=64, block_size=16)
    graphs.sizes = [1, 2, 4, 8]
    ids, _, meta = _uniform_step(16, [4, 9], vocab=50)
    assert graphs.takes(ids, meta) == 2
    shorter = AttentionMetadata(**{**meta.__dict__, "query_start_loc": torch.tensor([0, 2, 6], dtype=torch.int32),
                                   "max_query_len": 4})
    assert graphs.takes(ids[:6], shorter) is None  # 2 + 4 tokens: not Q each
    assert graphs.takes(ids, AttentionMetadata(**{**meta.__dict__, "num_decodes": 1})) is None
    nine = _uniform_step(16, [1] * 9, vocab=50)
    assert graphs.takes(nine[0], nine[2]) is None  # more sequences than the largest graph
