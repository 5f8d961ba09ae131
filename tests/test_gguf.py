"""GGUF checkpoints: tiny files of every supported family and quantization type, served by asyncserve
token for token as transformers' own GGUF loading serves them (both dequantize with llama.cpp's rules)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFWriter

from asyncserve import LLM, SamplingParams
from asyncserve import gguf_convert
from asyncserve.config import EngineConfig
from asyncserve.errors import ConfigError, UnsupportedModelError
from asyncserve.gguf_convert import QUANT_TYPES, _unpermute_rotary_rows, convert_gguf, gguf_checkpoint_dir
from asyncserve.tiny_model import build_tiny_checkpoint

from tests.conftest import PROMPTS
from tests.gguf_files import GGUF_SHAPE, LAYER_TYPES, llama_cpp_permute, write_gguf

# family -> (tiny family whose checkpoint is written, config overrides, tokenizer in the file:
# a byte-level BPE pre-tokenizer name, "sentencepiece", or None for none: --tokenizer gives it)
GGUF_FAMILIES = {
    "llama": ("llama3", {"rope_scaling": None, "rope_theta": 100000.0}, "qwen2"),  # llama arch, byte-level BPE
    "mistral": ("mistral", {}, "sentencepiece"),  # llama arch, as llama.cpp writes Mistral
    "qwen2": ("qwen2", {}, None),
    # head_dim 128 as in every real Qwen3: transformers' GGUF loading takes Qwen3Config's default for it
    "qwen3": ("qwen3", {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128}, "qwen2"),
}


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory):
    """family -> (GGUF path, the Hugging Face directory it was written from), built lazily."""
    root = tmp_path_factory.mktemp("gguf")
    made = {}

    def get(family: str):
        if family not in made:
            tiny_family, overrides, pre = GGUF_FAMILIES[family]
            hf_dir = build_tiny_checkpoint(root / f"{family}-hf", tiny_family, **{**GGUF_SHAPE, **overrides})
            made[family] = (write_gguf(hf_dir, str(root / f"{family}.gguf"), family, tokenizer_pre=pre), hf_dir)
        return made[family]

    return get


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCSERVE_CACHE_DIR", str(tmp_path / "cache"))


def test_the_files_hold_every_claimed_quantization_type(gguf_models):
    path, _ = gguf_models("llama")
    written = {tensor.tensor_type.name for tensor in GGUFReader(path).tensors}
    assert written == set(QUANT_TYPES)
    assert {qtype.name for types in LAYER_TYPES for qtype in types.values()} | {"Q8_0", "F32"} == written


@pytest.mark.parametrize("family", sorted(GGUF_FAMILIES))
def test_greedy_tokens_match_transformers_gguf_loading(gguf_models, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, hf_dir = gguf_models(family)
    tokenizer_arg = hf_dir if GGUF_FAMILIES[family][2] is None else None
    llm = LLM(path, tokenizer=tokenizer_arg, device="cpu", dtype="float32", num_gpu_blocks_override=256)
    reference = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    prompts = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS[:4]]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                           SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for ids, output in zip(prompts, outputs):
        with torch.no_grad():
            expected = reference.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12,
                                          do_sample=False, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        assert list(output.outputs[0].token_ids) == expected[0, len(ids):].tolist()


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
    assert EngineConfig(model=path, device="cpu", dtype="bfloat16").model_path != EngineConfig(
        model=path, device="cpu").model_path  # cached per serving dtype


def test_converted_directory_is_cached_by_file_identity(gguf_models, tmp_path):
    path, _ = gguf_models("qwen3")
    copy = tmp_path / "model.gguf"
    copy.write_bytes(open(path, "rb").read())
    first = gguf_checkpoint_dir(str(copy))
    assert EngineConfig(model=str(copy)).model_path == first
    marker = os.path.join(first, "asyncserve_gguf.json")
    os.utime(marker, (1, 1))
    assert gguf_checkpoint_dir(str(copy)) == first and os.stat(marker).st_mtime == 1  # not rebuilt
    os.utime(copy, (2, 2))  # the file changed: a new directory
    assert gguf_checkpoint_dir(str(copy)) != first


def test_llama_cpp_rotary_permutation_is_undone():
    weight = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)  # 4 heads of 8 rows
    assert np.array_equal(_unpermute_rotary_rows(llama_cpp_permute(weight, 4), 4), weight)
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
    path = _minimal_gguf(tmp_path / "phi.gguf", "phi3")
    with pytest.raises(UnsupportedModelError, match="architecture 'phi3'.*Supported GGUF architectures: "
                                                    "llama, qwen2, qwen3"):
        convert_gguf(path, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_unsupported_quantization_type_is_named(tmp_path):
    path = _minimal_gguf(tmp_path / "iq.gguf", "llama", Q.IQ4_NL)
    with pytest.raises(ConfigError, match="quantization type IQ4_NL .*token_embd.weight.*Supported types: F32"):
        convert_gguf(path, str(tmp_path / "out"))


def test_gguf_without_tokenizer_asks_for_one(gguf_models):
    path, _ = gguf_models("qwen2")
    with pytest.raises(ConfigError, match="carries no tokenizer.*--tokenizer"):
        EngineConfig(model=path).model_path


def test_missing_gguf_file_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        EngineConfig(model=str(tmp_path / "absent.gguf")).model_path


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
