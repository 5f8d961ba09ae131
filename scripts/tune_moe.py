"""Tunes the fused MoE kernel's tiles per token count on this GPU and writes them where the kernel looks for
them (kernels/moe_configs/, one file per experts / intermediate size / GPU, named as vLLM names its configs).

    python scripts/tune_moe.py --model qwen3-30b-a3b                        # about 2 min on one H100
    python scripts/tune_moe.py --model qwen3-30b-a3b gpt-oss-20b --space small
    python scripts/tune_moe.py --experts 128 --hidden 2048 --intermediate 768 --top-k 8 --tokens 1 2 4

Per token count: random routing (the softmax top-k of random logits, through the kernel's own routing and
align step), then each grouped GEMM (w13 gate|up, w2 down) timed alone, as fused_moe_triton launches it,
for every candidate tiles of the search space (do_bench clears the L2 before each run, as a layer meets its
experts' weights). The two GEMMs share BLOCK_M (one align step pads for both) but are chosen apart otherwise,
since their N and K differ ([2I x H] and [H x I]). The fastest pair is run whole against the torch reference
before it is kept; a wrong one is reported and the next fastest is checked. Entries of an existing file for
other token counts are kept. The candidates come from moe_tile_space.py; moe_precompile.py compiles them in
worker processes first.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import time
from dataclasses import dataclass

import torch

from asyncserve.kernels.moe import (
    fused_moe_ref,
    fused_moe_triton,
    moe_align_block_size_triton,
    moe_gemm,
    select_experts_triton,
)
from asyncserve.kernels.moe_tiles import MoeTiles
from asyncserve.kernels.moe_tuned import (
    CONFIG_DIR,
    config_file_name,
    cuda_device_name,
    read_tuned_configs,
    write_tuned_configs,
)
from moe_precompile import precompile  # scripts/ beside this file, as bench_moe.py imports bench_common
from moe_tile_space import SPACES, MoeShape, candidate_tiles, rows_per_expert, shape_from_config

TOKEN_COUNTS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 8192)
RIVALS = 3  # per GEMM and BLOCK_M, the fastest this many enter the pairs checked against the reference
# The previous token count's tiles are kept where they are this close to the fastest: fewer distinct kernels
# for the server to compile at start-up (each is a Triton compile) for a difference within timing noise.
REUSE_SLACK = 0.03


@dataclass
class Layer:
    """Random weights of one shape, and their float32 copies for the reference."""

    shape: MoeShape
    w13: torch.Tensor
    w2: torch.Tensor
    w13_ref: torch.Tensor
    w2_ref: torch.Tensor

    @classmethod
    def random(cls, shape, dtype, device, seed=0):
        gen = torch.Generator(device=device).manual_seed(seed)
        e, h, i = shape.num_experts, shape.hidden, shape.intermediate
        w13 = (torch.randn(e, 2 * i, h, generator=gen, device=device) * h ** -0.5).to(dtype)
        w2 = (torch.randn(e, h, i, generator=gen, device=device) * i ** -0.5).to(dtype)
        return cls(shape, w13, w2, w13.float(), w2.float())


def is_correct(moe_fn, layer, x, logits, tiles):
    """The whole MoE with `tiles` against the float32 torch reference, by the GPU tests' tolerances."""
    out = moe_fn(x, layer.w13, layer.w2, logits, layer.shape.top_k, True, tiles).float()
    expected = fused_moe_ref(x.float(), layer.w13_ref, layer.w2_ref, logits, layer.shape.top_k, True)
    if not torch.isfinite(out).all():
        return False
    tolerance = 1e-4 if x.dtype == torch.float32 else 3e-2
    relative = (out - expected).norm() / expected.norm().clamp_min(1e-30)
    return bool(relative < tolerance / 3 and (out - expected).abs().max() <= tolerance * expected.abs().max())


