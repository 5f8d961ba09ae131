"""Kernel test setup: Triton runs in its CPU interpreter when there is no GPU, and helpers
build paged KV batches (shuffled block ids, holes, NaN in every slot no sequence owns)."""

import importlib
import os
import sys
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the @triton.jit decorators of asyncserve.kernels (read at decoration).
    os.environ.setdefault("TRITON_INTERPRET", "1")

_KERNEL_MODULES = ["_triton", "cache", "kv_scale", "attention_ref", "attention_cpu", "attention_window", "attention_decode",
                   "attention_prefill_tile", "attention_prefill_gqa", "attention_prefill_sdpa",
                   "attention_prefill", "attention", "norm", "rotary", "rotary_cache", "activation", "gemv", "int_packing", "split_k", "quant_gemv_mma", "quant_gemm", "fp8_linear",
                   "moe_quant", "moe", "moe_row", "bitmask", "lora"]
if os.environ.get("TRITON_INTERPRET") == "1" and "asyncserve.kernels" in sys.modules:
    # An earlier conftest imported the kernels as compiled GPU functions: re-decorate them.
    for name in _KERNEL_MODULES:
        importlib.reload(importlib.import_module(f"asyncserve.kernels.{name}"))
    importlib.reload(sys.modules["asyncserve.kernels"])

from asyncserve.kernels import HAS_TRITON  # noqa: E402


@pytest.fixture
def triton_device():
    """Device for Triton-vs-reference tests: the GPU if any, else the CPU interpreter."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_paged_batch(seq_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size,
                      dtype=torch.float32, device="cpu", seed=0, spare_blocks=3):
    """Random sequences over shuffled pool blocks (spare ones left as holes); also returns
    each sequence's dense keys/values [L, Hkv, D] to check attention without the pool."""
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-length // block_size) for length in seq_lens]
    num_blocks = sum(blocks_needed) + spare_blocks + 1
    order = torch.randperm(num_blocks, generator=gen).tolist()
    poison_block = order.pop()  # unused table entries point here: NaN if ever read
    width = max(blocks_needed + [1]) + 2
    block_tables = torch.full((len(seq_lens), width), poison_block, dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"))
    v_cache = torch.full(shape, float("nan"))
    keys, values = [], []
    for seq, length in enumerate(seq_lens):
        blocks = [order.pop(0) for _ in range(blocks_needed[seq])]
        block_tables[seq, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        positions = torch.arange(length)
        blocks_of_positions = block_tables[seq, positions // block_size].long()
        slots = blocks_of_positions * block_size + positions % block_size
        keys.append(torch.randn(length, num_kv_heads, head_dim, generator=gen))
        values.append(torch.randn(length, num_kv_heads, head_dim, generator=gen))
        k_cache.view(-1, num_kv_heads, head_dim)[slots] = keys[-1]
        v_cache.view(-1, num_kv_heads, head_dim)[slots] = values[-1]
    query_start_loc = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(),
                                   dtype=torch.int32)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen)
    return SimpleNamespace(
        query=query.to(device, dtype), k_cache=k_cache.to(device, dtype),
        v_cache=v_cache.to(device, dtype), block_tables=block_tables.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=query_start_loc.to(device), max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), scale=head_dim ** -0.5, keys=keys, values=values,
    )


def dense_causal_attention(query, keys, values, scale):
    """Naive fp64 oracle: query [t, H, D] are the last t of L positions; keys/values [L, Hkv, D]."""
    group = query.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,lhd->htl", query.double(), k) * scale
    length, new = k.shape[0], query.shape[0]
    query_positions = torch.arange(length - new, length)[:, None]
    scores = scores.masked_fill(torch.arange(length)[None, :] > query_positions, float("-inf"))
    return torch.einsum("htl,lhd->thd", torch.softmax(scores, dim=-1), v)


def attention_args(batch):
    """Positional arguments of paged_attention for a batch from build_paged_batch."""
    return (batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
            batch.query_start_loc, batch.max_query_len, batch.max_seq_len, batch.scale)


@pytest.fixture
def paged():
    """The paged-batch helpers, as a fixture so test files need no import path."""
    return SimpleNamespace(build=build_paged_batch, dense=dense_causal_attention,
                           args=attention_args)
