"""GGUF checkpoints: tiny files of every supported family and quantization type, served by asyncserve
token for token as transformers' own GGUF loading serves them (both dequantize with llama.cpp's rules),
and float32 files of what transformers' GGUF loading drops, served as the checkpoint they were written from."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFWriter

from asyncserve import LLM, SamplingParams
from asyncserve.checkpoints import gguf_convert
from asyncserve.config import EngineConfig
from asyncserve.errors import ConfigError, UnsupportedModelError
from asyncserve.checkpoints.gguf_archs import unpermute_rotary_rows
from asyncserve.checkpoints.gguf_convert import QUANT_TYPES, convert_gguf, gguf_checkpoint_dir
from asyncserve.testing.tiny_model import build_tiny_checkpoint
from asyncserve.engine.resolve_config import resolve_model_path

from tests.conftest import PROMPTS
from tests.gguf_files import GGUF_SHAPE, LAYER_TYPES, llama_cpp_permute, write_gguf
from tests.models.tiny_families import VARIANTS, build_variant

# Gemma as llama.cpp and transformers' GGUF loading both read it: queries scaled by head_dim 256 (every
# Gemma but the 27Bs), Gemma 3's one global layer in six; Gemma 2's soft-caps at transformers' defaults
# and its LM head tied (neither llama.cpp nor transformers has a Gemma 2 output.weight).
_GEMMA = {"head_dim": 256, "query_pre_attn_scalar": 256}
# family -> (tiny family whose checkpoint is written, config overrides, tokenizer in the file:
# a byte-level BPE pre-tokenizer name, "sentencepiece", or None for none: --tokenizer gives it)
GGUF_FAMILIES = {
    "llama": ("llama3", {"rope_scaling": None, "rope_theta": 100000.0}, "qwen2"),  # llama arch, byte-level BPE
    "mistral": ("mistral", {}, "sentencepiece"),  # llama arch, as llama.cpp writes Mistral
    "qwen2": ("qwen2", {}, None),
    # head_dim 128 as in every real Qwen3: transformers' GGUF loading takes Qwen3Config's default for it
    "qwen3": ("qwen3", {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128}, "qwen2"),
    "gemma2": ("gemma2", {**_GEMMA, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                          "tie_word_embeddings": True}, "sentencepiece"),
    "gemma3": ("gemma3", {**_GEMMA, "num_hidden_layers": 6, "sliding_window_pattern": 6, "rope_scaling": None},
               "sentencepiece"),
    # whole rotary, no window: transformers' GGUF loading reads neither partial rotary nor Phi-3's window
    "phi3": ("phi3", {"partial_rotary_factor": 1.0, "sliding_window": None}, "qwen2"),
}
# Float32 files of what transformers' GGUF loading drops (so the reference is the checkpoint itself):
# Gemma 2's soft-caps (5, 4), Gemma 3's linear rope scaling of global layers and final soft-cap, Phi-3's
# partial rotary and window, LongRoPE. Queries scaled by head_dim (16), as llama.cpp scales them.
FLOAT_FILES = {
    "gemma2": ("gemma2", {"query_pre_attn_scalar": 16}),
    "gemma3": ("gemma3", {"query_pre_attn_scalar": 16, "num_hidden_layers": 6, "sliding_window_pattern": 6,
                          "final_logit_softcapping": 4.0}),
    "phi3": ("phi3", {}),
    "phi3-longrope": ("phi3-longrope", {}),
}


def _build_checkpoint(path, tiny_family: str, **config) -> str:
    if tiny_family in VARIANTS:
        return build_variant(path, tiny_family, **config)
    return build_tiny_checkpoint(path, tiny_family, **config)


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory):
    """family -> (GGUF path, the Hugging Face directory it was written from), built lazily."""
    root = tmp_path_factory.mktemp("gguf")
    made = {}

    def get(family: str):
        if family not in made:
            tiny_family, overrides, pre = GGUF_FAMILIES[family]
            hf_dir = _build_checkpoint(root / f"{family}-hf", tiny_family, **{**GGUF_SHAPE, **overrides})
            made[family] = (write_gguf(hf_dir, str(root / f"{family}.gguf"), family, tokenizer_pre=pre), hf_dir)
        return made[family]

    return get


@pytest.fixture(scope="module")
def transformers_gguf(gguf_models):
    """family -> transformers' model loaded from that family's GGUF file (fp32, eager attention)."""
    from transformers import AutoModelForCausalLM
    loaded = {}

    def get(family: str):
        if family not in loaded:
            path, _ = gguf_models(family)
            loaded[family] = AutoModelForCausalLM.from_pretrained(
                os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
                attn_implementation="eager").eval()
        return loaded[family]

    return get


def _greedy(model, ids: list[int], max_new: int) -> list[int]:
    """transformers' greedy generate of exactly `max_new` tokens."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCSERVE_CACHE_DIR", str(tmp_path / "cache"))


