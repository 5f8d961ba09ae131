"""Memory sharing on the GPU: time to first token with a long shared prefix (cached vs not), and
parallel sampling (n = 4) against four separate requests.

    python scripts/bench_sharing.py --model llama-3.1-8b
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

from bench_common import random_prompts, resolve_model


def _ttft(llm, prompt_ids) -> float:
    from asyncserve import SamplingParams
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompt_ids}], SamplingParams(temperature=0.0, max_tokens=1),
                 use_tqdm=False)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def prefix_ttft(llm, vocab, prefix_len, suffix_len):
    prefix, *suffixes = random_prompts(4, [prefix_len] + [suffix_len] * 3, vocab, seed=1)
    _ttft(llm, random_prompts(1, [prefix_len + suffix_len], vocab, seed=2)[0])  # warm-up
    cold = _ttft(llm, prefix + suffixes[0])
    warm = [_ttft(llm, prefix + suffix) for suffix in suffixes[1:]]
    return cold, min(warm)


def parallel_sampling(llm, vocab, num_prompts, prompt_len, output_len):
    from asyncserve import SamplingParams
    prompts = [{"prompt_token_ids": p} for p in random_prompts(num_prompts, [prompt_len] * num_prompts, vocab)]
    results = {}
    for label, batch, params in (
            ("n=4", prompts, SamplingParams(n=4, temperature=1.0, max_tokens=output_len, ignore_eos=True)),
            ("4 separate", [p for p in prompts for _ in range(4)],
             SamplingParams(temperature=1.0, max_tokens=output_len, ignore_eos=True))):
        engine = llm.llm_engine
        peak = [0]
        step = engine.step

        def tracked():
            outputs = step()
            peak[0] = max(peak[0], engine.block_pool.num_blocks - engine.block_pool.num_free_blocks)
            return outputs
        engine.step = tracked
        torch.cuda.synchronize()
        start = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        engine.step = step
        generated = sum(len(c.token_ids) for o in outs for c in o.outputs)
        results[label] = (seconds, generated / seconds, peak[0])
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--prefix-len", type=int, default=2000)
    parser.add_argument("--suffix-len", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from asyncserve import LLM
    path, load_format = resolve_model(args.model)
    llm = LLM(path, load_format=load_format, skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=4096, max_num_seqs=256, enable_prefix_caching=True, gpu_memory_utilization=0.9)
    vocab = llm.llm_engine.model_config.vocab_size
    cold, warm = prefix_ttft(llm, vocab, args.prefix_len, args.suffix_len)
    print(f"model {args.model} | {torch.cuda.get_device_name()}")
    print(f"TTFT, {args.prefix_len}-token shared prefix + {args.suffix_len} new tokens: not cached "
          f"{cold * 1e3:.1f} ms, cached {warm * 1e3:.1f} ms ({cold / warm:.1f}x)")
    llm.llm_engine.block_pool.enable_caching = False  # sharing below comes from fork + copy-on-write only
    for label, (seconds, rate, peak) in parallel_sampling(llm, vocab, 64, 512, 128).items():
        print(f"{label:>10}: 64 prompts x 4 samples, 512 in / 128 out: {seconds:.2f} s, {rate:,.0f} output "
              f"tokens/s, peak KV blocks {peak}")


if __name__ == "__main__":
    main()
