"""The fused MoE kernel alone at Mixtral-8x7B and Qwen3-30B-A3B layer shapes, next to its floor and to a
per-expert torch loop (the reference: one pass per used expert, as transformers runs it).

    python scripts/bench_moe.py                                  # both shapes, M = 1 .. 4096 tokens
    python scripts/bench_moe.py --shape qwen3-30b-a3b --tokens 1 8 64 --sweep
    python scripts/bench_moe.py --weights int4 fp8              # quantized experts (GPTQ/AWQ g128, FP8)

floor = max(bytes read / measured copy bandwidth, FLOPs / measured bf16 matmul rate), where the bytes
are the weights of the experts the batch actually routes to (counted from its routing) plus the
activations. The kernel is timed as CUDA-graph replays (as decode runs it) over several routings in
turn, so the experts read change from call to call as they do from layer to layer; the torch loop,
which syncs with the host, eagerly. Where a tuned file for this GPU (kernels/moe_configs/, written by
scripts/tune_moe.py) chose the tiles, the table's tiles are timed on the next line. Quantized experts
(`--weights int4 fp8`: group-128 int4, per-channel e4m3) run the dequantizing kernel with its table tiles;
their floor counts the packed bytes (and scales) read.
"""
from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench, do_bench_cudagraph

from asyncserve.kernels import MOE_CONFIGS, QuantExperts, fused_moe_ref, fused_moe_triton, select_experts
from asyncserve.kernels.moe import moe_tiles
from asyncserve.kernels.moe_quant import quant_moe_tiles
from asyncserve.kernels.moe_tiles import moe_config, table_tiles
from bench_common import measure_bandwidth, measure_matmul_rate

# name -> (hidden, expert intermediate, experts, top_k, renormalize)
SHAPES = {"mixtral-8x7b": (4096, 14336, 8, 2, True), "qwen3-30b-a3b": (2048, 768, 128, 8, True)}
ROUTINGS = 4
DTYPE = torch.bfloat16


def _tiles_label(source, tiles):
    return f"{source} w13 {tuple(tiles.w13)} w2 {tuple(tiles.w2)}"


def _random_experts(experts, n, k, weights):
    """[E, N, K] experts in bf16, or quantized as the loaders leave them (random codes, real layouts)."""
    if weights == "bf16":
        return torch.randn(experts, n, k, device="cuda", dtype=DTYPE) * k ** -0.5
    if weights == "fp8":
        codes = torch.randn(experts, n, k, device="cuda").clamp(-448, 448).to(torch.float8_e4m3fn)
        return QuantExperts(codes, torch.full((experts, n), k ** -0.5, device="cuda"), None)
    group = 128
    packed = torch.randint(-2 ** 31, 2 ** 31 - 1, (experts, k // 8, n), device="cuda", dtype=torch.int32)
    scales = torch.full((experts, k // group, n), 0.1 * k ** -0.5, device="cuda", dtype=DTYPE)
    return QuantExperts(packed, scales, torch.full_like(scales, 8.0), group, 4)


def _bytes(tensors) -> int:
    if isinstance(tensors, QuantExperts):
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return tensors.numel() * tensors.element_size()


def _bench_shape(name, token_counts, bandwidth, matmul, sweep, no_torch, weights):
    hidden, inter, experts, top_k, renormalize = SHAPES[name]
    w13 = _random_experts(experts, 2 * inter, hidden, weights)
    w2 = _random_experts(experts, hidden, inter, weights)
    expert_bytes = (_bytes(w13) + _bytes(w2)) / experts
    print(f"\n{name} ({weights} experts): hidden {hidden}, expert intermediate {inter}, {experts} experts, "
          f"top-{top_k}; one expert {expert_bytes / 1e6:.1f} MB")
    print(f"{'tokens':>6} {'experts':>8} {'MB read':>8} {'floor us':>9} {'kernel us':>10} {'of floor':>9} "
          f"{'torch loop us':>14} {'speed-up':>9}  tiles")
    for m in token_counts:
        xs = [torch.randn(m, hidden, device="cuda", dtype=DTYPE) for _ in range(ROUTINGS)]
        logits = [torch.randn(m, experts, device="cuda", dtype=DTYPE) for _ in range(ROUTINGS)]
        used = sum(select_experts(l, top_k, renormalize)[1].unique().numel() for l in logits) / ROUTINGS
        read = used * expert_bytes + 2 * m * hidden * xs[0].element_size()
        floor = max(read / bandwidth, 6 * m * top_k * hidden * inter / matmul)
        # The dispatcher's tiles; where a tuned file (kernels/moe_configs/) chose them, the table's row after.
        if weights == "bf16":
            chosen = moe_tiles(m, top_k, experts, inter, hidden, DTYPE, xs[0].device)
            table = table_tiles(moe_config(m, top_k, experts), m, top_k, experts, 2 * inter, hidden, DTYPE)
        else:
            chosen = table = quant_moe_tiles(m, top_k, experts, 2 * inter, hidden)
        labels = {None: _tiles_label("tuned" if chosen != table else "table", chosen)}
        if chosen != table:
            labels[table] = _tiles_label("table", table)
        configs = list(labels) + (list(MOE_CONFIGS) if sweep and weights == "bf16" else [])
        for config in configs:
            def run(config=config):
                for x, l in zip(xs, logits):
                    fused_moe_triton(x, w13, w2, l, top_k, renormalize, config)
            ours = do_bench_cudagraph(run) / ROUTINGS * 1e-3
            label = labels.get(config) or str(config[1:])
            loop = f"{'':14} {'':9}"
            if config is None and not no_torch:
                ref = do_bench(lambda: fused_moe_ref(xs[0], w13, w2, logits[0], top_k, renormalize)) * 1e-3
                loop = f"{ref * 1e6:14.1f} {ref / ours:8.1f}x"
            print(f"{m:6d} {used:8.1f} {read / 1e6:8.1f} {floor * 1e6:9.1f} {ours * 1e6:10.1f} "
                  f"{floor / ours * 100:8.0f}% {loop}  {label}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), nargs="*", default=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64, 128, 512, 4096])
    parser.add_argument("--sweep", action="store_true", help="also time every row of MOE_CONFIGS (made concrete "
                        "per batch as the table's rows are)")
    parser.add_argument("--no-torch", action="store_true", help="skip the per-expert torch loop")
    parser.add_argument("--weights", choices=("bf16", "int4", "fp8"), nargs="*", default=["bf16"],
                        help="the experts' format: bf16, or quantized (int4 group 128, FP8 per channel)")
    args = parser.parse_args()
    bandwidth, matmul = measure_bandwidth(), measure_matmul_rate()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s, "
          f"bf16 matmul {matmul / 1e12:.0f} TFLOP/s")
    for name in args.shape:
        for weights in args.weights:
            _bench_shape(name, args.tokens, bandwidth, matmul, args.sweep, args.no_torch, weights)
            torch.cuda.empty_cache()  # the shape's weights went with the call


if __name__ == "__main__":
    main()
