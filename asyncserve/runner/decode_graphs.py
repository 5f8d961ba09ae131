"""CUDA graphs of decode steps: static input buffers, captured graphs per padded batch size.

A decode step of a small model is a few hundred tiny kernels: launched one by one from Python they take
longer than the GPU needs to run them. Captured once per padded batch size at start-up, a step becomes
one graph launch.

A graph keeps the launch shapes of its capture, the decode attention's partition count among them, which
the kernel picks on the host from the metadata's max_seq_len: the graph is only right for steps whose
sequences all fit that bound. So small batch sizes get two graphs: one for any context up to max_model_len,
and one bounded by the longest context the attention covers in one partition (no reduce launch, one kernel
per layer fewer), replayed while every sequence of the step fits it.
"""
from __future__ import annotations

import os

import torch

from asyncserve.layers.attention import AttentionMetadata
from asyncserve.runner.capture_guard import capture_check
from asyncserve.runner.input_batch import ScheduledBatch

# On by default since an H100 run (2026-12-07: tests/gpu/test_decode_graph_bounds_cuda.py passed; with the
# other batch-1 switches, Qwen2.5-0.5B +7.6%, Llama-3.1-8B +3.6%); ASYNCSERVE_SHORT_CONTEXT_GRAPHS=0 turns it
# off. The decode kernel reads the same switch (LONG_SINGLE_PARTITION): one partition up to the short bound.
SHORT_CONTEXT_GRAPHS = os.environ.get("ASYNCSERVE_SHORT_CONTEXT_GRAPHS", "1") != "0"
# Short-context graphs for padded batch sizes up to this: where launches, not bytes, bound a step (larger
# batches read enough KV per step that one launch fewer per layer is lost in it, and each graph costs start-up).
SHORT_CONTEXT_MAX_BATCH = 32


def context_bounds(model, batch: int, max_model_len: int) -> list[int]:
    """The max_seq_len bounds to capture for a padded batch size, ascending: the longest context whose decode
    attention takes one partition in every layer, where that is shorter than max_model_len and the short graphs
    are on, then max_model_len."""
    if not SHORT_CONTEXT_GRAPHS:
        return [max_model_len]
    short = min((layer.single_partition_len(batch) for layer in model.attention_layers()), default=max_model_len)
    if batch > SHORT_CONTEXT_MAX_BATCH or short >= max_model_len:
        return [max_model_len]
    return [short, max_model_len]


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_num_seqs: padding wastes at most 7 rows."""
    sizes = [size for size in (1, 2, 4) if size < max_num_seqs]
    sizes += list(range(8, max_num_seqs + 1, 8))
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sorted(set(sizes))


class _HostInputs:
    """Pinned host mirrors of the graphs' input buffers, with numpy views to fill them."""

    def __init__(self, max_batch: int, max_blocks: int, pin_memory: bool):
        self.longs = torch.zeros(4 * max_batch, dtype=torch.int64, pin_memory=pin_memory)
        self.ints = torch.zeros(max_batch + max_batch * max_blocks, dtype=torch.int32, pin_memory=pin_memory)
        self.longs_np = self.longs.numpy().reshape(4, max_batch)
        self.seq_lens_np = self.ints.numpy()[:max_batch]
        self.tables_np = self.ints.numpy()[max_batch:].reshape(max_batch, max_blocks)


