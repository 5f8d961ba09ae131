"""GPU timings of the kernels next to their floors: `python -m asyncserve.kernels.bench`.

Memory-bound kernels report GB/s against the device's copy bandwidth, timed as CUDA-graph
replays (the engine's decode path) so that Python launch overhead is left out; prefill
attention reports TFLOP/s next to torch's flash attention on the same (dense) problem.
"""

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

from . import (fused_add_rms_norm, paged_attention, paged_decode_attention, rms_norm,
               rotary_embedding, silu_and_mul, write_kv_cache)

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16


def _report(name, milliseconds, bytes_moved=None, flops=None, floor=None):
    line = f"{name:<44} {milliseconds * 1e3:9.1f} us"
    if bytes_moved is not None:
        line += f"  {bytes_moved / milliseconds / 1e6:7.0f} GB/s"
    if flops is not None:
        line += f"  {flops / milliseconds / 1e9:6.0f} TFLOP/s"
    if floor is not None:
        line += f"  (floor {floor})"
    print(line, flush=True)


def _copy_bandwidth():
    """Bytes/ms of a device-to-device copy: the practical floor of memory-bound kernels."""
    source = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    return 2 * source.numel() / do_bench(lambda: target.copy_(source))


def _paged_pool(seq_lens, kv_dtype=DTYPE):
    blocks = [-(-length // BLOCK_SIZE) for length in seq_lens]
    shape = (sum(blocks), BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device="cuda").to(kv_dtype)
    v_cache = torch.randn(shape, device="cuda").to(kv_dtype)
    order = torch.randperm(sum(blocks), device="cuda", dtype=torch.int32)
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device="cuda")
    start = 0
    for seq, count in enumerate(blocks):
        tables[seq, :count] = order[start:start + count]
        start += count
    lengths = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    return k_cache, v_cache, tables, lengths


def bench_decode(copy_rate, kv_dtype=DTYPE):
    """With an fp8 pool (per-tensor scales read on the device), half the bytes to read."""
    scales = {} if kv_dtype == DTYPE else dict(k_scale=torch.tensor(0.5, device="cuda"),
                                              v_scale=torch.tensor(0.5, device="cuda"))
    label = "" if kv_dtype == DTYPE else " fp8 KV"
    for batch, context in [(1, 1024), (1, 16384), (8, 4096), (64, 1024), (64, 4096),
                           (256, 2048)]:
        k_cache, v_cache, tables, lengths = _paged_pool([context] * batch, kv_dtype)
        query = torch.randn(batch, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        ms = do_bench_cudagraph(lambda: paged_decode_attention(
            query, k_cache, v_cache, tables, lengths, HEAD_DIM ** -0.5, context, **scales))
        kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * k_cache.element_size()
        _report(f"decode{label} B={batch} ctx={context}", ms, kv_bytes,
                floor=f"{kv_bytes / copy_rate * 1e3:.1f} us")


def bench_prefill():
    for num_seqs, length in [(1, 4096), (8, 1024), (1, 16384)]:
        k_cache, v_cache, tables, lengths = _paged_pool([length] * num_seqs)
        query = torch.randn(num_seqs * length, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        starts = torch.arange(0, num_seqs + 1, dtype=torch.int32, device="cuda") * length
        ms = do_bench(lambda: paged_attention(query, k_cache, v_cache, tables, lengths, starts,
                                              length, length, HEAD_DIM ** -0.5))
        flops = 2 * 2 * num_seqs * NUM_HEADS * HEAD_DIM * length * (length + 1) / 2
        q = torch.randn(num_seqs, NUM_HEADS, length, HEAD_DIM, device="cuda", dtype=DTYPE)
        k = torch.randn(num_seqs, NUM_KV_HEADS, length, HEAD_DIM, device="cuda", dtype=DTYPE)
        flash_ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, k, is_causal=True,
                                                                   enable_gqa=True))
        _report(f"prefill {num_seqs}x{length}", ms, flops=flops,
                floor=f"torch flash {flops / flash_ms / 1e9:.0f} TFLOP/s")


def bench_elementwise(copy_rate):
    tokens, hidden, intermediate = 4096, 4096, 14336
    x = torch.randn(tokens, hidden, device="cuda", dtype=DTYPE)
    weight = torch.ones(hidden, device="cuda", dtype=DTYPE)
    residual = torch.randn_like(x)
    cases = [
        ("rms_norm 4096x4096", lambda: rms_norm(x, weight, 1e-5), 2 * x.nbytes),
        ("fused_add_rms_norm 4096x4096", lambda: fused_add_rms_norm(x, residual, weight, 1e-5),
         4 * x.nbytes),
    ]
    gate_up = torch.randn(tokens, 2 * intermediate, device="cuda", dtype=DTYPE)
    cases.append(("silu_and_mul 4096x14336", lambda: silu_and_mul(gate_up), 1.5 * gate_up.nbytes))
    query = torch.randn(tokens, NUM_HEADS * HEAD_DIM, device="cuda", dtype=DTYPE)
    key = torch.randn(tokens, NUM_KV_HEADS * HEAD_DIM, device="cuda", dtype=DTYPE)
    positions = torch.arange(tokens, device="cuda")
    cos_sin_cache = torch.randn(tokens, HEAD_DIM, device="cuda")
    cases.append(("rotary_embedding 4096 tokens", lambda: rotary_embedding(
        positions, query, key, cos_sin_cache, True), 2 * (query.nbytes + key.nbytes)))
    k_cache = torch.empty(tokens * 4 // BLOCK_SIZE, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM,
                          device="cuda", dtype=DTYPE)
    v_cache = torch.empty_like(k_cache)
    new_key = key.view(tokens, NUM_KV_HEADS, HEAD_DIM)
    new_value = torch.randn_like(new_key)
    slots = torch.randperm(tokens * 4, device="cuda")[:tokens]
    cases.append(("write_kv_cache 4096 tokens", lambda: write_kv_cache(
        new_key, new_value, k_cache, v_cache, slots), 4 * new_key.nbytes))
    for name, run, bytes_moved in cases:
        _report(name, do_bench_cudagraph(run), bytes_moved,
                floor=f"{bytes_moved / copy_rate * 1e3:.1f} us")


if __name__ == "__main__":
    rate = _copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {rate / 1e6:.0f} GB/s", flush=True)
    bench_decode(rate)
    bench_decode(rate, torch.float8_e4m3fn)
    bench_prefill()
    bench_elementwise(rate)
