"""Checkpoint layouts of OPT, GPT-2 and Phi-3 as found on the Hub: each tensor lands where transformers
has it (GPT-2's Conv1D weights transposed), whatever the prefix, and unsupported options are refused."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from asyncserve.config import EngineConfig
from asyncserve.errors import UnsupportedModelError
from asyncserve.models.loader import load_model
from asyncserve.engine.resolve_config import resolve_config
from tests.checkpoint_edits import copy_checkpoint


def _ours(path: str):
    return load_model(resolve_config(EngineConfig(path, device="cpu", dtype="float32")))


def _hf(path: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _tensors(path: str) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_gpt2_conv1d_weights_are_transposed_at_load(variant_dir):
    path = variant_dir("gpt2")
    ours, hf = _ours(path), _hf(path)
    assert torch.equal(ours.wte.weight, hf.transformer.wte.weight)
    assert torch.equal(ours.wpe.weight, hf.transformer.wpe.weight)
    assert ours.lm_head.weight is ours.wte.weight
    for block, hf_block in zip(ours.h, hf.transformer.h, strict=True):
        assert torch.equal(block.attn.c_attn.weight, hf_block.attn.c_attn.weight.t())     # [3E, E]
        assert torch.equal(block.attn.c_attn.bias, hf_block.attn.c_attn.bias)
        assert torch.equal(block.attn.c_proj.weight, hf_block.attn.c_proj.weight.t())
        assert torch.equal(block.mlp.c_fc.weight, hf_block.mlp.c_fc.weight.t())
        assert torch.equal(block.mlp.c_proj.weight, hf_block.mlp.c_proj.weight.t())
        assert torch.equal(block.ln_1.bias, hf_block.ln_1.bias)


def test_gpt2_hub_layout_without_prefix_and_with_mask_buffers(variant_dir, tmp_path):
    """openai-community/gpt2 names tensors without "transformer." and ships attn.bias mask buffers."""
    path = variant_dir("gpt2")
    weights = {name.removeprefix("transformer."): tensor for name, tensor in _tensors(path).items()}
    for i in range(2):
        weights[f"h.{i}.attn.bias"] = torch.tril(torch.ones(512, 512))[None, None]
        weights[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    hub = copy_checkpoint(path, tmp_path / "gpt2-hub", weights=weights)
    expected = dict(_ours(path).named_parameters())
    for name, param in _ours(hub).named_parameters():
        assert torch.equal(param, expected[name]), name


def test_opt_layouts_and_project_in_out(variant_dir, tmp_path):
    path = variant_dir("opt-postln")
    ours, hf = _ours(path), _hf(path)
    decoder = hf.model.decoder
    assert torch.equal(ours.project_in.weight, decoder.project_in.weight)
    assert torch.equal(ours.project_out.weight, decoder.project_out.weight)
    assert ours.final_layer_norm is None and decoder.final_layer_norm is None
    q, k, v = ours.layers[0].self_attn.qkv_proj.bias.chunk(3)
    assert torch.equal(k, decoder.layers[0].self_attn.k_proj.bias)
    # facebook/opt-* checkpoints name the body "decoder.*".
    weights = {name.removeprefix("model."): tensor for name, tensor in _tensors(path).items()}
    old = copy_checkpoint(path, tmp_path / "opt-old", weights=weights)
    expected = dict(ours.named_parameters())
    for name, param in _ours(old).named_parameters():
        assert torch.equal(param, expected[name]), name


def test_phi3_fused_checkpoint_tensors_load_whole(variant_dir):
    path = variant_dir("phi3")
    ours, hf = _ours(path), _hf(path)
    for layer, hf_layer in zip(ours.layers, hf.model.layers, strict=True):
        assert torch.equal(layer.self_attn.qkv_proj.weight, hf_layer.self_attn.qkv_proj.weight)
        assert torch.equal(layer.mlp.gate_up_proj.weight, hf_layer.mlp.gate_up_proj.weight)
    assert torch.equal(ours.lm_head.weight, hf.lm_head.weight)


@pytest.mark.parametrize("variant, update, words", [
    ("opt", {"activation_function": "quick_gelu_v9"}, "activation_function 'quick_gelu_v9'"),
    ("gpt2", {"add_cross_attention": True}, "cross-attention"),
    ("phi3", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_unsupported_options_are_refused_by_name(variant, update, words, variant_dir, tmp_path):
    edited = copy_checkpoint(variant_dir(variant), tmp_path / variant, update)
    with open(os.path.join(edited, "config.json")) as f:
        assert json.load(f).items() >= update.items()
    with pytest.raises(UnsupportedModelError, match=words):
        _ours(edited)


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_quantized_phi3_loads_its_fused_tensors_whole(fmt, variant_dir, tmp_path):
    """Phi-3 GPTQ/AWQ checkpoints quantize qkv_proj and gate_up_proj as single tensors."""
    from asyncserve import LLM, SamplingParams
    from tests.models.test_opt_gpt2_phi3 import _hf_greedy
    from tests.quantized_checkpoints import build_quantized
    path, reference = build_quantized(variant_dir("phi3"), tmp_path / fmt, fmt=fmt,
                                      linear_modules=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
    llm = LLM(path, device="cpu", dtype="float32", num_gpu_blocks_override=64)
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.encode("Hello, my name is"), tokenizer.encode("The capital of France is")]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                           SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    layer = llm.llm_engine.executor.model.layers[0]
    for linear in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj):
        assert type(linear.quant_method).__name__ == f"{fmt.upper()}LinearMethod"
    assert [list(o.outputs[0].token_ids) for o in outputs] == _hf_greedy(reference, prompts, 8)
