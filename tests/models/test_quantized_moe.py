"""Quantized MoE experts (GPTQ, AWQ, FP8) in tiny Mixtral and Qwen3-MoE checkpoints: greedy tokens equal
transformers' running the dequantized weights in float32; what cannot be served is refused by name."""
from __future__ import annotations

import pytest
import torch

from asyncserve import LLM, SamplingParams
from asyncserve.errors import ConfigError
from asyncserve.layers.moe import FusedMoE
from asyncserve.layers.quantization.awq import AWQExpertsMethod
from asyncserve.layers.quantization.fp8 import FP8ExpertsMethod
from asyncserve.layers.quantization.gptq import GPTQExpertsMethod
from tests.conftest import PROMPTS, hf_greedy
from tests.quantized_checkpoints import (LINEAR_MODULES, MIXTRAL_MODULES, build_fp8, build_fp8_reference,
                                         build_quantized)

MAX_TOKENS = 8

CASES = {  # name -> (family, builder, its arguments, the experts' method)
    "mixtral-gptq-4bit-asym": ("mixtral", build_quantized, dict(fmt="gptq", linear_modules=MIXTRAL_MODULES),
                               GPTQExpertsMethod),
    "qwen3_moe-gptq-4bit-sym-v2": ("qwen3_moe", build_quantized,
                                   dict(fmt="gptq", sym=True, checkpoint_format="gptq_v2"), GPTQExpertsMethod),
    "qwen3_moe-gptq-8bit-one-group": ("qwen3_moe", build_quantized, dict(fmt="gptq", bits=8, group_size=-1),
                                      GPTQExpertsMethod),
    "mixtral-awq": ("mixtral", build_quantized, dict(fmt="awq", linear_modules=MIXTRAL_MODULES),
                    AWQExpertsMethod),
    "qwen3_moe-awq": ("qwen3_moe", build_quantized, dict(fmt="awq"), AWQExpertsMethod),
    "mixtral-fp8-per-tensor-static": ("mixtral", build_fp8, dict(per_channel_modules=(),
                                                                  linear_modules=MIXTRAL_MODULES), FP8ExpertsMethod),
    "qwen3_moe-fp8-per-channel-dynamic": ("qwen3_moe", build_fp8, dict(static=False), FP8ExpertsMethod),
    "qwen3_moe-compressed-tensors-fp8-channel": (
        "qwen3_moe", build_fp8, dict(compressed_tensors=True, per_channel_modules=LINEAR_MODULES), FP8ExpertsMethod),
}


def _hf_tokens(reference: str, tokenizer) -> list[list[int]]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    return [hf_greedy(model, tokenizer(prompt).input_ids, MAX_TOKENS) for prompt in PROMPTS]


def _our_tokens(llm: LLM) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    return [out.outputs[0].token_ids for out in llm.generate(PROMPTS, params, use_tqdm=False)]


def _experts(llm: LLM) -> list[FusedMoE]:
    return [m for m in llm.llm_engine.executor.model.modules() if isinstance(m, FusedMoE)]


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_experts_give_transformers_greedy_tokens_on_the_dequantized_weights(case, tiny_model_dir,
                                                                                        tmp_path):
    from transformers import AutoTokenizer
    family, build, arguments, method = CASES[case]
    source = tiny_model_dir(family)
    path, reference = build(source, tmp_path / case, **arguments)
    expected = _hf_tokens(reference, AutoTokenizer.from_pretrained(source))
    llm = LLM(path, device="cpu", dtype="float32", num_gpu_blocks_override=256)
    experts = _experts(llm)
    assert experts and all(type(layer.quant_method) is method for layer in experts)
    assert _our_tokens(llm) == expected


def test_fp8_at_load_quantizes_the_experts_per_channel(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer
    source = tiny_model_dir("qwen3_moe")
    expected = _hf_tokens(build_fp8_reference(source, tmp_path / "reference"), AutoTokenizer.from_pretrained(source))
    llm = LLM(source, device="cpu", dtype="float32", quantization="fp8", num_gpu_blocks_override=256)
    assert all(layer.w13_weight.dtype == torch.float8_e4m3fn for layer in _experts(llm))
    assert _our_tokens(llm) == expected


def test_act_order_gptq_experts_are_refused_by_name(tiny_model_dir, tmp_path):
    path, _ = build_quantized(tiny_model_dir("qwen3_moe"), tmp_path / "act-order", fmt="gptq", act_order=True)
    with pytest.raises(ConfigError, match=r"desc_act=true \(act-order\) is not supported for MoE experts "
                                          r"\(layers\.1\.mlp\.experts\)"):
        LLM(path, device="cpu", dtype="float32", num_gpu_blocks_override=256)


@pytest.mark.parametrize("fmt", ["gptq", "fp8"])
def test_bfloat16_models_keep_int_scales_in_bfloat16_and_fp8_scales_in_float32(fmt, tiny_model_dir, tmp_path):
    from asyncserve.config import EngineConfig
    from asyncserve.engine.resolve_config import resolve_config
    from asyncserve.models.loader import load_model
    source = tiny_model_dir("qwen3_moe")
    path, _ = (build_fp8(source, tmp_path / fmt) if fmt == "fp8"
               else build_quantized(source, tmp_path / fmt, fmt=fmt))
    model = load_model(resolve_config(EngineConfig(path, device="cpu", dtype="bfloat16")))
    layer = next(m for m in model.modules() if isinstance(m, FusedMoE))
    w13, w2 = layer.quant_method.experts(layer)
    for experts in (w13, w2):
        if fmt == "fp8":
            assert experts.weight.dtype == torch.float8_e4m3fn and experts.scales.dtype == torch.float32
        else:
            assert experts.weight.dtype == torch.int32
            assert experts.scales.dtype == experts.zeros.dtype == torch.bfloat16
