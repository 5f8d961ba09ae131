"""Tiny random-weight checkpoints: real architectures, real tokenizers, built offline."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from asyncserve.testing import tiny_model
from asyncserve.testing.tiny_model import (
    FAMILIES,
    MARKER_FILE,
    build_tiny_checkpoint,
    build_tokenizer,
    default_model_path,
)

ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "llama3": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "mixtral": ("mixtral", "MixtralForCausalLM"),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
    "gpt_oss": ("gpt_oss", "GptOssForCausalLM"),
}
TOKENIZER_STYLE = {"llama": "metaspace", "mistral": "metaspace", "mixtral": "metaspace", "gemma2": "metaspace",
                   "gemma3": "metaspace", "llama3": "byte_level", "qwen2": "byte_level", "qwen3": "byte_level",
                   "qwen2_moe": "byte_level", "qwen3_moe": "byte_level", "gpt_oss": "harmony"}
NON_ASCII = ("Café naïve Zürich — Καλημέρα κόσμε, Привет мир!\n"
             "你好，世界 こんにちは 안녕하세요 😀🦀 👨‍👩‍👧 龘\tend  two spaces")
PROMPT = "Once upon a time, in a small village by the sea,"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def checkpoints(tiny_dir):
    return {family: build_tiny_checkpoint(tiny_dir / family, family) for family in FAMILIES}


@pytest.fixture(scope="session")
def loaded(checkpoints):
    """family -> (model, tokenizer) loaded back through the Auto classes."""
    result = {}
    for family, path in checkpoints.items():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        result[family] = (model, AutoTokenizer.from_pretrained(path))
    return result


def _config_json(path) -> dict:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_names_the_real_architecture(checkpoints, family):
    config = _config_json(checkpoints[family])
    assert (config["model_type"], config["architectures"]) == (
        ARCHITECTURES[family][0], [ARCHITECTURES[family][1]])
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"],
            config["max_position_embeddings"]) == (64, 2, 4, 2, 128, 2048)
    assert config["vocab_size"] == len(build_tokenizer(TOKENIZER_STYLE[family]))


def test_llama3_config_has_llama3_rope_scaling(checkpoints):
    config = _config_json(checkpoints["llama3"])
    assert config["rope_theta"] == 500000.0
    assert config["rope_scaling"] == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
    assert AutoConfig.from_pretrained(checkpoints["llama3"]).rope_parameters["rope_type"] == "llama3"


def test_mistral_config_has_no_sliding_window(checkpoints):
    assert _config_json(checkpoints["mistral"])["sliding_window"] is None


def test_gemma_configs_have_local_and_global_layers_in_hub_form(checkpoints, loaded):
    gemma2, gemma3 = _config_json(checkpoints["gemma2"]), _config_json(checkpoints["gemma3"])
    assert (gemma2["sliding_window"], gemma2["attn_logit_softcapping"], gemma2["final_logit_softcapping"]) == (
        8, 5.0, 4.0)
    assert (gemma3["rope_theta"], gemma3["rope_local_base_freq"], gemma3["sliding_window_pattern"]) == (
        1000000.0, 10000.0, 2)
    assert gemma3["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    for family in ("gemma2", "gemma3"):
        model = loaded[family][0]
        assert model.config.layer_types == ["sliding_attention", "full_attention"]
        norm = model.model.layers[0].input_layernorm.weight
        assert norm.abs().mean() < 0.5  # drawn around 0: Gemma scales by (1 + weight)
    assert loaded["gemma3"][0].model.layers[0].self_attn.q_norm.weight.shape == (16,)


def test_qwen_families_tie_embeddings_and_have_their_own_attention_weights(loaded):
    qwen2, qwen3 = loaded["qwen2"][0], loaded["qwen3"][0]
    for model in (qwen2, qwen3):
        assert model.config.tie_word_embeddings
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert qwen2.model.layers[0].self_attn.q_proj.bias is not None
    assert qwen3.config.head_dim == 16
    assert qwen3.model.layers[0].self_attn.q_norm.weight.shape == (16,)


def test_moe_families_have_experts_where_their_configs_say(loaded):
    mixtral, qwen2_moe, qwen3_moe = (loaded[f][0].model for f in ("mixtral", "qwen2_moe", "qwen3_moe"))
    assert mixtral.config.num_local_experts == 6 and mixtral.config.num_experts_per_tok == 2
    assert all(hasattr(layer, "mlp") and hasattr(layer.mlp, "experts") for layer in mixtral.layers)
    for model, top_k, renormalize in ((qwen2_moe, 3, False), (qwen3_moe, 3, True)):
        assert (model.config.num_experts_per_tok, model.config.norm_topk_prob) == (top_k, renormalize)
        assert not hasattr(model.layers[0].mlp, "experts")  # mlp_only_layers / decoder_sparse_step
        assert hasattr(model.layers[1].mlp, "experts")
    assert qwen2_moe.layers[1].mlp.shared_expert_gate.weight.shape == (1, 64)
    assert not hasattr(qwen3_moe.layers[1].mlp, "shared_expert")
    assert qwen3_moe.layers[0].self_attn.q_norm.weight.shape == (16,)


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_are_float32_safetensors(checkpoints, family):
    with safe_open(os.path.join(checkpoints[family], "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"F32"}


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_does_not_repeat_one_token(loaded, family):
    model, tokenizer = loaded[family]
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    output = model.generate(input_ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    new_tokens = output[0, input_ids.shape[1]:].tolist()
    assert len(new_tokens) == 16
    assert len(set(new_tokens)) > 1


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_have_a_clear_greedy_winner(loaded, family):
    model, tokenizer = loaded[family]
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids).logits[0, -6:]
    top2 = logits.topk(2, dim=-1).values
    assert torch.isfinite(logits).all()
    assert (top2[:, 0] - top2[:, 1]).min().item() > 1e-3
    assert logits.std(dim=-1).min().item() > 1.0  # spread well beyond HF's 0.02 init


def test_same_seed_gives_same_weights_and_other_seed_differs(tiny_dir, loaded):
    again = AutoModelForCausalLM.from_pretrained(build_tiny_checkpoint(tiny_dir / "qwen3-again", "qwen3"))
    other = AutoModelForCausalLM.from_pretrained(
        build_tiny_checkpoint(tiny_dir / "qwen3-seed1", "qwen3", seed=1))
    reference = loaded["qwen3"][0].state_dict()
    assert all(torch.equal(reference[name], tensor) for name, tensor in again.state_dict().items())
    assert not torch.equal(reference["model.embed_tokens.weight"], other.model.embed_tokens.weight)


def test_sharded_checkpoint_has_index_and_loads_the_same_weights(tiny_dir, loaded):
    path = build_tiny_checkpoint(tiny_dir / "llama-sharded", "llama", shard=True)
    with open(os.path.join(path, "model.safetensors.index.json"), encoding="utf-8") as f:
        shard_files = set(json.load(f)["weight_map"].values())
    assert len(shard_files) > 1
    assert all(os.path.isfile(os.path.join(path, name)) for name in shard_files)
    assert not os.path.exists(os.path.join(path, "model.safetensors"))
    sharded = AutoModelForCausalLM.from_pretrained(path).state_dict()
    reference = loaded["llama"][0].state_dict()
    assert sharded.keys() == reference.keys()
    assert all(torch.equal(reference[name], sharded[name]) for name in reference)


def test_config_overrides_reach_config_json(tiny_dir):
    path = build_tiny_checkpoint(tiny_dir / "llama-3-layers", "llama", num_hidden_layers=3)
    assert _config_json(path)["num_hidden_layers"] == 3


@pytest.mark.parametrize("style", ["byte_level", "harmony", "metaspace"])
def test_tokenizer_round_trips_non_ascii(style):
    tokenizer = build_tokenizer(style)
    ids = tokenizer.encode(NON_ASCII, add_special_tokens=False)
    assert tokenizer.decode(ids) == NON_ASCII


@pytest.mark.parametrize("style", ["byte_level", "harmony", "metaspace"])
def test_tokenizer_is_the_same_every_build(style):
    first, second = build_tokenizer(style), build_tokenizer(style)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert 500 <= len(first) <= 1000


@pytest.mark.parametrize("style,text", [("byte_level", "🦀"), ("byte_level", "龘"),
                                        ("metaspace", "🦀"), ("metaspace", "龘")])
def test_multibyte_character_splits_over_several_tokens(style, text):
    tokenizer = build_tokenizer(style)
    ids = tokenizer.encode("a" + text, add_special_tokens=False)
    assert len(ids) > 2
    # a prefix of the tokens ends inside the character: the detokenizer must wait
    assert tokenizer.decode(ids[:2]).endswith("\ufffd")
    assert tokenizer.decode(ids) == "a" + text


def test_metaspace_tokenizer_has_llama2_layout():
    tokenizer = build_tokenizer("metaspace")
    assert [tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [0, 1, 2]
    assert tokenizer.convert_tokens_to_ids(["<0x00>", "<0xFF>"]) == [3, 258]
    assert tokenizer("Hello world").input_ids[0] == 1
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("Hello", add_special_tokens=False)[0]).startswith("▁")


def test_byte_level_tokenizer_adds_no_bos():
    tokenizer = build_tokenizer("byte_level")
    assert tokenizer("Hello world").input_ids == tokenizer.encode("Hello world", add_special_tokens=False)
    assert tokenizer.eos_token == "<|im_end|>"


def test_chatml_template_renders_system_message_and_generation_prompt():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = build_tokenizer("byte_level").apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")


def test_harmony_template_renders_gpt_oss_turns_tools_and_calls():
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "1", "content": "-3 C"}]
    text = build_tokenizer("harmony").apply_chat_template(messages, tools=tools, tokenize=False,
                                                          add_generation_prompt=True, reasoning_effort="low")
    assert text.startswith("<|start|>system<|message|>You are ChatGPT")
    assert "Reasoning: low\n\n# Valid channels: analysis, commentary, final." in text
    assert "<|start|>developer<|message|># Instructions\n\nBe brief.\n\n# Tools\n\n## functions" in text
    assert 'type get_weather = (_: {"type": "object"' in text
    assert text.endswith("<|start|>user<|message|>Weather in Oslo?<|end|>"
                         "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
                         '<|message|>{"city": "Oslo"}<|call|>'
                         "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>-3 C<|end|>"
                         "<|start|>assistant")


def test_llama2_template_renders_inst_blocks():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    text = build_tokenizer("metaspace").apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi! [/INST] Hello. </s>"
                    "<s>[INST] Bye [/INST]")


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_tokenizer_matches_built_one(loaded, family):
    tokenizer = loaded[family][1]
    built = build_tokenizer(TOKENIZER_STYLE[family])
    assert tokenizer(NON_ASCII).input_ids == built(NON_ASCII).input_ids
    assert tokenizer.decode(built.encode(NON_ASCII, add_special_tokens=False)) == NON_ASCII
    assert tokenizer.chat_template == built.chat_template


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_config_names_the_special_tokens(loaded, family):
    model, tokenizer = loaded[family]
    generation_config = model.generation_config
    if TOKENIZER_STYLE[family] == "harmony":  # GPT-OSS: the answer ends with <|return|>, a tool call with <|call|>
        start, end_of_text, answer_end, call_end = tokenizer.convert_tokens_to_ids(
            ["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|call|>"])
        assert generation_config.bos_token_id == start
        assert generation_config.eos_token_id == [answer_end, end_of_text, call_end]
        assert generation_config.pad_token_id == end_of_text
    elif TOKENIZER_STYLE[family] == "byte_level":
        end_of_text, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
        assert generation_config.bos_token_id == end_of_text
        assert generation_config.eos_token_id == [im_end, end_of_text]
        assert generation_config.pad_token_id == end_of_text
        assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    else:
        assert (generation_config.bos_token_id, generation_config.eos_token_id) == (1, 2)
        assert tokenizer.convert_ids_to_tokens([1, 2]) == ["<s>", "</s>"]


def test_build_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "stray.txt").write_text("x")
    with pytest.raises(FileExistsError):
        build_tiny_checkpoint(tmp_path, "llama")


def test_build_into_an_existing_empty_directory_leaves_no_staging_dirs(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    build_tiny_checkpoint(target, "llama")
    assert os.path.isfile(target / MARKER_FILE)
    assert os.listdir(tmp_path) == ["model"]


def test_builder_that_loses_the_race_keeps_the_winners_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "model"
    write = tiny_model._write_checkpoint

    def write_while_another_process_finishes_first(out_dir, family, *args):
        write(out_dir, family, *args)
        monkeypatch.setattr(tiny_model, "_write_checkpoint", write)
        build_tiny_checkpoint(target, family, seed=7)  # the other process

    monkeypatch.setattr(tiny_model, "_write_checkpoint", write_while_another_process_finishes_first)
    assert build_tiny_checkpoint(target, "llama") == str(target)
    with open(target / MARKER_FILE, encoding="utf-8") as f:
        assert json.load(f)["seed"] == 7
    assert os.listdir(tmp_path) == ["model"]


def test_default_model_is_built_once_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCSERVE_CACHE_DIR", str(tmp_path))
    path = default_model_path()
    assert path == str(tmp_path / f"tiny-qwen3-v{tiny_model.DEFAULT_MODEL_VERSION}")
    assert _config_json(path)["architectures"] == ["Qwen3ForCausalLM"]

    def fail(*args, **kwargs):
        raise AssertionError("the default model was rebuilt")

    monkeypatch.setattr(tiny_model, "build_tiny_checkpoint", fail)
    assert default_model_path() == path


def test_default_model_without_marker_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCSERVE_CACHE_DIR", str(tmp_path))
    stale = tmp_path / f"tiny-qwen3-v{tiny_model.DEFAULT_MODEL_VERSION}"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    path = default_model_path()
    assert os.path.isfile(os.path.join(path, MARKER_FILE))
    assert _config_json(path)["model_type"] == "qwen3"


def test_any_served_architecture_transformers_can_build_is_built_by_its_name(tmp_path):
    """A new family needs no spec here: the builder finds it through the registry and transformers'
    model types (Phi-3 has no entry in FAMILIES), and serves token for token like transformers."""
    from asyncserve import LLM, SamplingParams
    from tests.conftest import hf_greedy
    path = build_tiny_checkpoint(tmp_path / "phi3", "Phi3ForCausalLM")
    assert AutoConfig.from_pretrained(path).model_type == "phi3"
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = AutoTokenizer.from_pretrained(path).encode(PROMPT)
    llm = LLM(path, device="cpu", dtype="float32", num_gpu_blocks_override=64, max_model_len=256)
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    assert list(out[0].outputs[0].token_ids) == hf_greedy(reference, prompt, 8)
    with pytest.raises(ValueError, match="unknown family 'FalconForCausalLM'"):
        build_tiny_checkpoint(tmp_path / "falcon", "FalconForCausalLM")
