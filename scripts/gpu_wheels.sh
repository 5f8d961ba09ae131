#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with what the lent GPU machine lacks, for its Python 3.12, without its torch stack:
# scripts/gpu_check.sh installs them into /tmp/site there (carry [".whl"]). Run from the repository root.
set -euo pipefail
mkdir -p .whl
pip download -q --no-cache-dir --python-version 3.12 --only-binary=:all: --platform manylinux_2_28_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
  orjson pytest-asyncio xgrammar gguf jsonschema tiktoken hypothesis openai anthropic psutil fla-core einops peft \
  blake3  # vLLM's multimodal hashing: the staged build lacks it
# The machine has these (torch 2.11, triton 3.6, transformers 5.17, numpy, pytest, safetensors, aiohttp, ...):
# a copy from here would shadow them. Hugging Face's `kernels` is left out too, as the machine lacks it.
cd .whl && rm -f torch-* nvidia_* triton-* transformers-* numpy-* tokenizers-* huggingface_hub-* safetensors-* \
  sympy-* networkx-* mpmath-* setuptools-* pytest-[0-9]* pluggy-* iniconfig-* packaging-* filelock-* fsspec-* \
  hf_xet-* jinja2-* markupsafe-* pyyaml-* typing_extensions-* kernels-* regex-* requests-* urllib3-* certifi-* \
  idna-* charset_normalizer-* tqdm-*
echo "$(ls | wc -l) wheels in .whl ($(du -sh . | cut -f1))"
