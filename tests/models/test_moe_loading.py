"""MoE checkpoints: each expert's projections land in the fused expert tensors by (shard, expert id), the
router and shared expert where transformers has them; a missing or stray expert tensor is an error."""
from __future__ import annotations

import pytest
import torch

from asyncserve.config import EngineConfig
from asyncserve.errors import ConfigError
from asyncserve.models.loader import iterate_weights, load_model
from asyncserve.engine.resolve_config import resolve_config
from tests.checkpoint_edits import copy_checkpoint


def _ours(path: str, **kwargs):
    return load_model(resolve_config(EngineConfig(path, device="cpu", dtype="float32", **kwargs)))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_experts_land_where_transformers_has_them(family, tiny_model_dir, hf_reference):
    hf, _ = hf_reference(family)
    ours = _ours(tiny_model_dir(family))
    sparse = 0 if family == "mixtral" else 1
    for our_layer, hf_layer in zip(ours.layers, hf.model.layers, strict=True):
        if our_layer is not ours.layers[sparse] and family != "mixtral":
            assert torch.equal(our_layer.mlp.down_proj.weight, hf_layer.mlp.down_proj.weight)  # dense layer
            continue
        moe, hf_moe = our_layer.mlp, hf_layer.mlp
        # transformers stacks each expert's gate rows then up rows, as we do
        assert torch.equal(moe.experts.w13_weight, hf_moe.experts.gate_up_proj)
        assert torch.equal(moe.experts.w2_weight, hf_moe.experts.down_proj)
        assert torch.equal(moe.gate.weight, hf_moe.gate.weight)
        # Mixtral always renormalizes its top-k weights; the Qwen families as norm_topk_prob says.
        assert moe.experts.renormalize == (True if family == "mixtral" else hf.config.norm_topk_prob)
        assert moe.experts.top_k == hf.config.num_experts_per_tok
        if family == "qwen2_moe":
            inter = hf.config.shared_expert_intermediate_size
            gate, up = moe.shared_expert.gate_up_proj.weight.split([inter, inter])
            assert torch.equal(gate, hf_moe.shared_expert.gate_proj.weight)
            assert torch.equal(up, hf_moe.shared_expert.up_proj.weight)
            assert torch.equal(moe.shared_expert.down_proj.weight, hf_moe.shared_expert.down_proj.weight)
            assert torch.equal(moe.shared_expert_gate.weight, hf_moe.shared_expert_gate.weight)


def test_mixtral_w1_is_the_gate_and_w3_the_up_projection(tiny_model_dir):
    path = tiny_model_dir("mixtral")
    weights = dict(iterate_weights(path))
    experts = _ours(path).layers[1].mlp.experts
    inter = experts.intermediate_size
    for e in range(experts.num_experts):
        prefix = f"model.layers.1.block_sparse_moe.experts.{e}"
        assert torch.equal(experts.w13_weight[e, :inter], weights[f"{prefix}.w1.weight"])
        assert torch.equal(experts.w13_weight[e, inter:], weights[f"{prefix}.w3.weight"])
        assert torch.equal(experts.w2_weight[e], weights[f"{prefix}.w2.weight"])


def test_a_missing_expert_projection_is_named(tiny_model_dir, tmp_path):
    source = tiny_model_dir("mixtral")
    weights = dict(iterate_weights(source))
    del weights["model.layers.0.block_sparse_moe.experts.4.w3.weight"]
    path = copy_checkpoint(source, tmp_path / "missing", weights=weights)
    with pytest.raises(ConfigError, match=r"layers\.0\.mlp\.experts\.w13_weight \(\('up', 4\)\)"):
        _ours(path)


def test_an_expert_beyond_the_layers_count_is_refused(tiny_model_dir, tmp_path):
    source = tiny_model_dir("qwen3_moe")
    weights = dict(iterate_weights(source))
    stray = weights["model.layers.1.mlp.experts.0.up_proj.weight"].clone()
    weights["model.layers.1.mlp.experts.8.up_proj.weight"] = stray
    path = copy_checkpoint(source, tmp_path / "stray", weights=weights)
    with pytest.raises(ConfigError, match="expert 8 of a layer with 8 experts"):
        _ours(path)


def test_experts_of_a_scheme_without_an_experts_method_are_refused_with_a_reason(tiny_model_dir, tmp_path):
    path = copy_checkpoint(tiny_model_dir("qwen3_moe"), tmp_path / "mxfp4",
                           {"quantization_config": {"quant_method": "mxfp4"}})
    with pytest.raises(ConfigError, match=r"quantized MoE experts \(mxfp4\) are not supported \(supported: gptq"):
        _ours(path)
