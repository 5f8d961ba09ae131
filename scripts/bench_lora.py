"""Multi-LoRA's cost (issue 25): the 8B shape with 8 random PEFT adapters of rank 16 on every projection,
requests spread over them, against the base model alone, for asyncserve or for vLLM with the same adapters
and prompts, so both print comparable JSON lines.

    python scripts/bench_lora.py --model-dir /tmp/llama8b                      # asyncserve
    PYTHONPATH=/tmp/vsite python scripts/bench_lora.py --model-dir /tmp/llama8b --engine vllm

Two workloads, each with and without adapters: 64 requests decoding together (128 prompt tokens, 128 out,
ignore_eos; output tok/s of the whole batch) and one request alone (batch-1 decode tok/s). The model directory
comes from `scripts/bench_models.py llama-3.1-8b --out DIR` (dummy weights); adapters are written next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapters(model_dir: str, out_dir: str, count: int, rank: int) -> list[str]:
    """`count` PEFT adapters (adapter_config.json + adapter_model.safetensors) of random weights."""
    import torch
    from safetensors.torch import save_file
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or hidden // heads
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
              "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    paths = []
    for index in range(count):
        path = os.path.join(out_dir, f"adapter{index}")
        paths.append(path)
        if os.path.isfile(os.path.join(path, "adapter_model.safetensors")):
            continue
        os.makedirs(path, exist_ok=True)
        gen = torch.Generator().manual_seed(index)
        tensors = {}
        for layer in range(config["num_hidden_layers"]):
            for target, (fan_in, fan_out) in shapes.items():
                block = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                prefix = f"base_model.model.model.layers.{layer}.{block}.{target}"
                tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen) * 0.01).bfloat16()
                tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen) * 0.01).bfloat16()
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
                       "bias": "none", "base_model_name_or_path": model_dir}, f)
    return paths


def run(args, with_adapters: bool) -> list[dict]:
    kwargs = dict(model=args.model_dir, dtype="bfloat16", max_model_len=512, seed=0, enable_prefix_caching=False,
                  gpu_memory_utilization=0.85, load_format="dummy", skip_tokenizer_init=True, max_num_seqs=128)
    if with_adapters:
        kwargs.update(enable_lora=True, max_loras=args.num_adapters, max_lora_rank=args.rank)
    if args.engine == "vllm":
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    else:
        from asyncserve import LLM, LoRARequest, SamplingParams
    llm = LLM(**kwargs)
    paths = write_adapters(args.model_dir, args.adapter_dir, args.num_adapters, args.rank)
    with open(os.path.join(args.model_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    rng = random.Random(0)
    rows = []
    for batch in (args.concurrency, 1):
        prompts = [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(128)]} for _ in range(batch)]
        loras = ([LoRARequest(f"a{i % len(paths)}", i % len(paths) + 1, paths[i % len(paths)])
                  for i in range(batch)] if with_adapters else None)
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        llm.generate(prompts, params, use_tqdm=False, lora_request=loras)  # warm-up: compiles, loads adapters
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
            times.append(time.perf_counter() - started)
        elapsed = statistics.median(times)
        rows.append({"engine": args.engine, "adapters": args.num_adapters if with_adapters else 0, "batch": batch,
                     "output_tok_per_s": round(batch * args.output_len / elapsed, 1), "seconds": round(elapsed, 3)})
        print("ROW " + json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--engine", choices=("asyncserve", "vllm"), default="asyncserve")
    parser.add_argument("--adapter-dir", default="/tmp/bench_lora_adapters")
    parser.add_argument("--num-adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", choices=("base", "lora"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only is not None:
        run(args, args.only == "lora")
        return
    results = {}
    for side in ("base", "lora"):  # each in its own process: the second engine gets the whole GPU
        done = subprocess.run([sys.executable, *sys.argv, "--only", side], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"the {side} run failed:\n{done.stderr[-4000:]}")
        results[side] = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
    for base, lora in zip(results["base"], results["lora"]):
        print(f"{args.engine} batch {base['batch']}: base {base['output_tok_per_s']:,.1f} tok/s, with "
              f"{args.num_adapters} rank-{args.rank} adapters {lora['output_tok_per_s']:,.1f} tok/s "
              f"({lora['output_tok_per_s'] / base['output_tok_per_s']:.2f}x; target >= 0.85)")


if __name__ == "__main__":
    main()
