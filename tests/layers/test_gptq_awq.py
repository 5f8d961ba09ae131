"""GPTQ and AWQ checkpoints, built here by round-to-nearest quantization of the tiny Llama and packed
from the formats' descriptions, generate exactly the greedy tokens transformers generates from the same
model with the dequantized weights; bad or inconsistent configs fail at start, naming what is wrong."""
from __future__ import annotations

import json
import os

import pytest
import torch
from asyncserve.kernels.int_packing import pack_int_rows, unpack_int_rows
from asyncserve.kernels.quant_gemm import quant_gemm
from safetensors.torch import load_file, save_file

from asyncserve import LLM, SamplingParams
from asyncserve.errors import ConfigError
from asyncserve.layers.quantization import UnquantizedLinearMethod, get_quantization_config
from asyncserve.layers.quantization.awq import AWQConfig, AWQLinearMethod
from asyncserve.layers.quantization.gptq import GPTQConfig, GPTQLinearMethod
from tests.conftest import PROMPTS, hf_greedy
from tests.quantized_checkpoints import AWQ_ORDER, build_quantized, pack_columns, pack_rows, unpack_columns, unpack_rows

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
    "awq-qwen2-qkv-bias-tied-embeddings": dict(fmt="awq", family="qwen2"),
    "gptq-qwen2-qkv-bias-act-order": dict(fmt="gptq", family="qwen2", act_order=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_greedy_tokens_equal_transformers_on_dequantized_weights(case, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer
    arguments = dict(CASES[case])
    source = tiny_model_dir(arguments.pop("family", "llama"))
    path, reference = build_quantized(source, tmp_path / case, **arguments)
    expected = _hf_tokens(reference, AutoTokenizer.from_pretrained(source))
    llm = LLM(path, device="cpu", dtype="float32", num_gpu_blocks_override=256)
    assert _our_tokens(llm) == expected
    layers = _quantized_layers(_model(llm))
    method_class = GPTQLinearMethod if CASES[case]["fmt"] == "gptq" else AWQLinearMethod
    assert len(layers) == 8 and all(type(m) is method_class for m in layers.values())
    assert type(_model(llm).lm_head.quant_method) is UnquantizedLinearMethod  # kept in float (or tied)
    act_order = CASES[case].get("act_order", False)
    assert all((m.perm is not None) == act_order for m in layers.values())


def _model(llm: LLM):
    return llm.llm_engine.executor.model


def _quantized_layers(model) -> dict:
    return {name: module.quant_method for name, module in model.named_modules()
            if isinstance(getattr(module, "quant_method", None), (GPTQLinearMethod, AWQLinearMethod))}


# --- configs: names, aliases, and what is refused at start -----------------------------------------

GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True}
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}


@pytest.mark.parametrize("method,checkpoint,expected", [
    (None, GPTQ, GPTQConfig), ("gptq", GPTQ, GPTQConfig), ("gptq_marlin", GPTQ, GPTQConfig),
    ("GPTQ", GPTQ, GPTQConfig), (None, AWQ, AWQConfig), ("AWQ", AWQ, AWQConfig), ("awq_marlin", AWQ, AWQConfig),
    (None, {**GPTQ, "quant_method": "gptq_marlin"}, GPTQConfig),
])
def test_vllms_names_and_aliases_select_the_method(method, checkpoint, expected):
    assert type(get_quantization_config(method, checkpoint)) is expected


@pytest.mark.parametrize("method,checkpoint", [("awq", GPTQ), ("gptq_marlin", AWQ), ("awq_marlin", GPTQ)])
def test_a_method_that_contradicts_the_checkpoint_is_refused_by_name(method, checkpoint):
    with pytest.raises(ConfigError, match=f"quantization='{method}' does not match.*'{checkpoint['quant_method']}'"):
        get_quantization_config(method, checkpoint)


@pytest.mark.parametrize("checkpoint,message", [
    ({**GPTQ, "bits": 3}, "GPTQ with bits=3 is not supported"),
    ({**GPTQ, "bits": 2}, "GPTQ with bits=2 is not supported"),
    ({**GPTQ, "group_size": 256}, "GPTQ with group_size=256 is not supported"),
    ({**GPTQ, "group_size": 48}, "GPTQ with group_size=48 is not supported"),
    ({**GPTQ, "checkpoint_format": "marlin"}, "GPTQ checkpoint_format='marlin' is not supported"),
    ({**AWQ, "bits": 8}, "AWQ with bits=8 is not supported"),
    ({**AWQ, "group_size": -1}, "AWQ with group_size=-1 is not supported"),
    ({**AWQ, "version": "gemv"}, "AWQ version='gemv' is not supported"),
    ({**AWQ, "zero_point": False}, "AWQ with zero_point=false is not supported"),
])
def test_unsupported_bits_group_sizes_and_layouts_are_named(checkpoint, message):
    with pytest.raises(ConfigError, match=message):
        get_quantization_config(None, checkpoint)


