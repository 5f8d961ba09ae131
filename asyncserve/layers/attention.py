"""Attention over the paged KV pool; the step's metadata is passed in, never read from globals."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from asyncserve.kernels import paged_attention, paged_decode_attention, rotary_write_kv_cache, write_kv_cache
from asyncserve.kernels.attention_decode import single_partition_max_len
from asyncserve.kernels.kv_scale import is_fp8
from asyncserve.layers.parallel_state import tp_rank

# Rotary and the cache write in one launch (kernels/rotary_cache.py) where the rotary offers its table. On by
# default since an H100 run checked it at real shapes (tests/kernels/test_rotary_cache_gpu.py);
# ASYNCSERVE_FUSED_ROTARY_CACHE=0 turns it off.
FUSE_ROTARY_WITH_CACHE = os.environ.get("ASYNCSERVE_FUSED_ROTARY_CACHE", "1") != "0"
# Per-head RMSNorms before the rotary (Qwen3's q_norm / k_norm) in that same launch. Built without a GPU run:
# on with ASYNCSERVE_FUSED_QK_NORM=1 until tests/kernels/test_rotary_cache_gpu.py and a Qwen3 figure have run.
FUSE_QK_NORM = os.environ.get("ASYNCSERVE_FUSED_QK_NORM") == "1"


@dataclass
class AttentionMetadata:
    """Where this step's tokens live in the pool and what each one may attend to."""

    slot_mapping: torch.Tensor     # [T] int64: pool slot of each new token (-1: padding)
    block_tables: torch.Tensor     # [B, max_blocks] int32
    seq_lens: torch.Tensor         # [B] int32: context length including the new tokens
    query_start_loc: torch.Tensor  # [B + 1] int32: offsets of each sequence's new tokens
    max_query_len: int
    max_seq_len: int
    # Mixed steps: the leading `num_decodes` sequences have one new token each and take the decode
    # kernel; the rest take the prefill kernel with these offsets (query_start_loc shifted to 0).
    num_decodes: int = 0
    prefill_query_start_loc: torch.Tensor | None = None
    prefill_seq_lens: torch.Tensor | None = None
    prefill_block_tables: torch.Tensor | None = None
    decode_max_seq_len: int = 0
    prefill_max_seq_len: int = 0
    # [B] int32: how many tokens each sequence holds (prompt and output so far; more than seq_lens while
    # a prefill is chunked), for rotary schemes that depend on it (Phi-3's LongRoPE). None in captured
    # decode steps, where it equals seq_lens.
    context_lens: torch.Tensor | None = None
    # Set while a mixed step is captured in pieces (runner/mixed_graphs.py): each attention layer hands
    # its queries to `graph_split.cut(layer, query)` and returns what it gives back; the attention itself
    # runs between the pieces (`PagedAttention.attend`).
    graph_split: object | None = None
    # [B] int64: each sequence's slot in the state pool of layers with a per-sequence recurrent state
    # (hybrid models' linear attention, layers/recurrent_state.py); None for models without such layers.
    state_slots: torch.Tensor | None = None
    # Steps with prompt chunks of such models: query_start_loc as int64 on the device and on the host, once
    # per step, for flash-linear-attention's varlen kernels. Their chunk indices are then built on the host
    # (no device sync) and cached across layers by tensor identity, where a per-layer `.long()` copy synced
    # once per layer and kernel.
    state_query_start_loc: torch.Tensor | None = None
    state_query_start_loc_host: torch.Tensor | None = None
    # [T] int64, eager steps with image tokens of a family whose images attend both ways (Gemma 3): each
    # row sees keys below its entry (an image token's image end, any other row's position + 1), so an
    # image's tokens see each other (runner/images.py). None: causal. Read by the prefill kernels and the
    # reference; the decode kernels never take it (a lone new token's end is its position + 1).
    key_ends: torch.Tensor | None = None

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1


# A mixed step's decodes go through the prefill kernel with its prompt chunks unless one reads more than
# this many tokens and they give fewer (sequence, KV head) programs than this (an H100 has 132 SMs).
_ONE_LAUNCH_MAX_DECODE_CONTEXT = 2048
_ONE_LAUNCH_MIN_PROGRAMS = 256


