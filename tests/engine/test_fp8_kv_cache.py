"""`kv_cache_dtype='fp8'` end to end on the CPU: an e4m3 pool holding twice the bf16 tokens in the same
memory, per-layer k/v scales from the checkpoint (1.0 otherwise), greedy tokens that mostly agree with
the unquantized cache, and clear errors for what is not served."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from asyncserve import LLM, SamplingParams
from asyncserve.config import EngineConfig
from asyncserve.errors import ConfigError
from asyncserve.kernels.kv_scale import quantize_kv_ref
from tests.checkpoint_edits import copy_checkpoint
from tests.conftest import PROMPTS, assert_pool_clean
from tests.quantized_checkpoints import build_fp8

FP8 = torch.float8_e4m3fn
MAX_TOKENS = 24
# Measured with the tiny random checkpoints (llama 119/144, qwen3 133/144: 252/288 = 0.875). Their
# logits are nearly flat (the top token often ~1 nat above the next), so e4m3's 3 mantissa bits flip some;
# a bf16 pool, for comparison, agrees on 143/144 (llama) and 144/144 (qwen2).
MIN_AGREEMENT = 0.8


@pytest.fixture
def make_path_llm():
    """`make_llm` for a checkpoint directory of the test's own."""
    made = []

    def make(path: str, **kwargs):
        made.append(LLM(path, device="cpu", num_gpu_blocks_override=512, **kwargs))
        return made[-1]

    yield make
    for llm in made:
        assert_pool_clean(llm.llm_engine)


