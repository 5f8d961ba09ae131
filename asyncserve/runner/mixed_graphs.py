"""CUDA graphs of mixed steps (prefill chunks and decodes together), captured in pieces around attention.

A mixed step cannot be one graph: its attention kernels' grids follow the step's query lengths. Everything
else (embedding, norms, projections, rotary, the MLP or MoE, the KV write) depends only on the token count,
so it is captured once per padded token count, as one graph piece per stretch between two attention calls;
the attention runs eagerly in between on the step's own metadata. The pieces hand over through fixed
buffers: each piece ends by copying the next attention's queries into `query`; attention writes `out`, which
the following piece reads. A step of 64 decodes and a 512-token chunk of an 8B model goes from ~385
launches to 33 replays and the attention kernels, so the host no longer takes longer than the GPU.

Padding rows (past the step's tokens, up to the captured size) run through the pieces on stale inputs:
each row of those layers is independent of the others, and their KV writes go nowhere (slot -1).
"""
from __future__ import annotations


import torch

from asyncserve.layers.attention import AttentionMetadata, PagedAttention


# Past ~2k tokens the GPU takes longer to run a step of an 8B model than the host takes to launch it.
DEFAULT_MAX_MIXED_GRAPH_TOKENS = 2048


def mixed_graph_sizes(max_tokens: int) -> list[int]:
    """Token counts to capture, multiples of 16 (one Triton specialization each): fine steps where
    padding costs most (a padded row is paid in every projection), coarser ones above 1,024."""
    sizes = list(range(16, 129, 16))
    sizes += range(160, 513, 32)
    sizes += range(576, 1025, 64)
    sizes += range(1152, 8193, 128)
    return [size for size in sizes if size <= max_tokens]


class _Split:
    """The seam a piecewise forward passes through: every attention layer calls `cut`.

    Capturing, `cut` ends the running graph piece and begins the next one in the same memory pool. Live
    (no capture: warm-up, and the CPU tests), it runs the attention at once on `meta`, so the forward
    computes exactly what the captured pieces and the eager attention between them will.
    """

    def __init__(self, graphs: MixedStepGraphs, meta: AttentionMetadata | None, pool=None):
        self.graphs = graphs
        self.meta = meta            # live: the step's real metadata
        self.pool = pool            # capturing: the pieces' memory pool
        self.pieces: list[torch.cuda.CUDAGraph] = []
        self.layers: list[PagedAttention] = []

    def begin(self) -> None:
        if self.pool is not None:
            piece = torch.cuda.CUDAGraph()
            piece.capture_begin(pool=self.pool)
            self.pieces.append(piece)

    def end(self) -> None:
        if self.pool is not None:
            self.pieces[-1].capture_end()

    def cut(self, layer: PagedAttention, query: torch.Tensor) -> torch.Tensor:
        """query [T, H, D] of `layer` (its K/V already in the pool) -> its output [T, H * D], read from
        the fixed buffer that attention writes between the pieces."""
        num_tokens = query.shape[0]
        queries, outputs = self.graphs.buffers(num_tokens, layer)
        queries.copy_(query)
        self.end()
        self.layers.append(layer)
        if self.meta is not None:  # live: the step's own tokens (the rows past them are padding)
            real = self.meta.slot_mapping.shape[0]
            layer.attend(queries[:real], self.meta, outputs[:real])
        self.begin()
        return outputs.view(num_tokens, -1)


