"""Batch-1 (or batch-B) decode latency next to the weight-read floor and transformers, in one run.

    python scripts/bench_latency.py --model llama-3.1-8b        # dummy weights, real shapes
    python scripts/bench_latency.py --model /path/to/checkpoint --no-hf
    python scripts/bench_latency.py --model mixtral-8x7b-2layer --no-hf   # MoE: floor = experts read per step
"""
from __future__ import annotations

import argparse
import json
import logging
import time

import torch
from bench_common import (
    decode_bytes_per_step,
    free_cuda,
    hf_model,
    measure_bandwidth,
    random_prompts,
    resolve_model,
    vocab_size,
    weight_bytes,
)


def _timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def bench_ours(path, load_format, prompts, output_len, args):
    from asyncserve import LLM, SamplingParams
    started = time.perf_counter()
    llm = LLM(path, load_format=load_format, skip_tokenizer_init=True, dtype="bfloat16",
              enable_prefix_caching=False,  # repeats send the same prompt: TTFT must be a real prefill, as vLLM's
              max_model_len=args.input_len + output_len + 16, max_num_seqs=max(8, args.batch_size),
              gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager)
    startup = time.perf_counter() - started
    batch = [{"prompt_token_ids": p} for p in prompts]

    def run(n):
        return lambda: llm.generate(batch, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
                                    use_tqdm=False)
    run(output_len)()  # warm-up (Triton compiles prefill shapes)
    full, first = _timed(run(output_len), args.repeats), _timed(run(1), args.repeats)
    per_token = (full - first) / (output_len - 1)
    model = llm.llm_engine.executor.runner.model
    return startup, per_token, first, weight_bytes(model), decode_bytes_per_step(model, args.batch_size)


def bench_hf(path, prompts, output_len, repeats):
    model = hf_model(path)
    ids = torch.tensor(prompts, device="cuda")

    def run(n):
        return lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=0)
    run(4)()
    full, first = _timed(run(output_len), repeats), _timed(run(1), repeats)
    return (full - first) / (output_len - 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--hf-output-len", type=int, default=32, help="tokens for the (slow) baseline")
    parser.add_argument("--json", default=None, help="also write the figures here (scripts/bench_grid.py reads it)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path, load_format = resolve_model(args.model)
    bandwidth = measure_bandwidth()
    vocab = vocab_size(path)
    prompts = random_prompts(args.batch_size, [args.input_len] * args.batch_size, vocab)
    hf = None
    if not args.no_hf:  # first, so that its memory is back before our KV pool takes the rest
        hf = bench_hf(path, prompts, args.hf_output_len, 1)
        free_cuda()
    startup, per_token, first, weights, read = bench_ours(path, load_format, prompts, args.output_len, args)
    floor = read / bandwidth  # MoE: only the experts a step routes to are read
    print(f"model {args.model} | batch {args.batch_size} | input {args.input_len} | output {args.output_len} "
          f"| {torch.cuda.get_device_name()}")
    experts = (f" of which a step reads {read / 1e9:.2f} GB (MoE: attention, embeddings, LM head and the "
               f"experts routed to)" if read != weights else "")
    print(f"copy bandwidth measured: {bandwidth / 1e12:.2f} TB/s; weights {weights / 1e9:.2f} GB{experts} "
          f"-> floor {floor * 1e3:.2f} ms/step ({1 / floor:.0f} steps/s)")
    print(f"asyncserve: startup {startup:.1f} s; decode {per_token * 1e3:.2f} ms/step = "
          f"{args.batch_size / per_token:.1f} tokens/s ({floor / per_token * 100:.0f}% of the floor); "
          f"TTFT {first * 1e3:.1f} ms ({args.input_len}-token prompt)")
    if args.json:
        figures = {"model": args.model, "batch_size": args.batch_size, "input_len": args.input_len,
                   "output_len": args.output_len, "device": torch.cuda.get_device_name(), "startup_s": startup,
                   "ms_per_step": per_token * 1e3, "tokens_per_s": args.batch_size / per_token, "ttft_ms": first * 1e3,
                   "bandwidth_TBps": bandwidth / 1e12, "weight_GB": weights / 1e9,
                   "read_GB_per_step": read / 1e9, "floor_ms": floor * 1e3,
                   "fraction_of_floor": floor / per_token, "hf_ms_per_step": hf * 1e3 if hf else None}
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    if hf is not None:
        print(f"transformers: decode {hf * 1e3:.2f} ms/step = {args.batch_size / hf:.1f} tokens/s "
              f"-> asyncserve is {hf / per_token:.1f}x faster")


if __name__ == "__main__":
    main()
