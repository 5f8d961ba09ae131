"""PEFT LoRA adapters as saved on disk, read into our fused projections' slices with PEFT's scaling; what we
cannot serve is refused by name."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from asyncserve.checkpoints.peft_adapter import load_peft_adapter
from asyncserve.errors import LoRAAdapterError

PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
RANK, HIDDEN = 4, 16


def _write_adapter(path, targets, config_overrides=None, layers=2, rank=RANK):
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": targets, "bias": "none",
              "modules_to_save": None, "use_rslora": False}
    config.update(config_overrides or {})
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    gen = torch.Generator().manual_seed(0)
    for layer in range(layers):
        for target in targets:
            block = "self_attn" if target.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, HIDDEN, generator=gen)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(HIDDEN * 2, rank, generator=gen)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return tensors


def test_packed_slices_and_plain_modules_with_peft_scaling(tmp_path):
    tensors = _write_adapter(tmp_path / "a", ["q_proj", "v_proj", "o_proj", "up_proj"])
    adapter = load_peft_adapter("a", str(tmp_path / "a"), PACKED)
    assert adapter.rank == RANK and adapter.scaling == 8 / RANK
    assert adapter.target_modules == ["o_proj", "q_proj", "up_proj", "v_proj"]
    qkv = adapter.weights["model.layers.1.self_attn.qkv_proj"]
    assert qkv[1] is None  # k_proj is not adapted
    source = "base_model.model.model.layers.1.self_attn"
    assert torch.equal(qkv[0][0], tensors[f"{source}.q_proj.lora_A.weight"])
    assert torch.equal(qkv[2][1], tensors[f"{source}.v_proj.lora_B.weight"])
    gate_up = adapter.weights["model.layers.0.mlp.gate_up_proj"]
    assert gate_up[0] is None and gate_up[1] is not None
    assert len(adapter.weights["model.layers.0.self_attn.o_proj"]) == 1
    assert adapter.num_parameters() == 2 * 4 * (RANK * HIDDEN + HIDDEN * 2 * RANK)


def test_rslora_scales_by_the_square_root_of_the_rank(tmp_path):
    _write_adapter(tmp_path / "a", ["q_proj"], {"use_rslora": True, "lora_alpha": 16})
    assert load_peft_adapter("a", str(tmp_path / "a"), PACKED).scaling == 16 / math.sqrt(RANK)


@pytest.mark.parametrize(("overrides", "named"), [
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"use_dora": True}, "use_dora"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"bias": "lora_only"}, "bias='lora_only'"),
    ({"peft_type": "IA3"}, "IA3 adapter"),
])
def test_unsupported_peft_features_are_refused_by_name(tmp_path, overrides, named):
    _write_adapter(tmp_path / "a", ["q_proj"], overrides)
    with pytest.raises(LoRAAdapterError, match=named):
        load_peft_adapter("a", str(tmp_path / "a"), PACKED)


def test_missing_files_halves_and_lm_head_are_refused(tmp_path):
    with pytest.raises(LoRAAdapterError, match="no adapter_config.json"):
        load_peft_adapter("a", str(tmp_path), PACKED)
    tensors = _write_adapter(tmp_path / "half", ["q_proj"], layers=1)
    save_file({k: v for k, v in tensors.items() if "lora_B" not in k}, str(tmp_path / "half/adapter_model.safetensors"))
    with pytest.raises(LoRAAdapterError, match="lacks lora_B"):
        load_peft_adapter("half", str(tmp_path / "half"), PACKED)
    _write_adapter(tmp_path / "head", ["q_proj"], layers=1)
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(RANK, HIDDEN),
               "base_model.model.lm_head.lora_B.weight": torch.zeros(HIDDEN, RANK)},
              str(tmp_path / "head/adapter_model.safetensors"))
    with pytest.raises(LoRAAdapterError, match="'lm_head', which is not supported"):
        load_peft_adapter("head", str(tmp_path / "head"), PACKED)
    _write_adapter(tmp_path / "rank", ["q_proj"], {"r": 8}, layers=1)
    with pytest.raises(LoRAAdapterError, match="not the config's r=8"):
        load_peft_adapter("rank", str(tmp_path / "rank"), PACKED)