def _greedy(max_tokens: int = MAX_TOKENS, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


def _pool(llm: LLM):
    return llm.llm_engine.executor.runner.kv_pool


def _attention_layers(llm: LLM):
    return llm.llm_engine.executor.model.attention_layers()


def test_fp8_kv_cache_agrees_with_the_unquantized_cache_on_most_greedy_tokens(make_llm):
    """Each unquantized greedy token, teacher-forced: is it also the fp8 cache's top token in the same
    context? (Free-running outputs diverge for good after the first flip, which says nothing about
    the tokens after it.)"""
    agreeing = total = 0
    for family in ("llama", "qwen3"):
        exact = make_llm(family).generate(PROMPTS, _greedy(), use_tqdm=False)
        # Prefix caching off: a cache hit would skip the prompt logprobs of the cached positions.
        fp8 = make_llm(family, kv_cache_dtype="fp8", enable_prefix_caching=False)
        assert _pool(fp8).storage.dtype == FP8
        forced = [{"prompt_token_ids": out.prompt_token_ids + out.outputs[0].token_ids} for out in exact]
        scored = fp8.generate(forced, _greedy(1, prompt_logprobs=1), use_tqdm=False)
        for out, score in zip(exact, scored):
            start = len(out.prompt_token_ids)
            for position, token in enumerate(out.outputs[0].token_ids, start):
                agreeing += score.prompt_logprobs[position][token].rank == 1
                total += 1
    assert total == 2 * len(PROMPTS) * MAX_TOKENS
    assert MIN_AGREEMENT <= agreeing / total < 1.0, f"{agreeing}/{total}"  # < 1: the pool really is fp8


def test_fp8_pool_holds_twice_the_bf16_tokens_in_the_same_memory(make_llm, caplog):
    space = dict(dtype="bfloat16", cpu_kv_cache_space=0.01, num_gpu_blocks_override=None)
    bf16 = make_llm("llama", **space)
    with caplog.at_level(logging.INFO, logger="asyncserve"):
        fp8 = make_llm("llama", kv_cache_dtype="fp8", **space)
    assert fp8.llm_engine.block_pool.num_blocks == 2 * bf16.llm_engine.block_pool.num_blocks
    assert fp8.llm_engine.executor.bytes_per_block() * 2 == bf16.llm_engine.executor.bytes_per_block()
    assert _pool(fp8).storage.dtype == FP8 and _pool(bf16).storage.dtype == torch.bfloat16
    assert _pool(fp8).storage.nbytes == _pool(bf16).storage.nbytes <= 0.01 * (1 << 30)
    tokens = fp8.llm_engine.block_pool.num_blocks * 16
    assert f"= {tokens} tokens of float8_e4m3fn" in caplog.text
    outputs = fp8.generate(PROMPTS[:2], _greedy(8), use_tqdm=False)  # a bf16 model over an fp8 pool runs
    assert all(len(out.outputs[0].token_ids) > 0 for out in outputs)


def test_fp8_and_fp8_e4m3_name_the_same_pool(make_llm):
    assert _pool(make_llm("qwen3", kv_cache_dtype="fp8_e4m3")).storage.dtype == FP8
    assert _pool(make_llm("qwen3", kv_cache_dtype="auto")).storage.dtype == torch.float32  # the model's


# How the checkpoints vLLM reads name the scales: (layer 0's k and v names, layer 1's).
SCALE_NAMES = {
    "self_attn.k_scale": ("self_attn.k_scale", "self_attn.v_scale"),
    "k_proj.output_scale": ("self_attn.k_proj.output_scale", "self_attn.v_proj.output_scale"),
    "k_proj.k_scale": ("self_attn.k_proj.k_scale", "self_attn.v_proj.v_scale"),
}
SCALES = {0: (0.25, 0.5), 1: (3.0, 0.125)}  # layer -> (k_scale, v_scale)


def _with_kv_scales(source: str, target, names: tuple[str, str], shape=(), extra: dict | None = None) -> str:
    weights = load_file(f"{source}/model.safetensors")
    for layer, (k_scale, v_scale) in SCALES.items():
        weights[f"model.layers.{layer}.{names[0]}"] = torch.tensor(k_scale).reshape(shape)
        weights[f"model.layers.{layer}.{names[1]}"] = torch.tensor(v_scale).reshape(shape)
    weights.update(extra or {})
    return copy_checkpoint(source, target, None, weights)


@pytest.mark.parametrize("naming", sorted(SCALE_NAMES))
def test_checkpoint_kv_scales_are_loaded_and_divide_the_stored_values(naming, make_llm, make_path_llm,
                                                                      tiny_model_dir, tmp_path):
    source = tiny_model_dir("llama")
    # FP8 attention's query and probability scales ride along in such checkpoints: skipped, not errors.
    extra = {"model.layers.0.self_attn.q_scale": torch.tensor(1.5),
             "model.layers.1.self_attn.q_proj.output_scale": torch.tensor(1.5)}
    path = _with_kv_scales(source, tmp_path / "scaled", SCALE_NAMES[naming], extra=extra)
    scaled = make_path_llm(path, kv_cache_dtype="fp8")
    for layer, attention in enumerate(_attention_layers(scaled)):
        assert (attention.k_scale.item(), attention.v_scale.item()) == SCALES[layer]
    exact = make_llm("llama")  # the fp32 pool: layer 0 sees the same keys and values (nothing before it)
    prompt = PROMPTS[4]
    scaled.generate([prompt], _greedy(1), use_tqdm=False)  # the prefill writes the prompt's KV
    exact.generate([prompt], _greedy(1), use_tqdm=False)
    k_scale, v_scale = SCALES[0]
    stored_k, stored_v = _pool(scaled).layer_caches()[0]
    exact_k, exact_v = _pool(exact).layer_caches()[0]
    assert int((exact_k != 0).any(dim=(2, 3)).sum()) > 16  # the same slots hold the prompt in both
    assert torch.equal(stored_k.view(torch.uint8), quantize_kv_ref(exact_k, k_scale, FP8).view(torch.uint8))
    assert torch.equal(stored_v.view(torch.uint8), quantize_kv_ref(exact_v, v_scale, FP8).view(torch.uint8))
    assert not torch.equal(stored_k.view(torch.uint8), exact_k.to(FP8).view(torch.uint8))  # 1.0 differs


def test_checkpoint_kv_scales_are_unused_with_the_model_dtype_pool(make_llm, make_path_llm, tiny_model_dir,
                                                                   tmp_path):
    source = tiny_model_dir("llama")
    path = _with_kv_scales(source, tmp_path / "scaled", SCALE_NAMES["self_attn.k_scale"])
    params = _greedy(12)
    with_scales = make_path_llm(path).generate(PROMPTS, params, use_tqdm=False)
    without = make_llm("llama").generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in with_scales] == [o.outputs[0].token_ids for o in without]


