"""LoRA's kernels alone at the 8B projection shapes (GPU): the base GEMM, then the base GEMM plus the per-row
shrink and expand (kernels/lora.py) and plus the grouped ones (kernels/lora_grouped.py), each captured in a
CUDA graph as the decode graphs run them, at the batch sizes of issue 25's figures.

    python scripts/bench_lora_kernels.py [--rows 1 64] [--adapters 8] [--rank 16]

Prints per projection and for one whole layer the microseconds of each variant and the cost of the adapters
relative to the base GEMM; the floor beside them is the base weight read once at the card's bandwidth.
"""

import argparse
import json

import torch

from asyncserve.kernels.lora import lora_expand_triton, lora_shrink_triton, prepare_lora_tables
from asyncserve.kernels.lora_grouped import lora_expand_grouped, lora_shrink_grouped, lora_slot_groups

# Llama-3.1-8B: (name, K, output slices)
PROJECTIONS = (("qkv_proj", 4096, (4096, 1024, 1024)), ("o_proj", 4096, (4096,)),
               ("gate_up_proj", 4096, (14336, 14336)), ("down_proj", 14336, (4096,)))


def graph_time_us(fn, replays: int = 200) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(5):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / replays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    bandwidth = {"H100": 3.35e12, "H200": 4.8e12}
    name = torch.cuda.get_device_name()
    card_bw = next((bw for key, bw in bandwidth.items() if key in name), 3.35e12)
    print(f"{name}; {args.adapters} adapters of rank {args.rank}; bf16; times in us per projection (CUDA graph)")
    results = []
    for rows in args.rows:
        totals = {"base": 0.0, "per_row": 0.0, "grouped": 0.0}
        for proj, k, widths in PROJECTIONS:
            n = sum(widths)
            weight = torch.randn(n, k, device=device, dtype=dtype) * 0.02
            a_slices = [torch.randn(args.adapters, args.rank, k, device=device, dtype=dtype) * 0.02 for _ in widths]
            b_slices = [torch.randn(args.adapters, w, args.rank, device=device, dtype=dtype) * 0.02 for w in widths]
            offsets = [sum(widths[:i]) for i in range(len(widths))]
            prepare_lora_tables(a_slices, b_slices, offsets)
            x = torch.randn(rows, k, device=device, dtype=dtype)
            out = torch.empty(rows, n, device=device, dtype=dtype)
            slots = (torch.arange(rows, device=device) % args.adapters).to(torch.int32)
            scales = torch.ones(args.adapters, device=device, dtype=torch.float32)
            order = torch.zeros(rows, dtype=torch.int32, device=device)
            starts = torch.zeros(args.adapters, dtype=torch.int32, device=device)
            counts = torch.zeros(args.adapters, dtype=torch.int32, device=device)
            lora_slot_groups(slots, args.adapters, order, starts, counts)

            def base():
                torch.matmul(x, weight.t(), out=out)

            def per_row():
                base()
                lora_expand_triton(lora_shrink_triton(x, a_slices, slots), b_slices, slots, scales, out, offsets)

            def grouped():
                base()
                y = lora_shrink_grouped(x, a_slices, order, starts, counts)
                lora_expand_grouped(y, b_slices, order, starts, counts, scales, out, offsets)

            # Both variants agree with each other before they are timed.
            per_row(); expected = out.clone(); grouped()
            err = (out.float() - expected.float()).abs().max().item()
            row = {"rows": rows, "projection": proj, "k": k, "n": n,
                   "floor_us": weight.numel() * 2 / card_bw * 1e6, "max_abs_diff": err}
            for variant, fn in (("base", base), ("per_row", per_row), ("grouped", grouped)):
                row[variant] = graph_time_us(fn)
                totals[variant] += row[variant]
            results.append(row)
            print(f"rows {rows:3d} {proj:13s} floor {row['floor_us']:7.1f}  base {row['base']:7.1f}  "
                  f"+per-row {row['per_row']:7.1f} ({row['base'] / row['per_row']:.2f}x)  "
                  f"+grouped {row['grouped']:7.1f} ({row['base'] / row['grouped']:.2f}x)  diff {err:.3g}")
            del weight, a_slices, b_slices
        print(f"rows {rows:3d} one layer: base {totals['base']:.1f} us; with adapters per-row "
              f"{totals['per_row']:.1f} ({totals['base'] / totals['per_row']:.2f}x), grouped {totals['grouped']:.1f} "
              f"({totals['base'] / totals['grouped']:.2f}x)")
        results.append({"rows": rows, "projection": "layer", **totals})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
