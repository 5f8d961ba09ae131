"""Offline throughput: N requests with random prompt lengths and a fixed output length (ignore_eos),
next to the compute floor and transformers, in one run.

    python scripts/bench_throughput.py --model llama-3.1-8b --num-prompts 512 --input-len-range 255 765 --output-len 128
    python scripts/bench_throughput.py --model opt-1.3b --num-prompts 512     # OPT-1.3B shape (max_model_len 2048)

`--kv-cache-dtype fp8` runs the same workload over an e4m3 KV pool (twice the tokens in the same memory);
the KV token capacity is printed either way.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import time

import torch
from bench_common import (
    active_params,
    free_cuda,
    hf_model,
    measure_matmul_rate,
    random_prompts,
    resolve_model,
    vocab_size,
)


def bench_ours(path, load_format, prompts, args):
    from asyncserve import LLM, SamplingParams
    started = time.perf_counter()
    llm = LLM(path, load_format=load_format, skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=args.input_len_range[1] + args.output_len + 16, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              enable_chunked_prefill=not args.no_chunked_prefill,
              enable_prefix_caching=False, gpu_memory_utilization=args.gpu_memory_utilization,
              enforce_eager=args.enforce_eager, kv_cache_dtype=args.kv_cache_dtype)
    startup = time.perf_counter() - started
    kv_tokens = llm.llm_engine.block_pool.num_blocks * llm.llm_engine.config.cache.block_size
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:8]], params, use_tqdm=False)  # warm-up
    waste = _WasteSampler(llm.llm_engine)
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    params_count = active_params(llm.llm_engine.executor.runner.model)  # MoE: top-k experts per token
    waste.detach()
    return startup, seconds, generated, params_count, waste.mean(), kv_tokens


class _WasteSampler:
    """KV slots allocated but holding no token, sampled after every step."""

    def __init__(self, engine):
        self.engine, self.samples = engine, []
        self._step = engine.step
        block_size = engine.config.cache.block_size

        def step():
            outputs = self._step()
            seqs = [s for s in engine.scheduler.running]
            allocated = sum(len(s.block_table) for s in seqs) * block_size
            if allocated:
                used = sum(s.num_computed_tokens for s in seqs)
                self.samples.append(1 - used / allocated)
            return outputs
        engine.step = step

    def detach(self):
        self.engine.step = self._step

    def mean(self):
        return sum(self.samples) / max(1, len(self.samples))


def bench_hf(path, prompts, output_len):
    from transformers import GenerationConfig
    model = hf_model(path)
    config = GenerationConfig(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    start = time.perf_counter()
    try:
        outputs = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
        torch.cuda.synchronize()
        generated = sum(len(o.generated_tokens) for o in outputs.values())
        how = "generate_batch (continuous batching)"
    except Exception as exc:  # older/newer transformers: padded static batches instead
        print(f"transformers generate_batch failed ({type(exc).__name__}: {exc}); using padded generate")
        start = time.perf_counter()
        generated = 0
        for i in range(0, len(prompts), 64):
            chunk = prompts[i:i + 64]
            width = max(map(len, chunk))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device="cuda")
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device="cuda")
            out = model.generate(ids, attention_mask=mask, generation_config=config)
            generated += (out.shape[1] - width) * len(chunk)
        torch.cuda.synchronize()
        how = "generate, padded batches of 64"
    seconds = time.perf_counter() - start
    return seconds, generated, how


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--input-len-range", type=int, nargs=2, default=[255, 765])
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--no-chunked-prefill", action="store_true")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--kv-cache-dtype", default="auto", help="'auto' (bf16) or 'fp8' (e4m3 KV pool)")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--hf-num-prompts", type=int, default=128,
                        help="the baseline runs on the first N prompts only (it is slow)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the figures here (scripts/bench_grid.py reads it)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path, load_format = resolve_model(args.model)
    vocab = vocab_size(path)
    rng = random.Random(args.seed)
    lengths = [rng.randint(*args.input_len_range) for _ in range(args.num_prompts)]
    prompts = random_prompts(args.num_prompts, lengths, vocab, args.seed)
    matmul = measure_matmul_rate()
    hf = None
    if not args.no_hf:  # first, so that its memory is back before our KV pool takes the rest
        subset = prompts[:args.hf_num_prompts]
        hf = bench_hf(path, subset, args.output_len) + (sum(map(len, subset)), len(subset))
        free_cuda()
    startup, seconds, generated, params, waste, kv_tokens = bench_ours(path, load_format, prompts, args)
    prompt_tokens = sum(lengths)
    total = prompt_tokens + generated
    floor = 2 * params * total / matmul  # linear layers (MoE: the top-k experts) only; attention adds a little
    print(f"model {args.model} | {args.num_prompts} requests, prompts {args.input_len_range[0]}.."
          f"{args.input_len_range[1]}, {args.output_len} out | chunked prefill "
          f"{'off' if args.no_chunked_prefill else 'on'} | {torch.cuda.get_device_name()}")
    print(f"bf16 matmul measured: {matmul / 1e12:.0f} TFLOP/s -> compute floor {floor:.2f} s "
          f"({total / floor:,.0f} tokens/s)")
    print(f"asyncserve: startup {startup:.1f} s; {seconds:.2f} s: {args.num_prompts / seconds:.2f} req/s, "
          f"{total / seconds:,.0f} total tokens/s, {generated / seconds:,.0f} output tokens/s "
          f"({floor / seconds * 100:.0f}% of the compute floor); KV waste {waste * 100:.2f}%")
    print(f"KV cache ({args.kv_cache_dtype}): {kv_tokens:,} tokens")
    if args.json:
        figures = {"model": args.model, "num_prompts": args.num_prompts, "input_len_range": args.input_len_range,
                   "output_len": args.output_len, "device": torch.cuda.get_device_name(), "startup_s": startup,
                   "seconds": seconds, "prompt_tokens": prompt_tokens, "output_tokens": generated,
                   "request_throughput": args.num_prompts / seconds, "total_token_throughput": total / seconds,
                   "output_throughput": generated / seconds, "matmul_TFLOPs": matmul / 1e12,
                   "compute_floor_s": floor, "fraction_of_compute_floor": floor / seconds, "kv_waste": waste,
                   "kv_cache_dtype": args.kv_cache_dtype, "kv_cache_tokens": kv_tokens}
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    if hf is not None:
        hf_seconds, hf_generated, how, hf_prompt_tokens, hf_requests = hf
        hf_total = hf_prompt_tokens + hf_generated
        how += f", first {hf_requests} requests"
        print(f"transformers [{how}]: {hf_seconds:.2f} s: {hf_total / hf_seconds:,.0f} total tokens/s "
              f"-> asyncserve is {(total / seconds) / (hf_total / hf_seconds):.1f}x faster")


if __name__ == "__main__":
    main()