class PagedAttention(nn.Module):
    """Writes the new K/V into the pool, then attends over each sequence's whole context, or
    its last `sliding_window` tokens; `softcap` bounds the logits (Gemma 2); `sinks` gives each query
    head a learned logit in its softmax's denominator (GPT-OSS's `self_attn.sinks`, this rank's heads).
    A window's older blocks stay allocated in the pool: they are masked, never freed early."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, softcap: float | None = None, sinks: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window or None
        self.softcap = softcap or None
        # (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim]; bound by the runner.
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        # Per-tensor scales of an fp8 pool (stored = k / k_scale), from the checkpoint when it has them.
        self.k_scale = _kv_scale_parameter()
        self.v_scale = _kv_scale_parameter()
        self.sinks = _sinks_parameter(num_heads) if sinks else None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                meta: AttentionMetadata, rotary: nn.Module | None = None,
                positions: torch.Tensor | None = None, head_norms: tuple | None = None) -> torch.Tensor:
        """Given `rotary` (a RotaryEmbedding) and `positions`, q and k are rotated here first: by it, or in
        one launch with the cache write where it offers its table (`fused_table`) and the fusion is on.
        `head_norms` (q_norm, k_norm: RMSNorm over head_dim) normalize each head before the rotary: in that
        launch too where it takes them (plain RMSNorm, full rotary, FUSE_QK_NORM), else as their own ops."""
        num_tokens = query.shape[0]
        query = query.view(num_tokens, self.num_heads, self.head_dim)
        key = key.view(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = self.kv_cache
        table = rotary.fused_table(positions) if rotary is not None and FUSE_ROTARY_WITH_CACHE else None
        qk_norm = None
        if head_norms is not None:
            q_norm, k_norm = head_norms
            if (FUSE_QK_NORM and table is not None and table.shape[-1] == self.head_dim
                    and not q_norm.unit_offset and not k_norm.unit_offset and q_norm.eps == k_norm.eps):
                qk_norm = (q_norm.weight, k_norm.weight, q_norm.eps)
            else:
                query = q_norm(query.reshape(-1, self.head_dim)).view(num_tokens, self.num_heads, self.head_dim)
                key = k_norm(key.reshape(-1, self.head_dim)).view(num_tokens, self.num_kv_heads, self.head_dim)
        if table is not None:
            rotary_write_kv_cache(positions, query, key, value, k_cache, v_cache, meta.slot_mapping, table,
                                  rotary.is_neox_style, **self._scales(k_cache), qk_norm=qk_norm)
        else:
            if rotary is not None:
                rotary(positions, query, key)
            write_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping, **self._scales(k_cache))
        if meta.graph_split is not None:
            return meta.graph_split.cut(self, query)
        return self.attend(query, meta).reshape(num_tokens, self.num_heads * self.head_dim)

    def single_partition_len(self, num_seqs: int) -> int:
        """The longest context for which a decode step of `num_seqs` sequences attends in one launch (one
        partition, no merge) when its metadata's max_seq_len is that bound: decode graphs capture it."""
        return single_partition_max_len(num_seqs, self.num_kv_heads)

    def _scales(self, k_cache: torch.Tensor) -> dict:
        # Checkpoint scales serve an fp8 pool only, as in vLLM; a model-dtype pool stores keys as they are.
        return dict(k_scale=self.k_scale, v_scale=self.v_scale) if is_fp8(k_cache.dtype) else {}

    def _split_decodes(self, query: torch.Tensor, meta: AttentionMetadata) -> bool:
        """Whether a mixed step's decodes take the split-K decode kernel apart from its prompt chunks.
        On the GPU the prefill kernel takes them too, as one-token queries (one launch, no copies), unless
        a decode reads a long context with too few (sequence, KV head) programs to fill the GPU."""
        return not query.is_cuda or (meta.decode_max_seq_len > _ONE_LAUNCH_MAX_DECODE_CONTEXT
                                     and meta.num_decodes * self.num_kv_heads < _ONE_LAUNCH_MIN_PROGRAMS)

    def attend(self, query: torch.Tensor, meta: AttentionMetadata,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """query [T, H, D] of tokens whose K/V are in the pool -> [T, H, D] (into `out` if given)."""
        k_cache, v_cache = self.kv_cache
        options = {"sliding_window": self.sliding_window, "softcap": self.softcap, "sinks": self.sinks,
                   **self._scales(k_cache)}
        if meta.is_decode:
            result = paged_decode_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                            self.scale, meta.max_seq_len, **options)
        elif meta.num_decodes and self._split_decodes(query, meta):
            decodes = meta.num_decodes
            result = torch.empty_like(query) if out is None else out
            result[:decodes] = paged_decode_attention(
                query[:decodes], k_cache, v_cache, meta.block_tables[:decodes], meta.seq_lens[:decodes],
                self.scale, meta.decode_max_seq_len, **options)
            key_ends = None if meta.key_ends is None else meta.key_ends[decodes:]
            result[decodes:] = paged_attention(
                query[decodes:], k_cache, v_cache, meta.prefill_block_tables, meta.prefill_seq_lens,
                meta.prefill_query_start_loc, meta.max_query_len, meta.prefill_max_seq_len, self.scale,
                **options, key_ends=key_ends)
            return result
        else:
            result = paged_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                     meta.query_start_loc, meta.max_query_len, meta.max_seq_len, self.scale,
                                     **options, key_ends=meta.key_ends)
        if out is None:
            return result
        out.copy_(result)
        return out


def _sinks_parameter(num_heads: int) -> nn.Parameter:
    """[num_heads] of this rank: its slice of the checkpoint's one logit per query head."""
    sinks = nn.Parameter(torch.empty(num_heads), requires_grad=False)
    sinks.weight_loader = load_sinks
    return sinks


def load_sinks(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """Query heads split evenly over ranks, in order: rank r holds heads [r H, (r + 1) H)."""
    num_heads = param.shape[0]
    start = tp_rank() * num_heads
    if loaded.dim() != 1 or loaded.shape[0] < start + num_heads:
        raise ValueError(f"attention sinks have shape {tuple(loaded.shape)}, expected one per query head "
                         f"({num_heads} on this rank, from head {start})")
    param.data.copy_(loaded[start:start + num_heads])


def _kv_scale_parameter() -> nn.Parameter:
    """An fp32 scalar, 1.0 unless the checkpoint has one (`checkpoint_optional`: the loader may leave it)."""
    scale = nn.Parameter(torch.ones((), dtype=torch.float32), requires_grad=False)
    scale.weight_loader = load_kv_scale
    scale.checkpoint_optional = True
    return scale


def load_kv_scale(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """One positive number per layer (per-tensor): per-head or per-channel KV scales are not served."""
    if loaded.numel() != 1:
        raise ValueError(f"a KV-cache scale must be one number per layer (per-tensor), got shape "
                         f"{tuple(loaded.shape)}")
    value = float(loaded.float().reshape(()))
    if not value > 0.0 or value == float("inf"):
        raise ValueError(f"a KV-cache scale must be a positive finite number, got {value}")
    param.data.fill_(value)
