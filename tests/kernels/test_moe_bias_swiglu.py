"""GPT-OSS's experts in the fused MoE: per-expert biases on both projections and the clamped SwiGLU
("swigluoai": gate clamped above, up clamped both sides, gate * sigmoid(alpha * gate) * (up + 1)),
references against transformers' own expert module and the Triton paths against the references."""

import pytest
import torch

from asyncserve.kernels import (
    fused_moe,
    fused_moe_ref,
    fused_moe_triton,
    swiglu_oai_and_mul_ref,
    swiglu_oai_and_mul_triton,
)

ALPHA, LIMIT = 1.702, 7.0


def test_clamped_swiglu_reference_clamps_gate_above_and_up_both_sides():
    gate = torch.tensor([[-9.0, 0.5, 9.0]])
    up = torch.tensor([[9.0, -0.25, -9.0]])
    out = swiglu_oai_and_mul_ref(torch.cat([gate, up], dim=-1), ALPHA, LIMIT)
    clamped_gate = torch.tensor([[-9.0, 0.5, 7.0]])  # no lower clamp on the gate
    clamped_up = torch.tensor([[7.0, -0.25, -7.0]])
    expected = clamped_gate * torch.sigmoid(ALPHA * clamped_gate) * (clamped_up + 1)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("shape", [(5, 2 * 37), (3, 2 * 1500), (2, 3, 2 * 64)])
def test_clamped_swiglu_triton_matches_reference(triton_device, shape):
    x = torch.randn(shape, device=triton_device) * 6  # well past the limit on both sides
    out = swiglu_oai_and_mul_triton(x, ALPHA, LIMIT)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    torch.testing.assert_close(out, swiglu_oai_and_mul_ref(x, ALPHA, LIMIT), atol=1e-5, rtol=1e-5)


def _expert_inputs(num_tokens, hidden, inter, num_experts, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen) * scale
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter ** 0.5
    w13_bias = torch.randn(num_experts, 2 * inter, generator=gen)
    w2_bias = torch.randn(num_experts, hidden, generator=gen)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    return x, w13, w2, w13_bias, w2_bias, logits


def _options(w13_bias, w2_bias, limit=LIMIT):
    return {"w13_bias": w13_bias, "w2_bias": w2_bias, "activation": "swigluoai", "swiglu_alpha": ALPHA,
            "swiglu_limit": limit}


def test_reference_matches_transformers_gpt_oss_experts():
    """transformers keeps gate|up interleaved ([E, H, 2I], even columns the gate) and takes the top-k
    logits' softmax; we keep gate rows then up rows and renormalize the top-k of the full softmax."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    num_experts, hidden, inter, top_k = 5, 16, 12, 3
    x, w13, w2, w13_bias, w2_bias, logits = _expert_inputs(7, hidden, inter, num_experts, scale=3.0)
    config = GptOssConfig(num_local_experts=num_experts, hidden_size=hidden, intermediate_size=inter,
                          swiglu_limit=2.0)
    experts = GptOssExperts(config)
    with torch.no_grad():
        interleaved = torch.stack([w13[:, :inter], w13[:, inter:]], dim=2).reshape(num_experts, 2 * inter, hidden)
        experts.gate_up_proj.copy_(interleaved.transpose(1, 2))
        experts.gate_up_proj_bias.copy_(torch.stack([w13_bias[:, :inter], w13_bias[:, inter:]], dim=2)
                                        .reshape(num_experts, 2 * inter))
        experts.down_proj.copy_(w2.transpose(1, 2))
        experts.down_proj_bias.copy_(w2_bias)
        top_values, top_ids = logits.topk(top_k, dim=-1)
        expected = experts(x, top_ids, torch.softmax(top_values, dim=-1))
    out = fused_moe_ref(x, w13, w2, logits, top_k, True, **_options(w13_bias, w2_bias, limit=2.0))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_biases_and_activation_each_change_the_output():
    x, w13, w2, w13_bias, w2_bias, logits = _expert_inputs(6, 16, 8, 4, scale=3.0)
    full = fused_moe_ref(x, w13, w2, logits, 2, True, **_options(w13_bias, w2_bias))
    for other in (_options(None, w2_bias), _options(w13_bias, None), _options(w13_bias, w2_bias, limit=1.0),
                  {"w13_bias": w13_bias, "w2_bias": w2_bias}):
        assert not torch.allclose(full, fused_moe_ref(x, w13, w2, logits, 2, True, **other), atol=1e-3)


@pytest.mark.parametrize("num_tokens,hidden,inter,num_experts,top_k", [
    (1, 32, 16, 4, 2), (5, 48, 24, 6, 4), (37, 64, 40, 7, 3), (3, 24, 33, 32, 4)])
def test_triton_matches_reference_with_biases_and_clamp(num_tokens, hidden, inter, num_experts, top_k,
                                                        triton_device):
    x, w13, w2, w13_bias, w2_bias, logits = _expert_inputs(num_tokens, hidden, inter, num_experts, scale=3.0)
    options = _options(w13_bias, w2_bias)
    out = fused_moe_triton(*(t.to(triton_device) for t in (x, w13, w2, logits)), top_k, True,
                           **{k: (v.to(triton_device) if isinstance(v, torch.Tensor) else v)
                              for k, v in options.items()})
    torch.testing.assert_close(out.cpu(), fused_moe_ref(x, w13, w2, logits, top_k, True, **options),
                               atol=1e-4, rtol=1e-4)


def test_triton_takes_one_bias_without_the_other(triton_device):
    x, w13, w2, w13_bias, _, logits = _expert_inputs(9, 32, 16, 5)
    out = fused_moe_triton(x.to(triton_device), w13.to(triton_device), w2.to(triton_device),
                           logits.to(triton_device), 2, False, w13_bias=w13_bias.to(triton_device))
    torch.testing.assert_close(out.cpu(), fused_moe_ref(x, w13, w2, logits, 2, False, w13_bias=w13_bias),
                               atol=1e-4, rtol=1e-4)


def test_an_unknown_activation_is_refused_by_name():
    x, w13, w2, _, _, logits = _expert_inputs(2, 16, 8, 3)
    with pytest.raises(ValueError, match="'gelu' is not supported"):
        fused_moe(x, w13, w2, logits, 2, True, activation="gelu")
