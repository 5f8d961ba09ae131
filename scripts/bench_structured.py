"""Decode throughput with every request under a 10-field JSON schema, as a ratio to the same workload
unconstrained (target >= 0.9): N short prompts, at most C sequences at once, max_tokens each.

    python scripts/bench_structured.py --model llama-3.1-8b --concurrency 64 --tokenizer DIR

Dummy weights have no tokenizer: the grammar needs one, so `--tokenizer` names a folder (default: the
SmolLM2 tokenizer in the asyncserve cache, 49k tokens, its masks padded to the model's vocabulary).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import random_prompts, resolve_model  # noqa: E402
from bench_grammar import default_tokenizer_dir  # noqa: E402
from structured_schema import SCHEMA  # noqa: E402


def run(llm, prompts, params) -> tuple[float, int, dict]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    reasons: dict[str, int] = {}
    for output in outputs:
        reasons[output.outputs[0].finish_reason] = reasons.get(output.outputs[0].finish_reason, 0) + 1
    return seconds, generated, reasons


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--backend", default="xgrammar")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    from asyncserve import LLM, SamplingParams, StructuredOutputsParams
    path, load_format = resolve_model(args.model)
    tokenizer = args.tokenizer or default_tokenizer_dir()
    llm = LLM(path, load_format=load_format, tokenizer=tokenizer, dtype="auto", device=args.device,
              max_model_len=args.input_len + args.output_len + 16, max_num_seqs=args.concurrency,
              enable_prefix_caching=False, enforce_eager=args.enforce_eager,
              structured_outputs_backend=args.backend)
    vocab = min(llm.llm_engine.model_config.vocab_size, len(llm.llm_engine.tokenizer))
    prompts = random_prompts(args.num_prompts, [args.input_len] * args.num_prompts, vocab)
    constraint = StructuredOutputsParams(json=SCHEMA)
    workloads = {
        "unconstrained greedy": SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True),
        "unconstrained t=1": SamplingParams(temperature=1.0, seed=0, max_tokens=args.output_len, ignore_eos=True),
        "json schema t=1": SamplingParams(temperature=1.0, seed=0, max_tokens=args.output_len, ignore_eos=True,
                                          structured_outputs=constraint),
    }
    llm.generate([{"prompt_token_ids": p} for p in prompts[:8]], workloads["json schema t=1"], use_tqdm=False)
    results = {}
    for name, params in workloads.items():
        seconds, generated, reasons = run(llm, prompts, params)
        results[name] = {"seconds": round(seconds, 3), "generated_tokens": generated,
                         "tokens_per_s": round(generated / seconds, 1), "finish_reasons": reasons}
        print(f"{name:>22}: {generated} tokens in {seconds:.2f} s = {generated / seconds:8.1f} tokens/s  "
              f"{reasons}")
    rate = {name: r["generated_tokens"] / r["seconds"] for name, r in results.items()}
    for name in ("unconstrained t=1", "unconstrained greedy"):
        ratio = rate["json schema t=1"] / rate[name]
        results[f"ratio to {name}"] = round(ratio, 3)
        print(f"constrained / {name}: {ratio:.3f} (target >= 0.9)")
    print(f"grammar compiles: {llm.llm_engine.structured.num_compiles}; tokenizer {tokenizer}; concurrency {args.concurrency}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **results}, f, indent=1)


if __name__ == "__main__":
    main()
