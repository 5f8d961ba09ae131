"""FP8 (e4m3) weights: checkpoints saved with quant_method 'fp8' (per-tensor and per-channel scales,
static or dynamic activation scales) and `--quantization fp8` on a float checkpoint generate exactly
transformers' greedy tokens from the dequantized weights; unsupported FP8 layouts are named."""
from __future__ import annotations

import pytest
import torch

from asyncserve import LLM, SamplingParams
from asyncserve.errors import ConfigError
from asyncserve.layers.linear import Linear
from asyncserve.layers.quantization import UnquantizedLinearMethod, get_quantization_config
from asyncserve.kernels.fp8_linear import fp8_linear_ref, fp8_scaled_mm
from asyncserve.layers.quantization.fp8 import FP8Config, FP8LinearMethod
from tests.conftest import PROMPTS, hf_greedy
from tests.quantized_checkpoints import LINEAR_MODULES, build_fp8, build_fp8_reference

MAX_TOKENS = 12


def _hf_tokens(reference: str, tokenizer_path: str) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    return [hf_greedy(model, tokenizer(prompt).input_ids, MAX_TOKENS) for prompt in PROMPTS]


def _generate(llm: LLM) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    return [out.outputs[0].token_ids for out in llm.generate(PROMPTS, params, use_tqdm=False)]


def _fp8_layers(llm: LLM) -> dict:
    return {name: module for name, module in llm.llm_engine.executor.model.named_modules()
            if isinstance(getattr(module, "quant_method", None), FP8LinearMethod)}


@pytest.mark.parametrize("static", [True, False])
def test_fp8_checkpoint_greedy_tokens_equal_transformers_on_dequantized_weights(static, tiny_model_dir,
                                                                                 tmp_path):
    source = tiny_model_dir("llama")
    path, reference = build_fp8(source, tmp_path / "fp8", static=static)
    llm = LLM(path, device="cpu", dtype="float32", num_gpu_blocks_override=256)
    assert _generate(llm) == _hf_tokens(reference, source)
    layers = _fp8_layers(llm)
    assert len(layers) == 8 and all(layer.weight.dtype == torch.float8_e4m3fn for layer in layers.values())
    qkv = layers["layers.0.self_attn.qkv_proj"].weight_scale  # one per-tensor scale per shard
    assert len({qkv[0].item(), qkv[64].item(), qkv[96].item()}) == 3
    assert type(llm.llm_engine.executor.model.lm_head.quant_method) is UnquantizedLinearMethod


def test_quantization_fp8_quantizes_a_float_checkpoint_at_load(tiny_model_dir, tmp_path):
    source = tiny_model_dir("llama")
    reference = build_fp8_reference(source, tmp_path / "fp8-reference")
    llm = LLM(source, device="cpu", dtype="float32", quantization="fp8", num_gpu_blocks_override=256)
    assert _generate(llm) == _hf_tokens(reference, source)
    layers = _fp8_layers(llm)
    assert len(layers) == 8 and all(layer.weight.dtype == torch.float8_e4m3fn for layer in layers.values())


@pytest.mark.parametrize("checkpoint,message", [
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, r"FP8 with weight_block_size=\[128, 128\]"),
    ({"quant_method": "fp8", "activation_scheme": "per_token"}, "FP8 activation_scheme='per_token'"),
])
def test_unsupported_fp8_layouts_are_named(checkpoint, message):
    with pytest.raises(ConfigError, match=message):
        get_quantization_config(None, checkpoint)


@pytest.mark.gpu
def test_the_fp8_tensor_core_product_is_close_to_the_reference():
    torch.manual_seed(0)
    weight = (torch.randn(256, 512, device="cuda") * 0.05).to(torch.float8_e4m3fn)
    scale = torch.rand(256, device="cuda") * 0.01 + 0.001
    x = torch.randn(33, 512, device="cuda", dtype=torch.bfloat16)
    expected = fp8_linear_ref(x.float(), weight, scale, None)
    got = fp8_scaled_mm(x, weight, scale, None).float()
    assert (got - expected).norm() / expected.norm() < 0.05


def test_random_fp8_weights_run(tiny_model_dir, tmp_path):
    """load_format='dummy' (the benchmarks' random weights) with an FP8 checkpoint's config."""
    path, _ = build_fp8(tiny_model_dir("llama"), tmp_path / "fp8")
    llm = LLM(path, device="cpu", load_format="dummy", num_gpu_blocks_override=256)
    out = llm.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 4 for o in out)
    assert len(_fp8_layers(llm)) == 8


@pytest.mark.parametrize("per_channel,static", [(True, False), (False, True)])
def test_compressed_tensors_fp8_greedy_tokens_equal_transformers(per_channel, static, tiny_model_dir, tmp_path):
    source = tiny_model_dir("llama")
    path, reference = build_fp8(source, tmp_path / "ct", LINEAR_MODULES if per_channel else (), static,
                                compressed_tensors=True)
    llm = LLM(path, device="cpu", dtype="float32", num_gpu_blocks_override=256)
    assert _generate(llm) == _hf_tokens(reference, source)
    assert len(_fp8_layers(llm)) == 8


FP8_WEIGHTS = {"num_bits": 8, "type": "float", "strategy": "tensor"}


@pytest.mark.parametrize("groups,message", [
    ({"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group"}}},
     "compressed-tensors with weights type='int' num_bits=4 strategy='group'"),
    ({"g": {"targets": ["Linear"], "weights": {**FP8_WEIGHTS, "strategy": "block"}}}, "strategy='block'"),
    ({"a": {"targets": ["Linear"], "weights": FP8_WEIGHTS},
      "b": {"targets": ["Linear"], "weights": {**FP8_WEIGHTS, "strategy": "channel"}}}, "several schemes"),
    ({}, "needs a compressed-tensors checkpoint"),
])
def test_unsupported_compressed_tensors_schemes_are_named(groups, message):
    with pytest.raises(ConfigError, match=message):
        get_quantization_config(None, {"quant_method": "compressed-tensors", "config_groups": groups})


def test_ignored_layers_stay_in_float():
    config = get_quantization_config(None, {"quant_method": "compressed-tensors", "ignore": [
        "re:.*lm_head", "re:.*layers\\.1\\.mlp\\.down_proj$", "model.layers.0.self_attn.o_proj"],
        "config_groups": {"g": {"targets": ["Linear"], "weights": FP8_WEIGHTS}}})
    assert isinstance(config, FP8Config)
    for prefix, method in [("layers.1.mlp.down_proj", UnquantizedLinearMethod),
                           ("layers.0.self_attn.o_proj", UnquantizedLinearMethod),
                           ("layers.0.mlp.down_proj", FP8LinearMethod), ("layers.10.mlp.down_proj", FP8LinearMethod)]:
        assert type(config.get_quant_method(Linear(4, 4), prefix)) is method, prefix