class _DecodeGraphs:
    """Static input buffers sized for the largest batch, and one captured graph per padded size. The
    target's decode steps fill them from the host (`load_inputs`); a drafter's decode forwards from the
    device (runner/draft_decode.py)."""

    def __init__(self, model, device: torch.device, block_size: int, max_batch: int, max_model_len: int,
                 padding_state_slot: int | None = None):
        self.model = model
        self.device = device
        self.max_model_len = max_model_len
        self.max_batch = max_batch
        self.block_size = block_size
        # M-RoPE models: a row's rotary position is its sequence position shifted by its images (rope_delta).
        self.shifts_positions = getattr(model, "supports_images", False)
        max_blocks = -(-max_model_len // block_size)
        # One int64 and one int32 buffer, so a step's inputs arrive in two copies.
        self.longs = torch.zeros(4 * max_batch, dtype=torch.int64, device=device)
        self.input_ids, self.positions, self.slot_mapping, self.state_slots = self.longs.view(4, max_batch)
        # Hybrid models: each row's state slot; padding rows (and the captures) write to the spare slot.
        self.padding_state_slot = padding_state_slot
        if self.padding_state_slot is not None:
            self.state_slots.fill_(self.padding_state_slot)
        self.ints = torch.zeros(max_batch + max_batch * max_blocks, dtype=torch.int32, device=device)
        self.seq_lens = self.ints[:max_batch]
        self.block_tables = self.ints[max_batch:].view(max_batch, max_blocks)
        # Pinned mirrors, filled through numpy: the copies are truly asynchronous. Two of them, used in
        # turn: step N+1 is loaded while step N's copy may still wait on the GPU; by step N+2 the engine
        # has read step N's results, so its copy is done.
        self.host_buffers = [_HostInputs(max_batch, max_blocks, device.type == "cuda") for _ in range(2)]
        self.num_loads = 0
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        # Keyed by (padded batch size, context bound): see `load_inputs`.
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        # Per graph, what its forward returned: the target's (logits, greedy argmax); a drafter's own.
        self.outputs: dict[tuple[int, int], tuple] = {}
        # Every target graph's logits land in this one [max_batch, vocab] buffer (made by the first forward,
        # before any capture): one graph per size each keeping its own [batch, vocab] would hold the sum over
        # the sizes (1 .. 512 by 8: 16,640 rows, 4.3 GB for a 128k vocabulary in bf16, 8.3 GB for 248k),
        # memory the KV cache does not get. One step's logits are read (sampled, or held for a grammar's masks
        # until `sample`) before the engine launches the next step, so no replay overwrites them in use.
        self.logits: torch.Tensor | None = None
        self.bounds: dict[int, list[int]] = {}  # padded batch size -> its graphs' context bounds, ascending
        self.sizes: list[int] = []

    def meta(self, batch: int, max_seq_len: int | None = None) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch], block_tables=self.block_tables[:batch],
            seq_lens=self.seq_lens[:batch], query_start_loc=self.query_start_loc[:batch + 1],
            max_query_len=1, max_seq_len=max_seq_len or self.max_model_len,
            state_slots=self.state_slots[:batch] if self.padding_state_slot is not None else None)

    def target_forward(self, batch: int, bound: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's decode step over the first `batch` rows, for contexts up to `bound`: logits, and their
        argmax (greedy steps skip the sampler)."""
        hidden = self.model(self.input_ids[:batch], self.positions[:batch], self.meta(batch, bound))
        logits = self.model.compute_logits(hidden)
        if self.logits is None:  # a warm-up run, outside any capture
            self.logits = torch.empty(self.max_batch, logits.shape[1], dtype=logits.dtype, device=logits.device)
        shared = self.logits[:batch]
        shared.copy_(logits)
        return shared, shared.argmax(dim=-1)

    def capture(self, sizes: list[int], stream: torch.cuda.Stream, forward=None) -> None:
        """Graphs of `forward(batch)` (default: the target's step, with its small sizes also captured at the
        one-partition context bound, `context_bounds`) over the static buffers; `outputs[batch, bound]` keeps
        what each returned. Largest first, so the smaller ones reuse its memory; each is run twice before its
        capture, so Triton compiles and lazily built tables exist before the capture, which may neither copy
        from the host nor build them (capture_guard.py says if it does, where ASYNCSERVE_CHECK_CAPTURES=1)."""
        pool = torch.cuda.graph_pool_handle()
        for batch in sorted(sizes, reverse=True):
            self.bounds[batch] = (context_bounds(self.model, batch, self.max_model_len) if forward is None
                                  else [self.max_model_len])
            for bound in reversed(self.bounds[batch]):
                run = (lambda: self.target_forward(batch, bound)) if forward is None else (lambda: forward(batch))
                for _ in range(2):
                    run()
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with capture_check(f"capturing the decode graph of batch size {batch} (contexts up to {bound})"), \
                        torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.outputs[batch, bound] = run()
                self.graphs[batch, bound] = graph
        self.sizes = sorted(self.bounds)

    def padded_size(self, batch: int) -> int | None:
        for size in self.sizes:
            if size >= batch:
                return size
        return None

    def load_inputs(self, step: ScheduledBatch, padded: int) -> tuple[int, int]:
        """Writes this step's inputs into the static buffers (two asynchronous copies) and returns the key
        of the graph to replay: the tightest context bound that holds every sequence of the step."""
        seqs, block_size, batch = step.seqs, self.block_size, len(step.seqs)
        host = self.host_buffers[self.num_loads % 2]
        self.num_loads += 1
        positions = [seq.start_position for seq in seqs]
        longs = host.longs_np
        longs[0, :batch] = [seq.new_token_ids[0] for seq in seqs]
        longs[1, :batch] = ([p + seq.rope_delta for seq, p in zip(seqs, positions)] if self.shifts_positions
                            else positions)
        longs[2, :batch] = [seq.block_table[p // block_size] * block_size + p % block_size
                            for seq, p in zip(seqs, positions)]
        longs[2, batch:] = -1  # padding rows write nowhere
        if self.padding_state_slot is not None:
            longs[3, :batch] = [seq.state_slot for seq in seqs]
            longs[3, batch:] = self.padding_state_slot
        host.seq_lens_np[:batch] = [p + 1 for p in positions]
        host.seq_lens_np[batch:] = 1
        tables = host.tables_np
        for row, seq in enumerate(seqs):
            tables[row, :len(seq.block_table)] = seq.block_table
        self.longs.copy_(host.longs, non_blocking=True)
        used = self.max_batch + padded * tables.shape[1]
        self.ints[:used].copy_(host.ints[:used], non_blocking=True)
        longest = max(positions) + 1
        return padded, next(bound for bound in self.bounds[padded] if bound >= longest)

    def replay(self, key: tuple[int, int]) -> None:
        self.graphs[key].replay()
