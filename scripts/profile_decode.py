"""Where a decode step's time goes: GPU time of the graph alone vs the whole engine step, kernels per step
and per layer in each captured graph of the batch size, top kernels.

    python scripts/profile_decode.py --model qwen2.5-0.5b --batch-size 1
"""
from __future__ import annotations

import argparse
import collections
import time

import torch

from bench_common import random_prompts, resolve_model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    args = parser.parse_args()
    from asyncserve import LLM, SamplingParams
    path, load_format = resolve_model(args.model)
    llm = LLM(path, load_format=load_format, skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=args.context + 160, max_num_seqs=max(8, args.batch_size),
              gpu_memory_utilization=args.gpu_memory_utilization)
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
    num_layers = len(runner.model.attention_layers())
    for bound in graphs.bounds[padded]:  # a short-context graph (one attention launch a layer), then any context
        graph = graphs.graphs[padded, bound]
        kernels = graph_kernels(graph)
        print(f"graph for batch {padded}, contexts up to {bound}: {replay_seconds(graph) * 1e3:.3f} ms, "
              f"{sum(kernels.values())} kernels per step ({sum(kernels.values()) / num_layers:.1f} per layer "
              f"of {num_layers}, LM head and sampling included)")
        for name, count in kernels.most_common():
            print(f"  {count:5d} x {name[:110]}")
    graph = graphs.graphs[padded, next(b for b in graphs.bounds[padded] if b > args.context + 5)]
    replay = replay_seconds(graph)
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


def replay_seconds(graph, replays: int = 50) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / replays


def graph_kernels(graph, replays: int = 5) -> collections.Counter:
    """Kernel name -> launches per replay, from the profiler's GPU events (copies and memsets left out)."""
    graph.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    counts = collections.Counter(
        event.name for event in prof.events()
        if event.device_type == torch.autograd.DeviceType.CUDA and not event.name.startswith(("Memcpy", "Memset")))
    return collections.Counter({name: count // replays for name, count in counts.items()})


if __name__ == "__main__":
    main()
