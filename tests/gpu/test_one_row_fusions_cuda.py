"""Batch-1 decode with the one-row fusions on (ASYNCSERVE_FUSED_GATED_ROW: the MLP's activation inside the down
projection's GEMV; ASYNCSERVE_FUSED_NORM_ROW: each layer's norms inside the qkv and gate|up GEMVs): greedy fp32
tokens equal transformers', in CUDA graphs and eagerly, for SiLU (Llama 3, Qwen2 with its qkv bias) and
GELU-tanh (Gemma 2, whose norms stay apart)."""
from __future__ import annotations

import pytest

from asyncserve import SamplingParams
from tests.conftest import PROMPTS, hf_greedy

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
@pytest.mark.parametrize("family", ["llama3", "qwen2", "gemma2"])
def test_one_row_fusions_keep_greedy_tokens(family, enforce_eager, make_cuda_llm, hf_reference, monkeypatch):
    from asyncserve.kernels import GEMV_CONFIGS
    from asyncserve.layers import single_row
    from asyncserve.layers.pre_norm_block import PreNormBlock
    from asyncserve.layers.quantization import unquantized
    monkeypatch.setattr(unquantized, "FUSE_GATED_ROW", True)
    monkeypatch.setattr(unquantized, "FUSE_NORM_ROW", True)
    # Chosen whatever the timing says, so that the fused kernels are what runs.
    monkeypatch.setattr(unquantized, "fastest_gated_row_kernel", lambda *a: (GEMV_CONFIGS[1], 1.0, 0.5))
    monkeypatch.setattr(unquantized, "fastest_normed_row_kernel", lambda *a: (GEMV_CONFIGS[0], 1.0, 0.5))
    llm = make_cuda_llm(family, dtype="float32", enforce_eager=enforce_eager)
    model = llm.llm_engine.executor.runner.model
    downs = [m.down_proj for m in model.modules() if hasattr(m, "down_proj")]
    assert downs and all(d.quant_method.gated_row == GEMV_CONFIGS[1] for d in downs)
    blocks = [m for m in model.modules() if isinstance(m, PreNormBlock)]
    assert all(b.fused_norm_rows == (family != "gemma2") for b in blocks) and (blocks or family == "gemma2")
    calls = []
    for name in ("gemv_triton", "gemv_normed_triton"):
        original = getattr(single_row, name)
        monkeypatch.setattr(single_row, name, lambda *a, _o=original, _n=name, **k: calls.append(
            k.get("activation") or _n) or _o(*a, **k))
    hf_model, tokenizer = hf_reference(family)
    for prompt in PROMPTS[:2]:  # one request at a time: every decode step is one row
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
        assert out[0].outputs[0].token_ids == hf_greedy(hf_model, tokenizer.encode(prompt), 16)
    if enforce_eager:  # graphs captured the kernels before these patches; eager steps call them each time
        expected = {"gelu_tanh"} if family == "gemma2" else {"silu", "gemv_normed_triton"}
        assert expected <= set(calls)
