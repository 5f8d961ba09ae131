"""YaRN rotary scaling (GPT-OSS's rope): inverse frequencies and the attention factor on cos/sin, as
transformers computes them, and the rotated queries and keys the same as its rotary embedding gives."""

import pytest
import torch

from asyncserve.layers.rotary import (
    RotaryEmbedding,
    inverse_frequencies,
    rope_attention_factor,
    rope_parameters,
)

GPT_OSS_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096, "rope_theta": 150000.0}


def _config(head_dim: int, rope: dict):
    from transformers import GptOssConfig
    return GptOssConfig(head_dim=head_dim, hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=2,
                        rope_parameters=dict(rope), max_position_embeddings=131072)


@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("rope", [GPT_OSS_ROPE, {**GPT_OSS_ROPE, "truncate": True, "factor": 4.0},
                                  {**GPT_OSS_ROPE, "original_max_position_embeddings": 64},
                                  {**GPT_OSS_ROPE, "attention_factor": 1.5},
                                  {**GPT_OSS_ROPE, "mscale": 1.0, "mscale_all_dim": 0.5}])
def test_inverse_frequencies_and_attention_factor_match_transformers(head_dim, rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = _config(head_dim, rope)
    expected_inv_freq, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    theta, scaling = rope_parameters(config)
    assert theta == rope["rope_theta"]
    assert torch.equal(inverse_frequencies(head_dim, theta, scaling), expected_inv_freq)
    assert rope_attention_factor(scaling) == pytest.approx(expected_factor, rel=1e-12)


def test_rotated_queries_and_keys_match_transformers():
    from transformers.models.gpt_oss.modeling_gpt_oss import (
        GptOssRotaryEmbedding,
        apply_rotary_pos_emb,
    )
    head_dim, positions = 16, torch.tensor([0, 1, 5, 700, 4095, 9000])
    config = _config(head_dim, GPT_OSS_ROPE)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(len(positions), 4 * head_dim, generator=gen)
    k = torch.randn(len(positions), 2 * head_dim, generator=gen)
    ours = RotaryEmbedding(head_dim, 10000, *rope_parameters(config))
    our_q, our_k = ours(positions, q.clone(), k.clone())
    cos, sin = GptOssRotaryEmbedding(config)(q, positions[None])
    hf_q, hf_k = apply_rotary_pos_emb(q.view(1, -1, 4, head_dim).transpose(1, 2),
                                      k.view(1, -1, 2, head_dim).transpose(1, 2), cos, sin)
    torch.testing.assert_close(our_q, hf_q.transpose(1, 2).reshape_as(q), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_k, hf_k.transpose(1, 2).reshape_as(k), atol=1e-5, rtol=1e-5)
    assert rope_attention_factor({"rope_type": "llama3"}) == 1.0