def test_the_files_hold_every_claimed_quantization_type(gguf_models):
    path, _ = gguf_models("llama")
    written = {tensor.tensor_type.name for tensor in GGUFReader(path).tensors}
    assert written == set(QUANT_TYPES)
    assert {qtype.name for types in LAYER_TYPES for qtype in types.values()} | {"Q8_0", "F32"} == written


@pytest.mark.parametrize("family", sorted(GGUF_FAMILIES))
def test_greedy_tokens_match_transformers_gguf_loading(gguf_models, transformers_gguf, family):
    from transformers import AutoTokenizer

    path, hf_dir = gguf_models(family)
    tokenizer_arg = hf_dir if GGUF_FAMILIES[family][2] is None else None
    llm = LLM(path, tokenizer=tokenizer_arg, device="cpu", dtype="float32", num_gpu_blocks_override=256)
    reference = transformers_gguf(family)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    prompts = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS[:4]]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                           SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for ids, output in zip(prompts, outputs):
        assert list(output.outputs[0].token_ids) == _greedy(reference, ids, 12)


@pytest.mark.parametrize("family", sorted(GGUF_FAMILIES))
def test_converted_tensors_equal_transformers_gguf_tensors(gguf_models, transformers_gguf, tmp_path, family):
    path, _ = gguf_models(family)
    ours = _state_dict(convert_gguf(path, str(tmp_path / "converted"), tokenizer=False, progress=False))
    reference = transformers_gguf(family)
    expected = {name: tensor for name, tensor in reference.state_dict().items()
                if not (name == "lm_head.weight" and reference.config.tie_word_embeddings)}
    assert ours.keys() == expected.keys()
    assert [name for name in ours if not torch.equal(ours[name], expected[name])] == []


@pytest.mark.parametrize("variant", sorted(FLOAT_FILES))
def test_float_gguf_serves_as_the_checkpoint_it_was_written_from(tmp_path, variant):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny_family, overrides = FLOAT_FILES[variant]
    hf_dir = _build_checkpoint(tmp_path / "hf", tiny_family, **overrides)
    family = "phi3" if tiny_family.startswith("phi3") else tiny_family
    path = write_gguf(hf_dir, str(tmp_path / f"{variant}.gguf"), family, tokenizer_pre=None, float_only=True)
    llm = LLM(path, tokenizer=hf_dir, device="cpu", dtype="float32", num_gpu_blocks_override=256)
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    prompts = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS[:4] + [" ".join([PROMPTS[1]] * 6)]]
    assert max(map(len, prompts)) > 48  # past LongRoPE's original context (48) and the windows (8, 16)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                           SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    for ids, output in zip(prompts, outputs):
        assert list(output.outputs[0].token_ids) == _greedy(reference, ids, 16)


