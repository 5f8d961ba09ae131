"""GPTQ and AWQ checkpoints, built here by round-to-nearest quantization of the tiny Llama and packed
from the formats' descriptions, generate exactly the greedy tokens transformers generates from the same
model with the dequantized weights; bad or inconsistent configs fail at start, naming what is wrong."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from asyncserve import LLM, SamplingParams
from asyncserve.errors import ConfigError
from asyncserve.kernels.quant_gemm import pack_int_rows, quant_gemm, unpack_int_rows
from asyncserve.layers.quantization import UnquantizedLinearMethod, get_quantization_config
from asyncserve.layers.quantization.awq import AWQConfig, AWQLinearMethod
from asyncserve.layers.quantization.gptq import GPTQConfig, GPTQLinearMethod
from tests.conftest import PROMPTS, hf_greedy
from tests.quantized_checkpoints import (AWQ_ORDER, build_quantized, pack_columns, pack_rows,
                                         unpack_columns, unpack_rows)

MAX_TOKENS = 12


# --- the test's packers, checked by round trip and against hand-computed words -------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_packers_round_trip(bits):
    q = torch.randint(0, 2 ** bits, (64, 24), generator=torch.Generator().manual_seed(bits))
    assert torch.equal(unpack_rows(pack_rows(q, bits), bits), q)
    assert torch.equal(unpack_columns(pack_columns(q, bits), bits), q)
    assert torch.equal(unpack_int_rows(pack_rows(q, bits), bits, 64).long(), q)  # the kernel reads ours
    assert torch.equal(pack_int_rows(q, bits), pack_rows(q, bits))


def test_gptq_packs_rows_lowest_bits_first():
    q = torch.arange(1, 9).view(8, 1)  # rows 0..7 hold 1..8
    assert pack_rows(q, 4).item() == to_signed(0x87654321)
    assert pack_columns(q.t(), 4).item() == to_signed(0x87654321)
    assert pack_rows(torch.tensor([[1], [2], [3], [255]]), 8).item() == to_signed(0xFF030201)


def to_signed(word: int) -> int:
    return word - 2 ** 32 if word >= 2 ** 31 else word


def test_awq_packer_interleaves_and_round_trips():
    q = torch.arange(8).view(1, 8)  # output columns 0..7 hold 0..7: nibble i holds column AWQ_ORDER[i]
    assert pack_columns(q, 4, AWQ_ORDER).item() == 0x75316420
    q = torch.randint(0, 16, (16, 32), generator=torch.Generator().manual_seed(1))
    assert torch.equal(unpack_columns(pack_columns(q, 4, AWQ_ORDER), 4, AWQ_ORDER), q)


def test_quant_gemm_matches_the_dequantized_product():
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (96, 40), generator=generator)
    scales, zeros = torch.rand(3, 40, generator=generator), torch.randint(0, 16, (3, 40), generator=generator)
    x = torch.randn(5, 96, generator=generator)
    weight = (q - zeros.repeat_interleave(32, 0)).float() * scales.repeat_interleave(32, 0)
    got = quant_gemm(x, pack_rows(q, 4), scales, zeros.float(), 32, 4)
    torch.testing.assert_close(got, x @ weight)


# --- end to end: token-exact against transformers on the dequantized weights -------------------

def _hf_tokens(reference: str, tokenizer) -> list[list[int]]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    return [hf_greedy(model, tokenizer(prompt).input_ids, MAX_TOKENS) for prompt in PROMPTS]


def _our_tokens(llm: LLM) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    return [out.outputs[0].token_ids for out in llm.generate(PROMPTS, params, use_tqdm=False)]


CASES = {  # name -> build_quantized arguments
    "gptq-4bit-asym": dict(fmt="gptq", bits=4, sym=False),
    "gptq-4bit-sym-act-order": dict(fmt="gptq", bits=4, sym=True, act_order=True),
    "gptq-8bit-sym": dict(fmt="gptq", bits=8, sym=True),
    "gptq-8bit-asym-act-order-v2": dict(fmt="gptq", bits=8, sym=False, act_order=True,
                                        checkpoint_format="gptq_v2"),
    "gptq-4bit-one-group-quantize_config.json": dict(fmt="gptq", bits=4, group_size=-1, config_file=True),
    "awq-4bit-group32": dict(fmt="awq"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_greedy_tokens_equal_transformers_on_dequantized_weights(case, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer
    source = tiny_model_dir("llama")
    path, reference = build_quantized(source, tmp_path / case, **CASES[case])
    expected = _hf_tokens(reference, AutoTokenizer.from_pretrained(source))
    llm = LLM(path, device="cpu", dtype="float32", num_gpu_blocks_override=256)
    assert _our_tokens(llm) == expected
    layers = _quantized_layers(_model(llm))
    method_class = GPTQLinearMethod if CASES[case]["fmt"] == "gptq" else AWQLinearMethod
    assert len(layers) == 8 and all(type(m) is method_class for m in layers.values())
    assert type(_model(llm).lm_head.quant_method) is UnquantizedLinearMethod  # kept in float
    act_order = CASES[case].get("act_order", False)
    assert all((m.perm is not None) == act_order for m in layers.values())


def _model(llm: LLM):
    return llm.engine.executor.model


def _quantized_layers(model) -> dict:
    return {name: module.quant_method for name, module in model.named_modules()
            if isinstance(getattr(module, "quant_method", None), (GPTQLinearMethod, AWQLinearMethod))}
