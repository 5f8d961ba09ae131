"""The rotary + cache-write kernel with Qwen3's per-head norms inside a whole model on the CPU (Triton's
interpreter): with ASYNCSERVE_FUSED_QK_NORM on and the kernel taken for CPU tensors, greedy fp32 tokens equal
transformers' (dense Qwen3 and Qwen3-MoE)."""
from __future__ import annotations

import pytest

from asyncserve import LLM, SamplingParams
from asyncserve.kernels import HAS_TRITON, rotary_cache
from asyncserve.layers import attention
from tests.conftest import PROMPTS, hf_greedy

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_fused_head_norms_keep_greedy_tokens(family, tiny_model_dir, hf_reference, triton_device, monkeypatch):
    if triton_device != "cpu":
        pytest.skip("on a GPU the kernel runs anyway: tests/kernels/test_rotary_cache_gpu.py")
    launched = []
    kernel = rotary_cache.rotary_write_kv_cache_triton
    monkeypatch.setattr(attention, "FUSE_QK_NORM", True)
    monkeypatch.setattr(rotary_cache, "use_triton", lambda tensor: True)
    monkeypatch.setattr(rotary_cache, "rotary_write_kv_cache_triton",
                        lambda *a, **k: launched.append(a[-1] is not None or k.get("qk_norm") is not None)
                        or kernel(*a, **k))
    llm = LLM(tiny_model_dir(family), device="cpu", dtype="float32", max_num_seqs=4)
    hf_model, tokenizer = hf_reference(family)
    out = llm.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [hf_greedy(hf_model, tokenizer.encode(p), 6) for p in PROMPTS[:2]]
    assert launched and all(launched)
