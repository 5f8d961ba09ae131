"""--generation-config / LLM(generation_config=...): the model's sampling defaults, as vLLM applies them."""
from __future__ import annotations

import json
import shutil

import pytest

from asyncserve import ConfigError, EngineConfig, InvalidParameterError, SamplingParams
from asyncserve.engine.generation_defaults import sampling_defaults

FILE_VALUES = {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
               "max_new_tokens": 3, "do_sample": True, "eos_token_id": 2}
EXPECTED = {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
            "max_tokens": 3}


@pytest.fixture
def model_with_defaults(tiny_model_dir, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny_model_dir("qwen3"), path)
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, **FILE_VALUES}))
    return str(path)


def test_auto_reads_the_models_file_vllm_reads_nothing_and_a_path_reads_that_folder(model_with_defaults,
                                                                                      tmp_path):
    assert sampling_defaults("auto", model_with_defaults) == EXPECTED
    assert sampling_defaults("vllm", model_with_defaults) == {}
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"temperature": 0.2, "top_k": None}))
    assert sampling_defaults(str(other), model_with_defaults) == {"temperature": 0.2}
    assert sampling_defaults(str(other / "generation_config.json"), model_with_defaults) == {"temperature": 0.2}
    assert sampling_defaults("auto", str(other / "nothing-here")) == {}


def test_a_path_without_a_generation_config_or_with_bad_values_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="neither 'auto', 'vllm' nor an existing folder"):
        EngineConfig(generation_config=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no generation_config.json there"):
        sampling_defaults(str(tmp_path), "unused")
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 5.0}))
    with pytest.raises(ConfigError, match="top_p"):
        sampling_defaults(str(tmp_path), "unused")


def test_llm_uses_the_defaults_when_no_sampling_params_are_given(make_llm, model_with_defaults):
    from asyncserve import LLM
    llm = LLM(model_with_defaults, device="cpu", num_gpu_blocks_override=256)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.min_p, defaults.repetition_penalty,
            defaults.max_tokens) == (0.7, 0.9, 20, 0.05, 1.1, 3)
    assert len(llm.generate("Hello", use_tqdm=False)[0].outputs[0].token_ids) <= 3
    explicit = llm.generate("Hello", SamplingParams(max_tokens=7, ignore_eos=True), use_tqdm=False)
    assert len(explicit[0].outputs[0].token_ids) == 7  # given SamplingParams are used as they are
    plain = LLM(model_with_defaults, device="cpu", num_gpu_blocks_override=256, generation_config="vllm")
    assert plain.get_default_sampling_params() == SamplingParams()


def test_llm_chat_continues_the_final_message(make_llm):
    llm = make_llm("qwen3")
    tokenizer = llm.get_tokenizer()
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, I am"}]
    output = llm.chat(messages, SamplingParams(max_tokens=2), add_generation_prompt=False,
                      continue_final_message=True, use_tqdm=False)[0]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                         continue_final_message=True)
    assert text.endswith("Hello there, I am")
    assert output.prompt_token_ids == tokenizer.encode(text, add_special_tokens=False)
    with pytest.raises(InvalidParameterError):
        llm.chat(messages, continue_final_message=True, use_tqdm=False)
