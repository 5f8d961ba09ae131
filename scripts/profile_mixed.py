"""Where a mixed step's time goes (decodes + a prefill chunk): the host's launch time next to
the GPU's time, and the ops that cost the host most. Explains a server slower than its GPU at concurrency.

    python scripts/profile_mixed.py --model llama-3.1-8b --num-decodes 64 --prefill-len 512
"""
from __future__ import annotations

import argparse
import time

import torch

from bench_common import random_prompts, resolve_model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--num-decodes", type=int, default=64)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-cudagraph-capture-size", type=int, default=None,
                        help="0: mixed steps run eagerly (the figure before mixed-step graphs)")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    from asyncserve import LLM, SamplingParams
    path, load_format = resolve_model(args.model)
    llm = LLM(path, load_format=load_format, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=2048,
              max_num_seqs=256, gpu_memory_utilization=0.8,
              max_cudagraph_capture_size=args.max_cudagraph_capture_size)
    engine = llm.llm_engine
    runner = engine.executor.runner
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)
    for i, prompt in enumerate(random_prompts(args.num_decodes, [64] * args.num_decodes, vocab)):
        engine.add_request(f"d{i}", engine.input_processor.process({"prompt_token_ids": prompt}, params))
    for _ in range(4):
        engine.step()
    engine.drain()
    new = iter(random_prompts(1000, [args.prefill_len] * 1000, vocab))

    def mixed_step(i):
        engine.add_request(f"p{i}", engine.input_processor.process({"prompt_token_ids": next(new)}, SamplingParams(max_tokens=1)))
        message, scheduled = engine.schedule()
        torch.cuda.synchronize()
        start = time.perf_counter()
        gpu_start, gpu_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(runner.stream):
            torch.cuda._sleep(100_000_000)  # keeps the GPU busy while the host queues the whole step
        gpu_start.record(runner.stream)
        pending = engine.executor.launch(message)
        launched = time.perf_counter()
        gpu_end.record(runner.stream)
        output = pending.result()
        gpu_end.synchronize()
        engine.process(scheduled, output)
        return launched - start, gpu_start.elapsed_time(gpu_end) / 1e3, message.num_tokens

    for i in range(3):
        mixed_step(-i - 1)
    results = [mixed_step(i) for i in range(args.steps)]
    launch = sum(r[0] for r in results) / len(results)
    gpu = sum(r[1] for r in results) / len(results)
    graphs = "eager" if runner.mixed_graphs is None else "graph pieces"
    print(f"{args.model}: mixed step of {args.num_decodes} decodes + {args.prefill_len}-token prefill "
          f"({results[0][2]} tokens, {graphs}): host launch {launch * 1e3:.2f} ms, GPU {gpu * 1e3:.2f} ms")
    if args.no_profile:
        return
    import cProfile
    import pstats
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(5):
        mixed_step(100 + i)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
