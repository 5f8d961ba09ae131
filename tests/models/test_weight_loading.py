"""Layer-owned weight loading: each checkpoint tensor lands where transformers has it, fused shards
included; missing or stray tensors are errors; tied LM heads share the embedding; dummy weights load."""
from __future__ import annotations

import pytest
import torch

from asyncserve.errors import ConfigError
from asyncserve.config import EngineConfig
from asyncserve.models.loader import iterate_weights, load_model, load_weights
from asyncserve.engine.resolve_config import resolve_config


def _ours(path: str):
    return load_model(resolve_config(EngineConfig(path, device="cpu", dtype="float32")))


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3"])
def test_every_tensor_lands_where_transformers_has_it(family, tiny_model_dir, hf_reference):
    hf, _ = hf_reference(family)
    ours = _ours(tiny_model_dir(family))
    config = hf.config
    q_size = config.num_attention_heads * config.head_dim
    kv_size = config.num_key_value_heads * config.head_dim
    assert torch.equal(ours.embed_tokens.weight, hf.model.embed_tokens.weight)
    assert torch.equal(ours.norm.weight, hf.model.norm.weight)
    assert torch.equal(ours.lm_head.weight, hf.lm_head.weight)
    for our_layer, hf_layer in zip(ours.layers, hf.model.layers, strict=True):
        attn, hf_attn = our_layer.self_attn, hf_layer.self_attn
        q, k, v = attn.qkv_proj.weight.split([q_size, kv_size, kv_size])
        assert torch.equal(q, hf_attn.q_proj.weight)
        assert torch.equal(k, hf_attn.k_proj.weight)
        assert torch.equal(v, hf_attn.v_proj.weight)
        if family == "qwen2":
            q_bias, k_bias, v_bias = attn.qkv_proj.bias.split([q_size, kv_size, kv_size])
            assert torch.equal(q_bias, hf_attn.q_proj.bias)
            assert torch.equal(k_bias, hf_attn.k_proj.bias)
            assert torch.equal(v_bias, hf_attn.v_proj.bias)
        if family == "qwen3":
            assert torch.equal(attn.q_norm.weight, hf_attn.q_norm.weight)
            assert torch.equal(attn.k_norm.weight, hf_attn.k_norm.weight)
        assert torch.equal(attn.o_proj.weight, hf_attn.o_proj.weight)
        gate, up = our_layer.mlp.gate_up_proj.weight.split([config.intermediate_size] * 2)
        assert torch.equal(gate, hf_layer.mlp.gate_proj.weight)
        assert torch.equal(up, hf_layer.mlp.up_proj.weight)
        assert torch.equal(our_layer.mlp.down_proj.weight, hf_layer.mlp.down_proj.weight)
        assert torch.equal(our_layer.input_layernorm.weight, hf_layer.input_layernorm.weight)
        assert torch.equal(our_layer.post_attention_layernorm.weight,
                           hf_layer.post_attention_layernorm.weight)


def test_a_tied_lm_head_is_the_embedding(tiny_model_dir):
    ours = _ours(tiny_model_dir("qwen3"))
    assert ours.tie_word_embeddings
    assert ours.lm_head.weight is ours.embed_tokens.weight
    assert "lm_head.weight" not in dict(ours.named_parameters())


def test_a_tied_checkpoints_own_lm_head_tensor_is_skipped(tiny_model_dir):
    path = tiny_model_dir("qwen3")
    ours = _ours(path)
    embedding = ours.embed_tokens.weight.clone()
    weights = list(iterate_weights(path)) + [("lm_head.weight", torch.zeros_like(embedding))]
    load_weights(ours, weights)
    assert torch.equal(ours.embed_tokens.weight, embedding)


def test_a_missing_shard_is_named(tiny_model_dir):
    path = tiny_model_dir("qwen2")
    ours = _ours(path)
    weights = [(name, tensor) for name, tensor in iterate_weights(path)
               if name != "model.layers.1.self_attn.v_proj.bias"]
    with pytest.raises(ConfigError, match=r"layers\.1\.self_attn\.qkv_proj\.bias \(v_proj\)"):
        load_weights(ours, weights)


def test_a_missing_tensor_is_named(tiny_model_dir):
    path = tiny_model_dir("llama3")
    ours = _ours(path)
    weights = [(name, tensor) for name, tensor in iterate_weights(path) if name != "model.norm.weight"]
    with pytest.raises(ConfigError, match=r"no weights for: norm\.weight"):
        load_weights(ours, weights)


def test_a_tensor_without_a_place_is_an_error(tiny_model_dir):
    path = tiny_model_dir("qwen3")
    ours = _ours(path)
    with pytest.raises(ConfigError, match="model.layers.0.mlp.extra_proj.weight"):
        load_weights(ours, [("model.layers.0.mlp.extra_proj.weight", torch.zeros(2, 2))])


def test_a_shard_of_the_wrong_shape_is_an_error(tiny_model_dir):
    path = tiny_model_dir("qwen3")
    ours = _ours(path)
    with pytest.raises(ConfigError, match="model.layers.0.mlp.up_proj.weight"):
        load_weights(ours, [("model.layers.0.mlp.up_proj.weight", torch.zeros(3, 64))])


def test_dummy_weights_fill_every_parameter(tiny_model_dir):
    path = tiny_model_dir("qwen2")
    model = load_model(resolve_config(EngineConfig(path, device="cpu", dtype="float32", load_format="dummy")))
    for name, param in model.named_parameters():
        if name.endswith(("norm.weight", "attn.k_scale", "attn.v_scale")):  # KV-cache scales stay 1.0
            assert torch.equal(param, torch.ones_like(param)), name
        else:
            assert param.abs().max() <= 0.02 and param.abs().max() > 0, name


@pytest.mark.parametrize("family,identity", [("gemma2", 0.0), ("qwen3", 1.0)])
def test_dummy_weights_leave_every_norm_at_its_identity(tiny_model_dir, family, identity):
    """Whatever a norm is called (q_norm, ln_1, ...): weight 1, or 0 where it scales by 1 + w."""
    path = tiny_model_dir(family)
    model = load_model(resolve_config(EngineConfig(path, device="cpu", dtype="float32", load_format="dummy")))
    norms = [module for module in model.modules() if getattr(module, "is_norm", False)]
    assert len(norms) > 2 * model.hf_config.num_hidden_layers
    for norm in norms:
        assert torch.equal(norm.weight, torch.full_like(norm.weight, identity))


def test_dummy_weights_leave_layer_norms_of_other_names_as_built(tmp_path):
    """GPT-2's ln_1/ln_2/ln_f: weight 1 and bias 0 under random weights, as under a real checkpoint's init."""
    from tests.models.tiny_families import build_variant
    path = build_variant(tmp_path / "gpt2", "gpt2")
    model = load_model(resolve_config(EngineConfig(path, device="cpu", dtype="float32", load_format="dummy")))
    layer_norms = [module for module in model.modules() if getattr(module, "is_norm", False)]
    assert layer_norms
    for norm in layer_norms:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