class MixedStepGraphs:
    """Fixed input buffers sized for the largest capture, and per captured token count its pieces and the
    attention layers between them."""

    def __init__(self, model, device: torch.device, max_tokens: int):
        self.model = model
        self.device = device
        layers = model.attention_layers()
        self.num_heads, self.head_dim = layers[0].num_heads, layers[0].head_dim
        self.max_tokens = max_tokens
        self.longs = torch.zeros(3, max_tokens, dtype=torch.int64, device=device)
        self.input_ids, self.positions, self.slot_mapping = self.longs
        self.slot_mapping.fill_(-1)
        dtype = next(model.parameters()).dtype
        self.query = torch.zeros(max_tokens, self.num_heads, self.head_dim, dtype=dtype, device=device)
        self.out = torch.zeros_like(self.query)
        self.pieces: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.layers: dict[int, list[PagedAttention]] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self.sizes: list[int] = []

    @staticmethod
    def supports(model) -> bool:
        """One query shape for every attention layer, and no layer outside attention reading the step's
        metadata (the model says: Phi-3's LongRoPE picks its tables by each sequence's length)."""
        layers = model.attention_layers()
        return bool(layers) and model.captures_mixed_steps() and len(
            {(layer.num_heads, layer.head_dim) for layer in layers}) == 1

    def buffers(self, num_tokens: int, layer: PagedAttention) -> tuple[torch.Tensor, torch.Tensor]:
        if (layer.num_heads, layer.head_dim) != (self.num_heads, self.head_dim):
            raise ValueError("mixed-step graphs need one query shape for every attention layer")
        return self.query[:num_tokens], self.out[:num_tokens]

    def padded_size(self, num_tokens: int) -> int | None:
        for size in self.sizes:
            if size >= num_tokens:
                return size
        return None

    def _meta(self, num_tokens: int, split: _Split) -> AttentionMetadata:
        """What the pieces see of a step: the KV slots (padding: -1) and the seam. Attention, which
        reads the rest, runs between the pieces on each step's own metadata."""
        zeros = torch.zeros(2, dtype=torch.int32, device=self.device)
        return AttentionMetadata(slot_mapping=self.slot_mapping[:num_tokens], block_tables=zeros[None, :1],
                                 seq_lens=zeros[:1], query_start_loc=zeros, max_query_len=num_tokens,
                                 max_seq_len=num_tokens, graph_split=split)

    def _warm_up_meta(self, num_tokens: int, block_size: int) -> AttentionMetadata:
        """One sequence of `num_tokens` new tokens over pool block 0 (read, never written: slots are -1)."""
        blocks = -(-num_tokens // block_size)
        ints = torch.tensor([num_tokens, 0, num_tokens], dtype=torch.int32, device=self.device)
        return AttentionMetadata(slot_mapping=self.slot_mapping[:num_tokens],
                                 block_tables=torch.zeros(1, blocks, dtype=torch.int32, device=self.device),
                                 seq_lens=ints[:1], query_start_loc=ints[1:], max_query_len=num_tokens,
                                 max_seq_len=num_tokens)

    @torch.inference_mode()
    def capture(self, sizes: list[int], stream: torch.cuda.Stream, block_size: int) -> None:
        pool = torch.cuda.graph_pool_handle()
        model = self.model
        self.slot_mapping.fill_(-1)
        for size in sorted(sizes, reverse=True):  # largest first: the smaller ones reuse its memory
            ids, positions = self.input_ids[:size], self.positions[:size]
            warm_up = _Split(self, self._warm_up_meta(size, block_size))
            model(ids, positions, self._meta(size, warm_up))  # compiles this size's kernels
            torch.cuda.synchronize(self.device)
            split = _Split(self, None, pool=pool)
            with torch.cuda.stream(stream):
                split.begin()
                self.hidden[size] = model(ids, positions, self._meta(size, split))
                split.end()
            torch.cuda.synchronize(self.device)
            self.pieces[size], self.layers[size] = split.pieces, split.layers
        self.sizes = sorted(self.pieces)

    def _load(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
              size: int) -> None:
        num_tokens = input_ids.shape[0]
        self.input_ids[:num_tokens].copy_(input_ids)
        self.positions[:num_tokens].copy_(positions)
        self.slot_mapping[:num_tokens].copy_(meta.slot_mapping)
        self.slot_mapping[num_tokens:size].fill_(-1)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The step's final hidden states [T, E]: its pieces replayed, attention run eagerly between."""
        num_tokens = input_ids.shape[0]
        size = self.padded_size(num_tokens)
        if size not in self.pieces:  # sizes set without a capture (the CPU tests): no graphs to replay
            return self.run_live(input_ids, positions, meta, size)
        self._load(input_ids, positions, meta, size)
        pieces = self.pieces[size]
        queries, outputs = self.query[:num_tokens], self.out[:num_tokens]
        for piece, layer in zip(pieces, self.layers[size]):
            piece.replay()
            layer.attend(queries, meta, outputs)
        pieces[-1].replay()
        return self.hidden[size][:num_tokens]

    @torch.inference_mode()
    def run_live(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 size: int) -> torch.Tensor:
        """What `run` computes, without graphs: the same buffers, padding and seams (the CPU tests)."""
        num_tokens = input_ids.shape[0]
        self._load(input_ids, positions, meta, size)
        split = _Split(self, meta)
        hidden = self.model(self.input_ids[:size], self.positions[:size], self._meta(size, split))
        return hidden[:num_tokens]