def time_candidates(layer, num_tokens, candidates, time_fn, log, seed):
    """{gemm: [(seconds, tiles), ...]} for each gemm's candidate tiles; tiles that fail to launch are
    left out (with a line)."""
    shape = layer.shape
    device, dtype = layer.w13.device, layer.w13.dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(num_tokens, shape.hidden, generator=gen, device=device).to(dtype)
    logits = torch.randn(num_tokens, shape.num_experts, generator=gen, device=device).to(dtype)
    weights, ids = select_experts_triton(logits, shape.top_k, True)
    entries = num_tokens * shape.top_k
    gate_up = torch.empty(entries, 2 * shape.intermediate, dtype=dtype, device=device)
    activated = torch.randn(entries, shape.intermediate, generator=gen, device=device).to(dtype)
    down = torch.empty(entries, shape.hidden, dtype=dtype, device=device)
    operands = {"w13": (x, layer.w13, gate_up, shape.top_k, False), "w2": (activated, layer.w2, down, 1, True)}
    aligned = {}
    timings = {"w13": [], "w2": []}
    for gemm, tiles_list in candidates.items():
        a, b, out, top_k, mul_weight = operands[gemm]
        for tiles in tiles_list:
            if tiles.block_m not in aligned:
                aligned[tiles.block_m] = moe_align_block_size_triton(ids, shape.num_experts, tiles.block_m)

            def launch(tiles=tiles, a=a, b=b, out=out, top_k=top_k, mul_weight=mul_weight):
                moe_gemm(a, b, None, out, weights, *aligned[tiles.block_m], top_k, mul_weight, tiles)

            try:
                seconds = time_fn(launch, gemm=gemm, tiles=tiles, num_tokens=num_tokens)
            except Exception as error:  # e.g. Triton's OutOfResources for a tile the pruning let through
                log(f"    {gemm} {tuple(tiles)} skipped: {type(error).__name__}: {str(error)[:120]}")
                continue
            timings[gemm].append((seconds, tiles))
    return x, logits, timings


def ranked_pairs(timings):
    """(w13 seconds + w2 seconds, MoeTiles) of the same BLOCK_M, fastest first: each GEMM's RIVALS
    fastest per BLOCK_M, paired."""
    pairs = []
    for block_m in sorted({tiles.block_m for _, tiles in timings["w13"]}):
        fastest = {gemm: sorted((t for t in timings[gemm] if t[1].block_m == block_m), key=lambda t: t[0])[:RIVALS]
                   for gemm in ("w13", "w2")}
        for (t13, tiles13), (t2, tiles2) in itertools.product(fastest["w13"], fastest["w2"]):
            pairs.append((t13 + t2, MoeTiles(tiles13, tiles2)))
    return sorted(pairs, key=lambda pair: pair[0])


def with_reuse(pairs, timings, previous, slack=REUSE_SLACK):
    """`pairs` with `previous` (the last token count's tiles) first if both its GEMMs were timed here and
    their sum is within `slack` of the fastest pair's."""
    if previous is None or not pairs:
        return pairs
    seconds = {gemm: dict((tiles, t) for t, tiles in timings[gemm]) for gemm in timings}
    if previous.w13 not in seconds["w13"] or previous.w2 not in seconds["w2"]:
        return pairs
    total = seconds["w13"][previous.w13] + seconds["w2"][previous.w2]
    if total > pairs[0][0] * (1 + slack):
        return pairs
    return [(total, previous)] + [pair for pair in pairs if pair[1] != previous]


def tune_token_count(layer, num_tokens, *, space, shared_memory, time_fn, moe_fn=fused_moe_triton, log=print,
                     seed=0, previous=None):
    """The fastest MoeTiles for `num_tokens` that the reference confirms (`previous` where it is within
    REUSE_SLACK of the fastest), or None if none is confirmed."""
    shape = layer.shape
    candidates = candidate_tiles(shape, num_tokens, layer.w13.dtype, shared_memory, space)
    table = MoeTiles(candidates["w13"][0], candidates["w2"][0])
    x, logits, timings = time_candidates(layer, num_tokens, candidates, time_fn, log, seed + num_tokens)
    table_seconds = sum(next((s for s, t in timings[gemm] if t == getattr(table, gemm)), math.nan)
                        for gemm in timings)
    rows = rows_per_expert(num_tokens, shape.top_k, shape.num_experts)
    for seconds, tiles in with_reuse(ranked_pairs(timings), timings, previous):
        if not is_correct(moe_fn, layer, x, logits, tiles):
            log(f"  {num_tokens:5d} tokens: REJECTED {_label(tiles)}: differs from the reference")
            continue
        best = {gemm: next(s for s, t in timings[gemm] if t == getattr(tiles, gemm)) for gemm in timings}
        log(f"  {num_tokens:5d} tokens ({rows:6.1f} rows/expert, {len(candidates['w13'])}+"
            f"{len(candidates['w2'])} tiles): w13 {best['w13'] * 1e6:8.1f} us + w2 {best['w2'] * 1e6:8.1f} us;  "
            f"table {table_seconds * 1e6:8.1f} us -> {seconds * 1e6:8.1f} us ({table_seconds / seconds:4.2f}x)  "
            f"{_label(tiles)}")
        return tiles
    log(f"  {num_tokens:5d} tokens: no tiles matched the reference; left out of the file")
    return None


def _label(tiles):
    return f"w13 {tuple(tiles.w13)} w2 {tuple(tiles.w2)}"


