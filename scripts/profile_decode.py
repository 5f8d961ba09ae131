"""Where a decode step's time goes: GPU time of the graph alone vs the whole engine step, top kernels.

    python scripts/profile_decode.py --model qwen2.5-0.5b --batch-size 1
"""
from __future__ import annotations

import argparse
import time

import torch

from bench_common import random_prompts, resolve_model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--context", type=int, default=128)
    args = parser.parse_args()
    from asyncserve import LLM, SamplingParams
    path, load_format = resolve_model(args.model)
    llm = LLM(path, load_format=load_format, skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=args.context + 160, max_num_seqs=max(8, args.batch_size),
              gpu_memory_utilization=0.5)
    engine = llm.llm_engine
    runner = engine.executor.runner
    vocab = engine.model_config.vocab_size
    for i, prompt in enumerate(random_prompts(args.batch_size, [args.context] * args.batch_size, vocab)):
        engine.add_request(str(i), engine.input_processor.process({"prompt_token_ids": prompt},
                           SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True)))
    for _ in range(5):  # prefill, then a few decodes
        engine.step()
    graphs = runner.decode_graphs
    padded = graphs.padded_size(args.batch_size)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(50):
        graphs.graphs[padded].replay()
    torch.cuda.synchronize()
    replay = (time.perf_counter() - start) / 50
    start = time.perf_counter()
    for _ in range(50):
        engine.step()
    step = (time.perf_counter() - start) / 50
    print(f"{args.model} batch {args.batch_size}: graph replay {replay * 1e3:.3f} ms (GPU), "
          f"engine step {step * 1e3:.3f} ms -> host work on the critical path {(step - replay) * 1e3:.3f} ms")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine.step()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
