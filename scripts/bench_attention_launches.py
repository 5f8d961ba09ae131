"""GPU time of the attention layer's small kernels inside a CUDA graph, where launches cost what they do
in a decode step: the decode kernel with one partition (no reduce launch) or several, and rotary + cache
write as two launches or one.

    python scripts/bench_attention_launches.py            # H100: a few seconds
"""
from __future__ import annotations

import argparse

import torch

import asyncserve.kernels.attention_decode as decode
from asyncserve.kernels import (
    rotary_embedding_triton,
    rotary_write_kv_cache_triton,
    write_kv_cache_triton,
)

BLOCK_SIZE = 16


def graph_time_us(fn, replays: int = 200, per_graph: int = 20) -> float:
    """Median µs of one call, from graphs of `per_graph` calls (graph launch cost spread over them)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    graph.replay()
    times = []
    for _ in range(replays // 10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (10 * per_graph))
    return sorted(times)[len(times) // 2]


def decode_case(batch, heads, kv_heads, head_dim, context, bound, partition_size=None):
    """Decode attention over `context` keys per sequence, captured for max_seq_len=bound."""
    blocks_per_seq = -(-bound // BLOCK_SIZE)
    pool = batch * blocks_per_seq + 1
    k_cache = torch.randn(pool, BLOCK_SIZE, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(pool - 1, device="cuda", dtype=torch.int32)[:batch * blocks_per_seq].view(batch, -1)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    original = decode._partition_size
    if partition_size is not None:
        decode._partition_size = lambda programs, max_len: partition_size
    try:
        return graph_time_us(lambda: decode.paged_decode_attention_triton(
            query, k_cache, v_cache, tables, seq_lens, head_dim ** -0.5, bound))
    finally:
        decode._partition_size = original


def rotary_cache_case(tokens, heads, kv_heads, head_dim, fused):
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    query, key, value = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
    blocks = -(-tokens // BLOCK_SIZE) + 1
    k_cache = torch.zeros(blocks, BLOCK_SIZE, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.arange(tokens, device="cuda")
    positions = torch.arange(tokens, device="cuda") + 100
    table = torch.randn(32768, head_dim, device="cuda")

    def separate():
        rotary_embedding_triton(positions, query, key, table, True)
        write_kv_cache_triton(key, value, k_cache, v_cache, slots)

    def one_launch():
        rotary_write_kv_cache_triton(positions, query, key, value, k_cache, v_cache, slots, table, True)
    return graph_time_us(one_launch if fused else separate)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bound", type=int, default=32768, help="max_model_len the long graphs capture")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}: µs per call inside a CUDA graph")
    print("decode attention: batch heads/kv head_dim context | split (128/256/512 keys) + reduce | "
          f"one partition | graph bound {args.bound}, as captured for any context")
    for batch, heads, kv_heads, head_dim in [(1, 14, 2, 64), (8, 14, 2, 64), (1, 32, 8, 128), (64, 32, 8, 128)]:
        programs = batch * kv_heads
        split_size = 512 if programs >= 256 else 256 if programs >= 64 else 128
        for context in (128, 192, 256, 384, 512, 1024):
            split = decode_case(batch, heads, kv_heads, head_dim, context, context, partition_size=split_size)
            single = decode_case(batch, heads, kv_heads, head_dim, context, context, partition_size=context)
            at_bound = decode_case(batch, heads, kv_heads, head_dim, context, args.bound)
            print(f"  {batch:3d} {heads:2d}/{kv_heads} {head_dim:3d} {context:5d} | {split:6.2f} | {single:6.2f} | "
                  f"{at_bound:6.2f}")
    print(f"(single_partition_max_len at batch 1, 2 KV heads: {decode.single_partition_max_len(1, 2)})")
    print("rotary + cache write: tokens heads/kv head_dim | two launches | one launch")
    for tokens, heads, kv_heads, head_dim in [(1, 14, 2, 64), (8, 14, 2, 64), (64, 32, 8, 128),
                                              (2048, 32, 8, 128), (8192, 14, 2, 64)]:
        two = rotary_cache_case(tokens, heads, kv_heads, head_dim, fused=False)
        one = rotary_cache_case(tokens, heads, kv_heads, head_dim, fused=True)
        print(f"  {tokens:5d} {heads:2d}/{kv_heads} {head_dim:3d} | {two:6.2f} | {one:6.2f}")


if __name__ == "__main__":
    main()
