"""Generation on the CPU beside transformers: one process, the same weights, alternating runs.

    python scripts/bench_cpu.py                          # SmolLM2-135M-Instruct, float32, batch 1 and 8
    python scripts/bench_cpu.py --rounds 7 --threads 1   # more rounds on a busy machine; one thread each

Each round runs, in alternating order, transformers' `generate` (greedy, a fixed number of new tokens,
EOS ignored), asyncserve's `LLM.generate` and the server's engine (`AsyncEngine.generate`, its step on
a worker thread) on the same random prompt ids; tok/s counts new tokens over the whole call (the short
prompt's prefill included). Thread settings are the same for all (torch's default unless --threads).
The floors: weight bytes read per decode step over the measured read bandwidth, and matmul FLOPs per
token over the measured float32 matmul rate. Best and median of the rounds are printed: the best is the
figure for a quiet machine, the spread says how busy this one was.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import statistics
import time

import torch


def measure_read_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes/s of a sum over a buffer far larger than the caches (with torch's intra-op threads)."""
    buffer = torch.ones(nbytes // 4)
    buffer.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def measure_matmul_rate(size: int = 1024, repeats: int = 5) -> float:
    """float32 FLOP/s of a square matmul (with torch's intra-op threads)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class Contenders:
    """The three ways to generate, each a callable(prompts, new_tokens) -> list of generated id lists."""

    def __init__(self, path: str, max_len: int, max_batch: int):
        from transformers import AutoModelForCausalLM

        from asyncserve import LLM
        from asyncserve.engine.async_engine import AsyncEngine
        self.hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        options = dict(dtype="float32", max_model_len=max_len, max_num_seqs=max_batch, cpu_kv_cache_space=0.25)
        self.llm = LLM(path, **options)
        self.async_engine = AsyncEngine(model=path, disable_log_stats=True, **options)
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.async_engine.start())

    def transformers(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            out = self.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()

    def asyncserve_llm(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        from asyncserve import SamplingParams
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    def asyncserve_server_engine(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        from asyncserve import SamplingParams
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)

        async def one(prompt):
            final = None
            async for output in self.async_engine.generate({"prompt_token_ids": prompt}, params):
                final = output
            return list(final.outputs[0].token_ids)

        async def all_of_them():
            return await asyncio.gather(*(one(p) for p in prompts))
        return self.loop.run_until_complete(all_of_them())

    def close(self) -> None:
        self.loop.run_until_complete(self.async_engine.stop())
        self.loop.close()


def bench_batch(contenders: Contenders, names: list[str], prompts, new_tokens: int, rounds: int) -> dict:
    runs = {name: getattr(contenders, name) for name in names}
    tokens = {name: run(prompts, new_tokens) for name, run in runs.items()}  # warm-up, and the tokens
    rates: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            runs[name](prompts, new_tokens)
            rates[name].append(len(prompts) * new_tokens / (time.perf_counter() - start))
    return {"rates": rates, "same_tokens": {name: tokens[name] == tokens["transformers"] for name in names}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a checkpoint directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for all (default: torch's)")
    parser.add_argument("--no-server-engine", action="store_true", help="skip AsyncEngine (the server's engine)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from asyncserve.checkpoints.default_model import default_model_path
    path = args.model or default_model_path()
    contenders = Contenders(path, args.prompt_len + args.new_tokens + 16, max(args.batch_sizes))
    model = contenders.llm.llm_engine.executor.runner.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    flops_per_token = 2 * sum(p.numel() for p in model.parameters())  # the tied LM head is counted once
    bandwidth, matmul = measure_read_bandwidth(), measure_matmul_rate()
    names = ["transformers", "asyncserve_llm"] + ([] if args.no_server_engine else ["asyncserve_server_engine"])
    generator = torch.Generator().manual_seed(0)
    vocab = contenders.hf.config.vocab_size
    print(f"{cpu_name()}, {torch.get_num_threads()} torch threads | torch {torch.__version__} | model {path} "
          f"(float32, {weight_bytes / 1e6:.0f} MB of weights) | prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new, {args.rounds} alternating rounds")
    print(f"measured: read bandwidth {bandwidth / 1e9:.1f} GB/s, float32 matmul {matmul / 1e9:.0f} GFLOP/s")
    figures = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "model": path, "batches": {}}
    for batch_size in args.batch_sizes:
        prompts = torch.randint(10, vocab - 10, (batch_size, args.prompt_len), generator=generator).tolist()
        result = bench_batch(contenders, names, prompts, args.new_tokens, args.rounds)
        floor = min(bandwidth * batch_size / weight_bytes, matmul / flops_per_token)  # tok/s
        print(f"batch {batch_size}: floor {floor:.1f} tok/s (weights read once per step, or matmul FLOPs)")
        baseline = result["rates"]["transformers"]
        for name in names:
            rates = result["rates"][name]
            same = "" if name == "transformers" else (
                f"; greedy tokens {'identical to' if result['same_tokens'][name] else 'DIFFER from'} transformers'")
            print(f"  {name:25s} best {max(rates):6.1f} tok/s, median {statistics.median(rates):6.1f} "
                  f"(x{max(rates) / max(baseline):.2f} and x{statistics.median(rates) / statistics.median(baseline):.2f}"
                  f" of transformers'; {max(rates) / floor * 100:.0f}% of the floor){same}")
        figures["batches"][batch_size] = {**result, "floor_tok_s": floor}
    contenders.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