def test_older_config_files_are_read(tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    from asyncserve.models.loader import quantization_config
    from tests.checkpoint_edits import copy_checkpoint
    path = copy_checkpoint(tiny_model_dir("llama"), tmp_path / "awq-old")
    with open(os.path.join(path, "quant_config.json"), "w") as f:  # AutoAWQ's names
        json.dump({"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM"}, f)
    config = quantization_config(AutoConfig.from_pretrained(path), None, path)
    assert type(config) is AWQConfig and config.group_size == 64
    with open(os.path.join(path, "quant_config.json"), "w") as f:
        json.dump({"zero_point": True, "q_group_size": 128, "w_bit": 3, "version": "GEMM"}, f)
    with pytest.raises(ConfigError, match="AWQ with bits=3"):
        quantization_config(AutoConfig.from_pretrained(path), None, path)


def test_naming_gptq_for_a_plain_checkpoint_fails_at_start(tiny_model_dir):
    with pytest.raises(ConfigError, match="quantization='gptq' needs a GPTQ checkpoint"):
        LLM(tiny_model_dir("llama"), device="cpu", quantization="gptq", num_gpu_blocks_override=64)


def test_the_checkpoints_method_contradicted_by_the_option_fails_at_start(tiny_model_dir, tmp_path):
    path, _ = build_quantized(tiny_model_dir("llama"), tmp_path / "gptq", fmt="gptq")
    with pytest.raises(ConfigError, match="quantization='awq' does not match the checkpoint.*'gptq'"):
        LLM(path, device="cpu", quantization="awq", num_gpu_blocks_override=64)


def test_vllms_marlin_name_serves_the_checkpoint(tiny_model_dir, tmp_path):
    path, _ = build_quantized(tiny_model_dir("llama"), tmp_path / "gptq", fmt="gptq")
    llm = LLM(path, device="cpu", quantization="gptq_marlin", num_gpu_blocks_override=256)
    assert len(_quantized_layers(_model(llm))) == 8


def test_a_group_size_the_layers_cannot_hold_is_named(tiny_model_dir, tmp_path):
    path, _ = build_quantized(tiny_model_dir("llama"), tmp_path / "awq", fmt="awq")
    _edit_config(path, group_size=128)  # the tiny model has 64 inputs per attention projection
    with pytest.raises(ConfigError, match="AWQ: layer 'layers.0.self_attn.qkv_proj' has 64 inputs, not a "
                                          "multiple of the group size 128"):
        LLM(path, device="cpu", num_gpu_blocks_override=64)


def _edit_config(path: str, **quantization) -> None:
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"].update(quantization)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def _edit_tensors(path: str, edits: dict) -> None:
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    tensors.update(edits(tensors) if callable(edits) else edits)
    save_file(tensors, file)


def test_fused_shards_with_another_group_size_are_refused(tiny_model_dir, tmp_path):
    path, _ = build_quantized(tiny_model_dir("llama"), tmp_path / "gptq", fmt="gptq", group_size=32)
    other, _ = build_quantized(tiny_model_dir("llama"), tmp_path / "gptq64", fmt="gptq", group_size=64)
    k_proj = "model.layers.0.self_attn.k_proj"
    regrouped = load_file(os.path.join(other, "model.safetensors"))
    _edit_tensors(path, {name: tensor for name, tensor in regrouped.items() if name.startswith(k_proj)})
    with pytest.raises(ConfigError, match=f"'{k_proj}.(scales|qzeros)' does not fit .*qkv_proj.*group size"):
        LLM(path, device="cpu", num_gpu_blocks_override=64)


def test_fused_shards_with_different_act_order_are_refused(tiny_model_dir, tmp_path):
    path, _ = build_quantized(tiny_model_dir("llama"), tmp_path / "gptq", fmt="gptq", act_order=True)
    name = "model.layers.1.mlp.up_proj.g_idx"
    _edit_tensors(path, lambda tensors: {name: tensors[name].flip(0).contiguous()})
    with pytest.raises(ConfigError, match="up_proj.g_idx.*different g_idx"):
        LLM(path, device="cpu", num_gpu_blocks_override=64)


def test_fused_shards_quantized_differently_are_refused(tiny_model_dir, tmp_path):
    path, _ = build_quantized(tiny_model_dir("llama"), tmp_path / "awq", fmt="awq")
    _edit_config(path, modules_to_not_convert=["k_proj"])
    with pytest.raises(ConfigError, match="fused layer 'layers.0.self_attn.qkv_proj' disagree on quantization"):
        LLM(path, device="cpu", num_gpu_blocks_override=64)


def test_plain_weights_under_a_gptq_config_are_refused(tiny_model_dir, tmp_path):
    from tests.checkpoint_edits import copy_checkpoint
    path = copy_checkpoint(tiny_model_dir("llama"), tmp_path / "says-gptq", {"quantization_config": GPTQ})
    with pytest.raises(ConfigError, match="_proj.weight' has no place.*holds g_idx, qweight, qzeros, scales"):
        LLM(path, device="cpu", num_gpu_blocks_override=64)


def test_modules_to_not_convert_stay_in_float(tiny_model_dir, tmp_path):
    path, _ = build_quantized(tiny_model_dir("llama"), tmp_path / "awq", fmt="awq")
    _edit_config(path, modules_to_not_convert=["layers.1.mlp.down_proj"])
    plain = load_file(os.path.join(tiny_model_dir("llama"), "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    _edit_tensors(path, lambda tensors: {f"{name}.weight": plain[f"{name}.weight"]})
    tensors = load_file(os.path.join(path, "model.safetensors"))
    for suffix in ("qweight", "qzeros", "scales"):
        del tensors[f"{name}.{suffix}"]
    save_file(tensors, os.path.join(path, "model.safetensors"))
    llm = LLM(path, device="cpu", dtype="float32", num_gpu_blocks_override=256)
    layers = _quantized_layers(_model(llm))
    assert len(layers) == 7 and "layers.1.mlp.down_proj" not in layers
    assert torch.equal(_model(llm).layers[1].mlp.down_proj.weight, plain[f"{name}.weight"])


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_bfloat16_models_keep_scales_and_zeros_in_the_activations_dtype(fmt, tiny_model_dir, tmp_path):
    path, _ = build_quantized(tiny_model_dir("llama"), tmp_path / fmt, fmt=fmt, act_order=fmt == "gptq")
    llm = LLM(path, device="cpu", dtype="bfloat16", num_gpu_blocks_override=256)
    layers = [module for module in _model(llm).modules()
              if isinstance(getattr(module, "quant_method", None), (GPTQLinearMethod, AWQLinearMethod))]
    assert layers and all(layer.scales.dtype == layer.zeros.dtype == torch.bfloat16 for layer in layers)
    out = llm.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 4 for o in out)


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_random_weights_in_the_checkpoints_format_run(fmt, tiny_model_dir, tmp_path):
    """load_format='dummy' (the benchmarks' random quantized weights): packed tensors get random bits."""
    path, _ = build_quantized(tiny_model_dir("llama"), tmp_path / fmt, fmt=fmt, act_order=True)
    llm = LLM(path, device="cpu", load_format="dummy", num_gpu_blocks_override=256)
    out = llm.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 4 for o in out)
    assert len(_quantized_layers(_model(llm))) == 8


# --- the one-row GEMV's tiles, timed at start-up per weight shape -----------------------------------

def test_start_up_timing_sets_each_layers_products_once_per_shape(monkeypatch):
    """With ASYNCSERVE_QUANT_TUNE on, each packed layer takes the GEMV tiles and the few-row plan timed for its
    shape (timed once per shape, logged once) and passes them to the product; on the CPU nothing is timed."""
    from types import SimpleNamespace
    from asyncserve.layers.quantization import packed_int
    timed, products = [], []
    gemv, plan = (32, 64, 4, 4, 3, True), ((8, ((16, 64, 128, 8, 4, 3, False), 6)), (128, "dequant"))
    report = [(8, "GEMM 16x64x128 in 6 K-splits", 0.02, 0.05), (128, "dequant", 0.06, 0.09)]
    monkeypatch.setattr(packed_int, "TUNE_PACKED_INT", True)
    monkeypatch.setattr(packed_int, "HAS_TRITON", True)
    monkeypatch.setattr(packed_int, "fastest_quant_gemv_config",
                        lambda qweight, *args: timed.append(qweight.shape) or (gemv, 0.05, 0.04))
    monkeypatch.setattr(packed_int, "fastest_row_plan", lambda *args: (plan, report))
    monkeypatch.setattr(packed_int, "quant_gemm", lambda *args: products.append(args[-2:]) or args[0])

    def layer(shape, device="cuda"):
        qweight = SimpleNamespace(shape=shape, device=torch.device(device))
        return SimpleNamespace(qweight=qweight, scales=SimpleNamespace(dtype=torch.bfloat16), zeros=None,
                               group_size=128)

    timings = {}
    methods = [GPTQLinearMethod(GPTQConfig(bits=4, group_size=128, desc_act=False, sym=True)) for _ in range(3)]
    lines = [method.tune_single_row(layer(shape), timings)
             for method, shape in zip(methods, [(512, 6144), (512, 6144), (512, 4096)])]
    assert timed == [(512, 6144), (512, 4096)]
    assert lines[0] == ("int4 4096x6144: 1 row GEMV (32, 64, 4, 4, 3, True) 40.0 us (table 50.0); "
                        "8 rows GEMM 16x64x128 in 6 K-splits 20.0 us (untimed 50.0), 128 rows dequant 60.0 us (untimed 90.0)")
    assert lines[1] is None and lines[2].startswith("int4 4096x4096")
    assert all(method.gemv_config == gemv and method.row_plan == plan for method in methods)
    methods[0].apply(layer((512, 6144)), torch.zeros(1, 4096), None)
    assert products == [(gemv, plan)]
    cpu_method = GPTQLinearMethod(GPTQConfig(bits=4, group_size=128, desc_act=False, sym=True))
    assert cpu_method.tune_single_row(layer((512, 6144), "cpu"), timings) is None
    assert cpu_method.gemv_config is None and cpu_method.row_plan is None
