"""Batch-1 decode of MoE families with the one-token two-kernel path (ASYNCSERVE_MOE_ONE_ROW, kernels/moe_row.py)
forced on: greedy fp32 tokens equal transformers' (GPT-OSS: the CPU engine's where the installed transformers
ignores the tiny config's SwiGLU limit), in CUDA graphs and eagerly (SiLU experts of Mixtral, Qwen2-MoE
with its shared expert beside, Qwen3-MoE; GPT-OSS's biased experts with the clamped SwiGLU)."""
from __future__ import annotations

import pytest

from asyncserve import LLM, SamplingParams
from tests.conftest import PROMPTS, hf_greedy
from tests.gpu.test_engine_cuda import transformers_follows_the_config

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss"])
def test_one_token_moe_keeps_greedy_tokens(family, enforce_eager, make_cuda_llm, hf_reference, tiny_model_dir,
                                           monkeypatch):
    from asyncserve.kernels.moe_row import MOE_ROW_CONFIGS
    from asyncserve.layers import moe as moe_layer
    monkeypatch.setattr(moe_layer, "TUNE_ONE_ROW_MOE", True)
    # Chosen whatever the timing says, so that the two kernels are what runs.
    monkeypatch.setattr(moe_layer, "fastest_one_row_moe", lambda *a: (MOE_ROW_CONFIGS[1], 1.0, 0.5))
    llm = make_cuda_llm(family, dtype="float32", enforce_eager=enforce_eager)
    model = llm.llm_engine.executor.runner.model
    layers = [m for m in model.modules() if isinstance(m, moe_layer.FusedMoE)]
    assert layers and all(layer.one_row_config == MOE_ROW_CONFIGS[1] for layer in layers)
    calls = []
    original = moe_layer.fused_moe_row_triton
    monkeypatch.setattr(moe_layer, "fused_moe_row_triton", lambda *a, **k: calls.append(1) or original(*a, **k))
    params = SamplingParams(temperature=0.0, max_tokens=16)
    if transformers_follows_the_config(family):
        hf_model, tokenizer = hf_reference(family)
        expected = [hf_greedy(hf_model, tokenizer.encode(prompt), 16) for prompt in PROMPTS[:2]]
    else:  # the CPU engine, which CI checks token for token against a transformers that reads the config
        cpu = LLM(tiny_model_dir(family), device="cpu", dtype="float32")
        expected = [o.outputs[0].token_ids for o in cpu.generate(PROMPTS[:2], params, use_tqdm=False)]
    for prompt, tokens in zip(PROMPTS[:2], expected):  # one request at a time: every decode step is one token
        out = llm.generate([prompt], params, use_tqdm=False)
        assert out[0].outputs[0].token_ids == tokens
    if enforce_eager:  # graphs captured the kernels before this patch; eager steps call them each time
        assert calls
