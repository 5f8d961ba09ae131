"""The one-token MoE kernels inside whole models on the CPU (Triton's interpreter): with every FusedMoE layer set
to the two-kernel path, one request at a time (every decode step one token) generates transformers' greedy
tokens in fp32, for SiLU experts (Mixtral; Qwen2-MoE with its shared expert beside) and GPT-OSS's biased experts
with the clamped SwiGLU."""
from __future__ import annotations

import pytest

from asyncserve import LLM, SamplingParams
from asyncserve.kernels import HAS_TRITON
from asyncserve.kernels.moe_row import MOE_ROW_CONFIGS
from asyncserve.layers import moe as moe_layer
from tests.conftest import PROMPTS, hf_greedy

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_one_token_path_keeps_greedy_tokens(family, tiny_model_dir, hf_reference, triton_device, monkeypatch):
    if triton_device != "cpu":
        pytest.skip("the GPU runs this through start-up timing (tests/gpu/test_moe_one_row_cuda.py)")
    calls = []
    original = moe_layer.fused_moe_row_triton
    monkeypatch.setattr(moe_layer, "fused_moe_row_triton", lambda *a, **k: calls.append(a[0].shape[0]) or original(*a, **k))
    llm = LLM(tiny_model_dir(family), device="cpu", dtype="float32", max_num_seqs=4)
    layers = [m for m in llm.llm_engine.executor.runner.model.modules() if isinstance(m, moe_layer.FusedMoE)]
    assert layers
    for layer in layers:
        layer.one_row_config = MOE_ROW_CONFIGS[2]
    hf_model, tokenizer = hf_reference(family)
    prompt = PROMPTS[1]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(hf_model, tokenizer.encode(prompt), 6)
    assert calls and set(calls) == {1}  # the decode steps, one token each; the prompt took the grouped path
