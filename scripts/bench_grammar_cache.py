"""What one compiled grammar really costs the server: compile K distinct grammars of one kind, keep them all
(as the cache does), and divide the process's resident-memory growth by K; next to it, what the backend
says the grammar costs (`StructuredOutputManager`'s accounting, xgrammar's `memory_size_bytes`).

    python scripts/bench_grammar_cache.py [--backend xgrammar] [--count 40] [--tokenizer DIR]

Each kind runs in a fresh process, so one kind's freed memory does not hide the next one's growth.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import string
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

KINDS = ("enum300", "enum3000", "schema", "regex", "choice100")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _constraint(kind: str, index: int, rng: random.Random):
    from asyncserve.sampling_params import StructuredOutputsParams

    def word() -> str:
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 10)))

    if kind.startswith("enum"):
        values = [f"{word()} {word()}" for _ in range(int(kind[4:]))]
        return StructuredOutputsParams(json={"type": "object", "properties": {"x": {"enum": values}},
                                             "required": ["x"]})
    if kind == "schema":
        from structured_schema import SCHEMA
        schema = json.loads(json.dumps(SCHEMA))
        schema["properties"]["note"]["pattern"] = f"^[a-z ]{{0,{20 + index}}}$"  # distinct, same shape
        return StructuredOutputsParams(json=schema)
    if kind == "regex":
        return StructuredOutputsParams(regex=rf"[A-Z]{{2}}\d{{{1 + index % 9}}}-[a-z]{{3,{8 + index}}}")
    return StructuredOutputsParams(choice=[word() for _ in range(int(kind[6:]))])


def measure(kind: str, backend: str, count: int, tokenizer_dir: str) -> dict:
    from transformers import AutoTokenizer

    from asyncserve.engine.structured import StructuredOutputManager
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    manager = StructuredOutputManager(tokenizer, len(tokenizer), [tokenizer.eos_token_id], backend)
    rng = random.Random(0)
    manager.compile(_constraint(kind, -1, rng))  # the backend's one-time set-up, outside the measurement
    constraints = [_constraint(kind, i, rng) for i in range(count)]
    gc.collect()
    before = _rss_bytes()
    kept = [manager.backend.compile(params) for params in constraints]
    gc.collect()
    grown = _rss_bytes() - before
    accounted = sum(manager.backend.grammar_bytes(grammar) for grammar in kept)
    return {"kind": kind, "backend": backend, "count": count, "rss_per_entry_mb": grown / count / 1e6,
            "accounted_per_entry_mb": accounted / count / 1e6}


def main() -> None:
    from bench_grammar import default_tokenizer_dir
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="xgrammar", choices=("xgrammar", "guidance"))
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)  # one kind, in this process
    args = parser.parse_args()
    tokenizer_dir = args.tokenizer or default_tokenizer_dir()
    if args.kind:
        print(json.dumps(measure(args.kind, args.backend, args.count, tokenizer_dir)))
        return
    print(f"tokenizer {tokenizer_dir}, backend {args.backend}, {args.count} entries per kind")
    print(f"{'kind':>10} {'RSS / entry':>12} {'accounted':>10} {'ratio':>6}")
    for kind in KINDS:
        out = subprocess.run([sys.executable, __file__, "--kind", kind, "--backend", args.backend,
                              "--count", str(args.count), "--tokenizer", tokenizer_dir],
                             capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        ratio = row["rss_per_entry_mb"] / row["accounted_per_entry_mb"] if row["accounted_per_entry_mb"] else 0
        print(f"{kind:>10} {row['rss_per_entry_mb']:>9.2f} MB {row['accounted_per_entry_mb']:>7.2f} MB "
              f"{ratio:>6.2f}")


if __name__ == "__main__":
    main()
