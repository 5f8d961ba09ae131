"""Grammar-mask time per engine step: B sequences each under the 10-field JSON schema, walked token by
token through documents that satisfy it; per step, every backend fills the B bitmask rows (what the engine
does on the host while the device runs the forward), then the matchers accept their tokens. Also the
device kernel that applies the B rows to the logits.

    python scripts/bench_grammar.py --batch 64 [--tokenizer DIR] [--vocab-size 128256]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from structured_schema import SCHEMA, random_document  # noqa: E402


def default_tokenizer_dir() -> str:
    """SmolLM2's tokenizer (49k byte-level BPE) when the default model is cached, else the tiny model's."""
    from asyncserve.checkpoints.cache import cache_dir
    for name in sorted(os.listdir(cache_dir())) if os.path.isdir(cache_dir()) else []:
        if name.startswith("SmolLM2") and os.path.exists(os.path.join(cache_dir(), name, "tokenizer.json")):
            return os.path.join(cache_dir(), name)
    from asyncserve.testing.tiny_model import default_model_path
    return default_model_path()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_backend(name: str, tokenizer, vocab_size: int, docs: list[list[int]], eos: int) -> dict:
    from asyncserve.engine.structured import make_backend
    from asyncserve.sampling_params import StructuredOutputsParams
    started = time.perf_counter()
    backend = make_backend(name, tokenizer, vocab_size, [eos])
    setup = time.perf_counter() - started
    started = time.perf_counter()
    grammar = backend.compile(StructuredOutputsParams(json=SCHEMA))
    compile_seconds = time.perf_counter() - started
    matchers = [backend.new_matcher(grammar) for _ in docs]
    bitmask = torch.empty(len(docs), -(-vocab_size // 32), dtype=torch.int32)
    rows = list(range(len(docs)))
    fill, accept = [], []
    for step in range(max(len(doc) for doc in docs)):
        live = [i for i, doc in enumerate(docs) if step < len(doc)]
        started = time.perf_counter()
        backend.fill_bitmask([matchers[i] for i in live], bitmask, rows[:len(live)])
        fill.append(time.perf_counter() - started)
        started = time.perf_counter()
        for row, i in enumerate(live):
            token = docs[i][step]
            allowed = (int(bitmask[row, token // 32]) >> (token % 32)) & 1
            if not allowed or not matchers[i].accept_token(token):
                raise RuntimeError(f"{name}: token {token} of document {i} (step {step}) was refused")
        accept.append(time.perf_counter() - started)
    full = [f for f, a in zip(fill, accept)][: min(len(doc) for doc in docs)]  # steps with every row live
    return {"backend": name, "setup_s": setup, "compile_ms": 1e3 * compile_seconds,
            "fill_ms_mean": 1e3 * statistics.mean(full), "fill_ms_p50": 1e3 * percentile(full, 0.5),
            "fill_ms_p99": 1e3 * percentile(full, 0.99),
            "accept_ms_mean": 1e3 * statistics.mean(accept[:len(full)]), "steps": len(full)}


def bench_apply(batch: int, vocab_size: int, device: str) -> float:
    """Milliseconds to apply B bitmask rows to [B, V] fp32 logits in one kernel."""
    from asyncserve.kernels import apply_token_bitmask
    logits = torch.randn(batch, vocab_size, device=device)
    bitmask = torch.randint(-2**31, 2**31 - 1, (batch, -(-vocab_size // 32)), dtype=torch.int32, device=device)
    rows = torch.arange(batch, device=device)
    for _ in range(3):
        apply_token_bitmask(logits, bitmask, rows)
    repeats = 100 if device == "cuda" else 10
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        apply_token_bitmask(logits, bitmask, rows)
    if device == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokenizer", default=None, help="A tokenizer folder (default: SmolLM2's if cached).")
    parser.add_argument("--vocab-size", type=int, default=None, help="Logits width (default: the tokenizer's).")
    parser.add_argument("--backends", nargs="+", default=["xgrammar", "guidance"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import AutoTokenizer
    path = args.tokenizer or default_tokenizer_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab_size = args.vocab_size or len(tokenizer)
    rng = random.Random(args.seed)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    docs = [tokenizer.encode(random_document(rng), add_special_tokens=False) + [eos] for _ in range(args.batch)]
    print(f"tokenizer {path} ({len(tokenizer)} tokens), logits width {vocab_size}, batch {args.batch}, "
          f"documents of {min(map(len, docs))}-{max(map(len, docs))} tokens, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}")
    results = []
    for name in args.backends:
        try:
            results.append(bench_backend(name, tokenizer, vocab_size, docs, eos))
        except ImportError as exc:
            print(f"{name}: not installed ({exc})")
    for result in results:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        print(f"apply {args.batch} bitmask rows to [{args.batch}, {vocab_size}] logits on {device}: "
              f"{bench_apply(args.batch, vocab_size, device):.3f} ms")


if __name__ == "__main__":
    main()