def test_without_checkpoint_scales_every_layer_scales_by_one(make_llm):
    llm = make_llm("qwen2", kv_cache_dtype="fp8")
    assert all((a.k_scale.item(), a.v_scale.item()) == (1.0, 1.0) for a in _attention_layers(llm))


def test_compressed_tensors_fp8_checkpoint_with_kv_cache_scheme_serves_its_scales(make_path_llm,
                                                                                    tiny_model_dir, tmp_path):
    source = tiny_model_dir("llama")
    fp8_path, _ = build_fp8(source, tmp_path / "ct", per_channel_modules=(), compressed_tensors=True)
    with open(f"{fp8_path}/config.json") as f:
        config = json.load(f)
    config["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                        "dynamic": False, "symmetric": True}
    path = _with_kv_scales(fp8_path, tmp_path / "ct-kv", SCALE_NAMES["k_proj.output_scale"], shape=(1,))
    with open(f"{path}/config.json", "w") as f:
        json.dump(config, f)
    llm = make_path_llm(path, kv_cache_dtype="fp8")
    assert [(a.k_scale.item(), a.v_scale.item()) for a in _attention_layers(llm)] == [SCALES[0], SCALES[1]]
    assert len(llm.generate(PROMPTS[:2], _greedy(6), use_tqdm=False)[0].outputs[0].token_ids) > 0


def test_an_int8_kv_cache_scheme_is_named(tiny_model_dir, tmp_path):
    from asyncserve.layers.quantization import get_quantization_config
    source = tiny_model_dir("llama")
    fp8_path, _ = build_fp8(source, tmp_path / "ct", per_channel_modules=(), compressed_tensors=True)
    with open(f"{fp8_path}/config.json") as f:
        config = json.load(f)["quantization_config"]
    config["kv_cache_scheme"] = {"num_bits": 8, "type": "int", "strategy": "tensor"}
    with pytest.raises(ConfigError, match="kv_cache_scheme type='int' num_bits=8"):
        get_quantization_config(None, config)


@pytest.mark.parametrize("shape,value,message", [
    ((2,), 0.5, r"one number per layer \(per-tensor\), got shape \(2,\)"),
    ((), 0.0, "positive finite number, got 0.0"),
])
def test_a_kv_scale_that_cannot_be_served_is_a_clear_error(shape, value, message, tiny_model_dir, tmp_path):
    source = tiny_model_dir("llama")
    weights = load_file(f"{source}/model.safetensors")
    weights["model.layers.0.self_attn.k_scale"] = torch.full(shape, value)
    path = copy_checkpoint(source, tmp_path / "bad", None, weights)
    with pytest.raises(ConfigError, match="model.layers.0.self_attn.k_scale.*" + message):
        LLM(path, device="cpu", kv_cache_dtype="fp8", num_gpu_blocks_override=256)


@pytest.mark.parametrize("name,message", [
    ("int8", r"kv_cache_dtype='int8' is not supported \(supported: 'auto' \(the model's dtype\), 'fp8', "
             r"'fp8_e4m3'\)"),
    ("fp8_e5m2", r"kv_cache_dtype='fp8_e5m2' is not supported: use 'fp8' \(e4m3"),
])
def test_an_unserved_kv_cache_dtype_is_a_clear_error_before_loading(name, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig(kv_cache_dtype=name)
    with pytest.raises(ConfigError, match=message):
        LLM(kv_cache_dtype=name)


def test_swap_preemption_moves_fp8_blocks_unchanged(make_llm):
    prompts = [f"Story {i}: once upon a time, " + "far away " * i for i in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    expected = make_llm("qwen2", kv_cache_dtype="fp8", enable_prefix_caching=False).generate(
        prompts, params, use_tqdm=False)
    llm = make_llm("qwen2", kv_cache_dtype="fp8", enable_prefix_caching=False, num_gpu_blocks_override=8,
                   max_model_len=128, preemption_mode="swap", swap_space=0.01)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    assert llm.llm_engine.kv_manager.num_swaps > 0
    assert _pool(llm).host_storage.dtype == FP8