@pytest.mark.parametrize("family", ["qwen3", "mistral"])  # byte-level BPE, sentencepiece
def test_tokenizer_from_gguf_metadata_encodes_like_the_original(gguf_models, tmp_path, family):
    from transformers import AutoTokenizer

    path, hf_dir = gguf_models(family)
    converted = AutoTokenizer.from_pretrained(convert_gguf(path, str(tmp_path / "converted"), progress=False))
    original = AutoTokenizer.from_pretrained(hf_dir)
    for prompt in PROMPTS + ["<|im_start|>user\nHi<|im_end|>\n", "<s>[INST] Hi [/INST]"]:
        assert converted(prompt)["input_ids"] == original(prompt)["input_ids"]
    assert (converted.eos_token, converted.bos_token) == (original.eos_token, original.bos_token)
    messages = [{"role": "user", "content": "Hi"}]
    assert (converted.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == original.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def test_byte_level_tokenizer_adds_bos_when_the_file_says_so(gguf_models, tmp_path):
    from transformers import AutoTokenizer

    _, hf_dir = gguf_models("qwen3")
    path = write_gguf(hf_dir, str(tmp_path / "bos.gguf"), "qwen3", add_bos=True)
    converted = AutoTokenizer.from_pretrained(convert_gguf(path, str(tmp_path / "converted"), progress=False))
    original = AutoTokenizer.from_pretrained(hf_dir)
    bos = original.convert_tokens_to_ids("<|endoftext|>")
    assert converted("Hello there")["input_ids"] == [bos] + original("Hello there")["input_ids"]


def test_llama31_rope_scaling_is_recovered_from_rope_freqs(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    hf_dir = build_tiny_checkpoint(tmp_path / "hf", "llama3", **GGUF_SHAPE, rope_scaling=scaling)
    path = write_gguf(hf_dir, str(tmp_path / "llama31.gguf"), "llama")
    assert "rope_freqs.weight" in {tensor.name for tensor in GGUFReader(path).tensors}
    out = convert_gguf(path, str(tmp_path / "converted"), progress=False)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["rope_scaling"] == scaling
    llm = LLM(path, device="cpu", dtype="float32", num_gpu_blocks_override=128)  # serves it
    assert len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].token_ids) == 4


def _state_dict(directory: str) -> dict:
    from safetensors.torch import load_file
    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(directory, name)))
    return tensors


def test_large_models_are_written_in_shards_with_an_index(gguf_models, tmp_path, monkeypatch):
    path, _ = gguf_models("qwen3")
    whole = convert_gguf(path, str(tmp_path / "whole"), progress=False)
    monkeypatch.setattr(gguf_convert, "SHARD_BYTES", 1 << 20)
    sharded = convert_gguf(path, str(tmp_path / "sharded"), progress=False)
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 2
    assert not os.path.exists(os.path.join(sharded, "model.safetensors"))
    expected, got = _state_dict(whole), _state_dict(sharded)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_weights_are_dequantized_to_the_serving_dtype(gguf_models, tmp_path):
    path, _ = gguf_models("qwen3")
    as_float32 = _state_dict(convert_gguf(path, str(tmp_path / "fp32"), progress=False))
    out = convert_gguf(path, str(tmp_path / "bf16"), dtype="bfloat16", progress=False)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    for name, tensor in _state_dict(out).items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, as_float32[name].to(torch.bfloat16))
    assert resolve_model_path(EngineConfig(model=path, device="cpu", dtype="bfloat16")) != resolve_model_path(EngineConfig(
        model=path, device="cpu"))  # cached per serving dtype


def test_converted_directory_is_cached_by_file_identity(gguf_models, tmp_path):
    path, _ = gguf_models("qwen3")
    copy = tmp_path / "model.gguf"
    copy.write_bytes(open(path, "rb").read())
    first = gguf_checkpoint_dir(str(copy))
    assert resolve_model_path(EngineConfig(model=str(copy))) == first
    marker = os.path.join(first, "asyncserve_gguf.json")
    os.utime(marker, (1, 1))
    assert gguf_checkpoint_dir(str(copy)) == first and os.stat(marker).st_mtime == 1  # not rebuilt
    os.utime(copy, (2, 2))  # the file changed: a new directory
    assert gguf_checkpoint_dir(str(copy)) != first


def test_llama_cpp_rotary_permutation_is_undone():
    weight = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)  # 4 heads of 8 rows
    assert np.array_equal(unpermute_rotary_rows(llama_cpp_permute(weight, 4), 4), weight)
    assert not np.array_equal(llama_cpp_permute(weight, 4), weight)