def tune_shape(shape, token_counts, *, dtype, device, space, shared_memory, time_fn, moe_fn=fused_moe_triton,
               log=print, compile_jobs=0, save=None):
    """{token count: MoeTiles} for one layer shape, each confirmed against the reference; `compile_jobs`
    processes compile every candidate first (CUDA only); `save` gets the entries so far after each count
    (a run cut short keeps what it tuned)."""
    if compile_jobs:
        every = {"w13": set(), "w2": set()}
        for num_tokens in token_counts:
            for gemm, tiles_list in candidate_tiles(shape, num_tokens, dtype, shared_memory, space).items():
                every[gemm].update(tiles_list)
        precompile(shape, dtype, every, compile_jobs, log)
    layer = Layer.random(shape, dtype, device)
    tuned, previous = {}, None
    for num_tokens in token_counts:
        tiles = tune_token_count(layer, num_tokens, space=space, shared_memory=shared_memory, time_fn=time_fn,
                                 moe_fn=moe_fn, log=log, previous=previous)
        previous = tiles or previous
        if tiles is not None:
            tuned[num_tokens] = tiles
            if save is not None:
                save(tuned)
    return tuned


def write_merged(path, tuned):
    """Writes `tuned` into the file at `path`, keeping its entries for other token counts."""
    merged = read_tuned_configs(path) if os.path.exists(path) else {}
    merged.update(tuned)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_tuned_configs(path, merged)


def gpu_timer(warmup_ms, rep_ms):
    """Median seconds of a launch by triton's do_bench (which clears the L2 before every run)."""
    from triton.testing import do_bench

    def time_fn(launch, **_):
        return do_bench(launch, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e-3
    return time_fn


def shared_memory_of(device):
    properties = torch.cuda.get_device_properties(device)
    return getattr(properties, "shared_memory_per_block_optin", 227 * 1024)


def shapes_from_args(args):
    if args.experts:
        return [MoeShape("explicit", args.experts, args.hidden, args.intermediate // args.tp, args.top_k)]
    from bench_models import load_config  # noqa: I001 (scripts/ is on sys.path when this runs as a script)
    return [shape_from_config(name, load_config(name), args.tp) for name in args.model]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="*", default=["qwen3-30b-a3b"],
                        help="names under scripts/model_configs, or config.json paths")
    parser.add_argument("--experts", type=int, help="an explicit shape instead of --model: E")
    parser.add_argument("--hidden", type=int, help="H")
    parser.add_argument("--intermediate", type=int, help="one expert's intermediate size I (before --tp)")
    parser.add_argument("--top-k", type=int, help="experts per token")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks: tunes I / tp")
    parser.add_argument("--tokens", type=int, nargs="*", default=list(TOKEN_COUNTS))
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--space", choices=sorted(SPACES), default="small",
                        help="search-space size; estimates for one H100 and a model, compiling in parallel "
                        "(kernels; timings): tiny ~1 min (70; 500), small ~2 (560; 3,100), medium ~4 (1,200; "
                        "6,000), large ~8 (2,200; 11,000); without --compile-jobs add ~1 s a kernel")
    parser.add_argument("--warmup-ms", type=float, default=1.0)
    parser.add_argument("--rep-ms", type=float, default=6.0, help="do_bench's time per candidate")
    parser.add_argument("--compile-jobs", type=int, default=min(16, os.cpu_count() or 1),
                        help="processes that compile the candidates first (0: compile while timing)")
    parser.add_argument("--out-dir", default=CONFIG_DIR, help="where the files go (default: the package's)")
    args = parser.parse_args()
    if args.experts and not (args.hidden and args.intermediate and args.top_k):
        parser.error("--experts needs --hidden, --intermediate and --top-k")
    device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype)
    device_name = cuda_device_name(device)
    shared_memory = shared_memory_of(device)
    time_fn = gpu_timer(args.warmup_ms, args.rep_ms)
    for shape in shapes_from_args(args):
        start = time.perf_counter()
        print(f"{shape.name}: E={shape.num_experts} H={shape.hidden} I={shape.intermediate} top-{shape.top_k}, "
              f"{args.dtype}, {device_name}, space {args.space}, {shared_memory // 1024} KiB shared memory",
              flush=True)
        path = os.path.join(args.out_dir, config_file_name(shape.num_experts, shape.intermediate, device_name, dtype))
        tuned = tune_shape(shape, args.tokens, dtype=dtype, device=device, space=args.space,
                           shared_memory=shared_memory, time_fn=time_fn,
                           log=lambda line: print(line, flush=True), compile_jobs=args.compile_jobs,
                           save=lambda tuned, path=path: write_merged(path, tuned))
        print(f"{shape.name}: {len(tuned)} token counts in {time.perf_counter() - start:.0f} s -> {path}", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
