"""Batch-1 decode with the MLP's activation inside the down projection's GEMV (ASYNCSERVE_FUSED_GATED_ROW):
greedy fp32 tokens equal transformers', in CUDA graphs and eagerly, SiLU (Llama 3) and GELU-tanh (Gemma 2)."""
from __future__ import annotations

import pytest

from asyncserve import SamplingParams
from tests.conftest import PROMPTS, hf_greedy

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
@pytest.mark.parametrize("family", ["llama3", "gemma2"])
def test_fused_gated_row_keeps_greedy_tokens(family, enforce_eager, make_cuda_llm, hf_reference, monkeypatch):
    from asyncserve.kernels import GEMV_CONFIGS
    from asyncserve.layers import single_row
    from asyncserve.layers.quantization import unquantized
    monkeypatch.setattr(unquantized, "FUSE_GATED_ROW", True)
    # Chosen whatever the timing says, so that the fused kernel is what runs.
    monkeypatch.setattr(unquantized, "fastest_gated_row_kernel", lambda *a: (GEMV_CONFIGS[1], 1.0, 0.5))
    llm = make_cuda_llm(family, dtype="float32", enforce_eager=enforce_eager)
    downs = [m.down_proj for m in llm.llm_engine.executor.runner.model.modules() if hasattr(m, "down_proj")]
    assert downs and all(d.quant_method.gated_row == GEMV_CONFIGS[1] for d in downs)
    calls = []
    original = single_row.gemv_triton
    monkeypatch.setattr(single_row, "gemv_triton", lambda *a, **k: calls.append(k.get("activation")) or original(*a, **k))
    model, tokenizer = hf_reference(family)
    for prompt in PROMPTS[:2]:  # one request at a time: every decode step is one row
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
        assert out[0].outputs[0].token_ids == hf_greedy(model, tokenizer.encode(prompt), 16)
    if enforce_eager:  # graphs captured the kernel before this patch; eager steps call it each time
        assert {"gelu_tanh" if family == "gemma2" else "silu"} <= set(calls)