def _minimal_gguf(path, arch: str, qtype=Q.F32) -> str:
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_head_count(2)
    weight = np.zeros((8, 32), np.float32)
    if qtype == Q.F32:
        writer.add_tensor("token_embd.weight", weight)
    else:  # IQ4_NL: 32 values in 18 bytes
        writer.add_tensor("token_embd.weight", np.zeros((8, 18), np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_unsupported_architecture_is_named(tmp_path):
    path = _minimal_gguf(tmp_path / "phi.gguf", "phi2")
    with pytest.raises(UnsupportedModelError, match="architecture 'phi2'.*Supported GGUF architectures: "
                                                    "llama, qwen2, qwen3, gemma2, gemma3, phi3"):
        convert_gguf(path, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def _converted_config(tmp_path, arch: str, layers: int, hidden: int, heads: int, add_fields=None) -> dict:
    """config.json converted from a file of `arch` with these fields (and `add_fields(writer)`'s)."""
    writer = GGUFWriter(str(tmp_path / "model.gguf"), arch)
    writer.add_block_count(layers)
    writer.add_embedding_length(hidden)
    writer.add_head_count(heads)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    if add_fields is not None:
        add_fields(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = convert_gguf(str(tmp_path / "model.gguf"), str(tmp_path / "out"), tokenizer=False, progress=False)
    with open(os.path.join(out, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("arch, layers, hidden, heads, head_dim, scalar", [
    ("gemma3", 62, 5376, 32, 128, 168),  # Gemma 3 27B: hidden / heads, as its checkpoint says
    ("gemma2", 46, 4608, 32, 128, 144),  # Gemma 2 27B
    ("gemma3", 34, 2560, 8, 256, 256),   # Gemma 3 4B: head_dim, as every other Gemma
    ("gemma2", 42, 3584, 16, 256, 256),  # Gemma 2 9B
])
def test_gemma_queries_are_scaled_as_llama_cpp_scales_them(tmp_path, arch, layers, hidden, heads, head_dim,
                                                           scalar):
    config = _converted_config(tmp_path, arch, layers, hidden, heads, lambda w: w.add_key_length(head_dim))
    assert config["query_pre_attn_scalar"] == scalar


@pytest.mark.parametrize("attn_factor, expected", [(1.5, 1.5), (math.sqrt(1 + math.log(32) / math.log(4096)), None)])
def test_phi3_longrope_keeps_an_attention_factor_other_than_its_default(tmp_path, attn_factor, expected):
    def add_fields(writer):
        writer.add_context_length(32 * 4096)
        writer.add_rope_scaling_orig_ctx_len(4096)
        writer.add_rope_scaling_attn_factors(attn_factor)
        writer.add_tensor("rope_factors_long.weight", np.full(8, 2.0, np.float32))
        writer.add_tensor("rope_factors_short.weight", np.full(8, 1.0, np.float32))

    config = _converted_config(tmp_path, "phi3", 1, 64, 4, add_fields)
    assert config["rope_scaling"].get("attention_factor") == expected
    assert config["rope_scaling"]["long_factor"] == [2.0] * 8 and config["original_max_position_embeddings"] == 4096


def test_unsupported_quantization_type_is_named(tmp_path):
    path = _minimal_gguf(tmp_path / "iq.gguf", "llama", Q.IQ4_NL)
    with pytest.raises(ConfigError, match="quantization type IQ4_NL .*token_embd.weight.*Supported types: F32"):
        convert_gguf(path, str(tmp_path / "out"))


def test_gguf_without_tokenizer_asks_for_one(gguf_models):
    path, _ = gguf_models("qwen2")
    with pytest.raises(ConfigError, match="carries no tokenizer.*--tokenizer"):
        resolve_model_path(EngineConfig(model=path))


def test_missing_gguf_file_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model_path(EngineConfig(model=str(tmp_path / "absent.gguf")))


def test_converted_config_says_what_the_file_says(gguf_models, tmp_path):
    path, hf_dir = gguf_models("qwen2")
    out = convert_gguf(path, str(tmp_path / "converted"), tokenizer=False, progress=False)
    assert not os.path.exists(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "config.json")) as f:
        converted = json.load(f)
    with open(os.path.join(hf_dir, "config.json")) as f:
        original = json.load(f)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps", "vocab_size",
                "tie_word_embeddings", "model_type", "architectures"):
        assert converted[key] == original[key], key
