"""The one-token MoE (kernels/moe_row.py: routing inside the gate_up kernel, the slots summed inside the down
kernel) against the torch reference, at awkward sizes: experts not a power of two, H and I not multiples of
the tiles, biases and GPT-OSS's clamped SwiGLU (Triton in its CPU interpreter when there is no GPU)."""

import pytest
import torch

from asyncserve.kernels import fused_moe_ref
from asyncserve.kernels.moe_row import MOE_ROW_CONFIGS, fused_moe_row_applies, fused_moe_row_triton
from tests.kernels.test_moe import _dense_oracle, _moe_inputs

SMALL = ((8, 32, 1), (8, 16, 1))  # tiles that leave partial ones at the sizes below


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("hidden,inter,num_experts,top_k", [(40, 24, 6, 2), (72, 20, 5, 3), (33, 9, 3, 1)])
def test_one_token_matches_the_reference(triton_device, hidden, inter, num_experts, top_k, renormalize):
    x, w13, w2, logits = _moe_inputs(1, hidden, inter, num_experts, seed=hidden, device=triton_device)
    out = fused_moe_row_triton(x, w13, w2, logits, top_k, renormalize, SMALL)
    expected = fused_moe_ref(x, w13, w2, logits, top_k, renormalize)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    oracle = _dense_oracle(*(t.cpu() for t in (x, w13, w2, logits)), top_k, renormalize)
    torch.testing.assert_close(out.cpu().double(), oracle, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
def test_biases_and_the_clamped_swiglu(triton_device, activation):
    x, w13, w2, logits = _moe_inputs(1, 40, 24, 6, seed=7, device=triton_device)
    gen = torch.Generator().manual_seed(8)
    w13_bias = torch.randn(6, 48, generator=gen).to(triton_device)
    w2_bias = torch.randn(6, 40, generator=gen).to(triton_device)
    options = dict(w13_bias=w13_bias, w2_bias=w2_bias, activation=activation, swiglu_alpha=1.5, swiglu_limit=0.5)
    out = fused_moe_row_triton(x * 4, w13, w2, logits, 2, True, SMALL, **options)
    torch.testing.assert_close(out, fused_moe_ref(x * 4, w13, w2, logits, 2, True, **options), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", MOE_ROW_CONFIGS)
def test_every_config_in_half_precision(triton_device, config):
    """fp16 through each tile config: every product and bias rounded as the reference rounds them."""
    x, w13, w2, logits = _moe_inputs(1, 520, 300, 10, seed=3, device=triton_device, dtype=torch.float16)
    out = fused_moe_row_triton(x, w13, w2, logits, 4, True, config)
    expected = fused_moe_ref(x, w13, w2, logits, 4, True)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-3)


def test_only_one_token_of_float_experts():
    x, w13, w2, logits = _moe_inputs(2, 16, 8, 4)
    assert fused_moe_row_applies(x[:1], w13) and not fused_moe_row_applies(x, w13)
    with pytest.raises(ValueError, match="one token"):
        fused_moe_row_triton(x, w13, w2, logits, 2, True)


# --- the real shapes on a GPU -------------------------------------------------------------------------------

REAL_SHAPES = {  # (hidden, intermediate, experts, top_k, with biases and the clamped SwiGLU)
    "qwen3-30b-a3b": (2048, 768, 128, 8, False), "mixtral-8x7b": (4096, 14336, 8, 2, False),
    "gpt-oss-20b": (2880, 2880, 32, 4, True),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", list(REAL_SHAPES))
def test_real_shapes_in_bf16_and_inside_a_graph(shape):
    hidden, inter, experts, top_k, gpt_oss = REAL_SHAPES[shape]
    x, w13, w2, _ = _moe_inputs(1, hidden, inter, experts, device="cuda", dtype=torch.bfloat16)
    options = {}
    if gpt_oss:
        options = dict(w13_bias=torch.randn(experts, 2 * inter, device="cuda").bfloat16() * 0.1,
                       w2_bias=torch.randn(experts, hidden, device="cuda").bfloat16() * 0.1,
                       activation="swigluoai", swiglu_alpha=1.702, swiglu_limit=7.0)
    rows = [torch.randn(1, experts, device="cuda").bfloat16() for _ in range(3)]
    for config in MOE_ROW_CONFIGS:
        for logits in rows:
            out = fused_moe_row_triton(x, w13, w2, logits, top_k, True, config, **options)
            expected = fused_moe_ref(x, w13, w2, logits, top_k, True, **options)
            torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    static_logits = rows[0].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fused_moe_row_triton(x, w13, w2, static_logits, top_k, True, MOE_ROW_CONFIGS[0], **options)
    for logits in rows[1:]:  # other experts routed on replay
        static_logits.copy_(logits)
        graph.replay()
        expected = fused_moe_ref(x, w13, w2, logits, top_k, True, **options)
        torch.testing.assert_close(static_out.float(), expected.float(), rtol=2e-2, atol=2e-2)
