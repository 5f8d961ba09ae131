"""Whole-step CUDA graphs of uniform verify steps: every sequence of the step scores its last token and K
drafts (speculative decoding with all K proposed), so the step is B sequences of Q = K + 1 new tokens.

A mixed step replays in pieces with its attention launched eagerly between them (runner/mixed_graphs.py),
because the attention grid follows the step's query lengths. A uniform step's does not: the packed prefill
kernel's grid is (Q / rows per tile, B, KV heads), and everything else it reads (sequence lengths, block
tables, query offsets) is on the device. So one graph per padded batch size holds the whole forward: for a
135M model that is one replay instead of 31 pieces and 30 attention launches through Triton's Python
launcher, which made an n-gram verify step cost 2.9 plain decode steps on an H100.

The step's inputs, already on the device (runner/inputs.py), are copied into the graphs' static buffers; the
graph returns the hidden states of its rows, and the verify step computes logits and runs the rejection
sampler on them as it does after any forward. Padding sequences (past the step's B, up to the captured size)
write their KV nowhere (slot -1) and attend to Q keys of whatever block their table row holds; their rows are
never read. Not for models with per-sequence recurrent state (their layers need the state slots), images,
LoRA, or tensor parallelism, nor before a GPU run has checked it: `ASYNCSERVE_VERIFY_GRAPHS=1`.
"""
from __future__ import annotations

import os

import torch

from asyncserve.layers.attention import AttentionMetadata
from asyncserve.runner.capture_guard import capture_check
from asyncserve.runner.decode_graphs import graph_batch_sizes

VERIFY_GRAPHS = os.environ.get("ASYNCSERVE_VERIFY_GRAPHS") == "1"
# Speculation pays at small batches (engine/spec_decode/governor.py decides where): graphs up to this many.
MAX_VERIFY_GRAPH_BATCH = 32


def verify_graph_sizes(max_num_seqs: int) -> list[int]:
    return graph_batch_sizes(min(max_num_seqs, MAX_VERIFY_GRAPH_BATCH))


class VerifyGraphs:
    """Static buffers for `max_batch` sequences of `query_len` tokens, and one graph per padded batch size."""

    def __init__(self, model, device: torch.device, query_len: int, max_batch: int, max_model_len: int,
                 block_size: int):
        self.model = model
        self.query_len = query_len
        self.max_batch = max_batch
        self.max_model_len = max_model_len
        rows = max_batch * query_len
        self.longs = torch.zeros(3 * rows, dtype=torch.int64, device=device)
        self.input_ids, self.positions, self.slot_mapping = self.longs.view(3, rows)
        self.slot_mapping.fill_(-1)
        max_blocks = -(-max_model_len // block_size)
        self.seq_lens = torch.full((max_batch,), query_len, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(0, (max_batch + 1) * query_len, query_len, dtype=torch.int32,
                                            device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # per graph: the hidden states of its rows
        self.sizes: list[int] = []
        self.num_replays = 0

    def meta(self, batch: int) -> AttentionMetadata:
        rows = batch * self.query_len
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:rows], block_tables=self.block_tables[:batch],
            seq_lens=self.seq_lens[:batch], query_start_loc=self.query_start_loc[:batch + 1],
            max_query_len=self.query_len, max_seq_len=self.max_model_len)

    def forward(self, batch: int) -> torch.Tensor:
        """The forward a graph of `batch` sequences captures (live on the CPU and in the warm-up runs)."""
        rows = batch * self.query_len
        return self.model(self.input_ids[:rows], self.positions[:rows], self.meta(batch))

    def capture(self, sizes: list[int], stream: torch.cuda.Stream) -> None:
        pool = torch.cuda.graph_pool_handle()
        for batch in sorted(sizes, reverse=True):  # largest first: the smaller ones reuse its memory
            for _ in range(2):  # Triton compiles, lazily built tables exist, before the capture
                self.forward(batch)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with capture_check(f"capturing the verify graph of {batch} sequences x {self.query_len} tokens"), \
                    torch.cuda.graph(graph, pool=pool, stream=stream):
                self.outputs[batch] = self.forward(batch)
            self.graphs[batch] = graph
        self.sizes = sorted(self.graphs)

    def padded_size(self, batch: int) -> int | None:
        return next((size for size in self.sizes if size >= batch), None)

    def takes(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> int | None:
        """The padded batch size of the graph that runs this forward, if one does: B sequences of exactly
        `query_len` new tokens each (B * query_len rows, none longer), nothing but causal attention."""
        batch = meta.seq_lens.shape[0]
        if (meta.max_query_len != self.query_len or input_ids.shape[0] != batch * self.query_len
                or meta.num_decodes or meta.key_ends is not None or meta.state_slots is not None
                or meta.graph_split is not None):
            return None
        return self.padded_size(batch)

    def load(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, padded: int) -> None:
        """Copies the step's device inputs into the static buffers (padding sequences write nowhere)."""
        batch, rows = meta.seq_lens.shape[0], input_ids.shape[0]
        self.input_ids[:rows].copy_(input_ids)
        self.positions[:rows].copy_(positions)
        self.slot_mapping[:rows].copy_(meta.slot_mapping)
        self.slot_mapping[rows:padded * self.query_len].fill_(-1)
        self.seq_lens[:batch].copy_(meta.seq_lens)
        self.seq_lens[batch:padded].fill_(self.query_len)
        width = min(meta.block_tables.shape[1], self.block_tables.shape[1])  # columns past a context: padding
        self.block_tables[:batch, :width].copy_(meta.block_tables[:, :width])

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            padded: int) -> torch.Tensor:
        """The step's hidden states [rows, E]: replayed, or (no capture: the CPU) computed live."""
        self.load(input_ids, positions, meta, padded)
        rows = input_ids.shape[0]
        graph = self.graphs.get(padded)
        if graph is None:
            return self.forward(padded)[:rows]
        graph.replay()
        self.num_replays += 1
        return self.outputs[padded][:rows]
