"""Brings the vLLM peer's bench scripts (.vllm/bin, copied from ../shared/peers/vllm by its build.sh) up to what
our comparisons need; idempotent, so gpu_check.sh runs it every time. What each edit is for:

- bench_vllm.py: the vocabulary of nested configs (Qwen3.5's text_config); `--language-model-only` (the
  Qwen3.5 configs name the vision-language class and no image processor is on disk: vLLM's flag of that
  name builds the text part only); `--gdn-prefill-backend` (vLLM's flag: on Hopper "auto" picks FlashInfer's
  GDN prefill, which the staged build lacks).
- serve_bench.sh: `MAX_MODEL_LEN` for both servers (at IN + OUT + 64 vLLM refused a quarter of the random
  dataset's requests, whose token counts vary), and `--save-detailed` (per-request TTFT for the tail).
"""
from __future__ import annotations

import sys
from pathlib import Path

EDITS = {
    "bench_vllm.py": [
        ('int(cfg["vocab_size"])', 'int(cfg.get("vocab_size") or cfg["text_config"]["vocab_size"])'),
        ('    if args.max_num_seqs:\n        kw["max_num_seqs"]',
         '    if args.language_model_only:\n        kw["language_model_only"] = True\n'
         '    if args.gdn_prefill_backend:\n        kw["gdn_prefill_backend"] = args.gdn_prefill_backend\n'
         '    if args.max_num_seqs:\n        kw["max_num_seqs"]'),
        ('    p.add_argument("--enforce-eager"',
         '    p.add_argument("--gdn-prefill-backend", default=None, help="triton | flashinfer (Qwen3.5/Next)")\n'
         '    p.add_argument("--language-model-only", action="store_true", help="VL configs: the text part")\n'
         '    p.add_argument("--enforce-eager"'),
    ],
    "serve_bench.sh": [
        ("--max-model-len $((IN + OUT_LEN + 64))", "--max-model-len ${MAX_MODEL_LEN:-$((IN + OUT_LEN + 64))}"),
        ("--save-result --result-dir", "--save-result --save-detailed --result-dir"),
    ],
}


def patch(bin_dir: Path) -> list[str]:
    done = []
    for name, edits in EDITS.items():
        path = bin_dir / name
        text = path.read_text()
        for old, new in edits:
            if new in text:
                continue
            if old not in text:
                raise SystemExit(f"{path}: cannot find {old!r}; the peer script changed, update {__file__}")
            text = text.replace(old, new)
            done.append(f"{name}: {new.splitlines()[-1].strip()[:70]}")
        path.write_text(text)
    return done


if __name__ == "__main__":
    for line in patch(Path(sys.argv[1] if len(sys.argv) > 1 else ".vllm/bin")):
        print("patched", line)
