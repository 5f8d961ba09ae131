"""How generation ends, and how bad input is refused before it reaches the engine."""
from __future__ import annotations

import pytest

from asyncserve import (ConfigError, PromptTooLongError, SamplingParams, SamplingParamsError,
                        UnsupportedModelError)

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _greedy_text(llm, prompt, max_tokens=24):
    return llm.generate(prompt, SamplingParams(max_tokens=max_tokens, **GREEDY), use_tqdm=False)[0].outputs[0]


def test_max_tokens_ends_with_length(make_llm):
    out = _greedy_text(make_llm("qwen3"), "Hello", max_tokens=5)
    assert out.finish_reason == "length" and len(out.token_ids) == 5


def test_stop_string_cut_from_output(make_llm):
    llm = make_llm("qwen3")
    full = _greedy_text(llm, "Once upon a time").text
    stop = full[6:9]
    assert stop and full.find(stop) == 6
    out = llm.generate("Once upon a time", SamplingParams(max_tokens=24, stop=[stop], **GREEDY),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[:6]
    kept = llm.generate("Once upon a time", SamplingParams(max_tokens=24, stop=stop,
                                                           include_stop_str_in_output=True, **GREEDY),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == full[:9]


def test_stop_token_id_ends_with_stop(make_llm):
    llm = make_llm("llama3")
    full = _greedy_text(llm, "The capital of France is")
    stop_id = full.token_ids[3]
    first = full.token_ids.index(stop_id)
    out = llm.generate("The capital of France is",
                       SamplingParams(max_tokens=24, stop_token_ids=[stop_id], **GREEDY), use_tqdm=False)[0]
    completion = out.outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop_id
    assert completion.token_ids == full.token_ids[:first + 1]


def test_min_tokens_suppresses_early_stop(make_llm):
    llm = make_llm("llama3")
    full = _greedy_text(llm, "The capital of France is")
    stop_id = full.token_ids[0]
    out = llm.generate("The capital of France is", SamplingParams(
        max_tokens=10, stop_token_ids=[stop_id], min_tokens=4, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 4
    assert stop_id not in out.token_ids[:4]


def test_eos_ends_with_stop_unless_ignored(make_llm):
    llm = make_llm("qwen3")
    eos = llm.llm_engine.eos_token_ids()[0]
    params = SamplingParams(temperature=0.0, max_tokens=8, logit_bias={eos: 100.0})
    out = llm.generate("Hi", params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop" and out.text == ""
    ignored = llm.generate("Hi", SamplingParams(temperature=0.0, max_tokens=8, logit_bias={eos: 100.0},
                                                ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(ignored.token_ids) == 8 and ignored.finish_reason == "length"


@pytest.mark.parametrize("field,value,needle", [
    ("temperature", -0.5, "temperature"),
    ("top_p", 0.0, "top_p"),
    ("top_p", 1.5, "top_p"),
    ("top_k", -3, "top_k"),
    ("min_p", 2.0, "min_p"),
    ("n", 0, "n must"),
    ("max_tokens", 0, "max_tokens"),
    ("presence_penalty", 3.0, "presence_penalty"),
    ("frequency_penalty", -2.5, "frequency_penalty"),
    ("repetition_penalty", 0.0, "repetition_penalty"),
    ("logprobs", -1, "logprobs"),
    ("stop", [""], "stop"),
    ("logit_bias", {"12": 1.0}, "logit_bias"),
    ("logit_bias", {12: "high"}, "logit_bias"),
    ("logit_bias", {12: 500.0}, "logit_bias"),
])
def test_bad_sampling_params_name_the_field(field, value, needle):
    with pytest.raises(SamplingParamsError, match=needle) as info:
        SamplingParams(**{field: value})
    assert isinstance(info.value, ValueError)
    assert info.value.param == field


def test_best_of_below_n_is_refused():
    with pytest.raises(SamplingParamsError, match="best_of"):
        SamplingParams(n=3, best_of=2)


def test_prompt_longer_than_max_model_len_is_rejected_not_truncated(make_llm):
    llm = make_llm("qwen3", max_model_len=64)
    long_prompt = {"prompt_token_ids": list(range(5, 70))}
    with pytest.raises(PromptTooLongError, match="max_model_len is 64"):
        llm.generate(long_prompt, SamplingParams(max_tokens=4), use_tqdm=False)
    ok = llm.generate({"prompt_token_ids": list(range(5, 60))}, SamplingParams(max_tokens=20, **GREEDY),
                      use_tqdm=False)[0].outputs[0]
    assert len(ok.token_ids) == 64 - 55 and ok.finish_reason == "length"


def test_bad_request_in_a_batch_adds_nothing(make_llm):
    llm = make_llm("qwen3", max_model_len=64)
    with pytest.raises(PromptTooLongError):
        llm.generate(["fine", {"prompt_token_ids": [1] * 100}], SamplingParams(max_tokens=4), use_tqdm=False)
    assert not llm.llm_engine.requests


def test_logprobs_over_the_limit_are_refused(make_llm):
    llm = make_llm("qwen3", max_logprobs=5)
    with pytest.raises(ValueError, match="max_logprobs"):
        llm.generate("Hi", SamplingParams(logprobs=6), use_tqdm=False)


def test_unknown_architecture_names_the_supported_ones(tmp_path):
    import json
    from asyncserve import LLM
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"],
                                                      "model_type": "falcon"}))
    with pytest.raises(UnsupportedModelError, match="Qwen3ForCausalLM"):
        LLM(str(tmp_path), device="cpu")


def test_unbuilt_features_fail_loudly():
    from asyncserve import EngineConfig
    with pytest.raises(ConfigError, match="tensor_parallel_size must be >= 1"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(ConfigError, match="quantization"):
        EngineConfig(quantization="squeezellm")


def test_missing_model_is_a_clear_error(tmp_path):
    from asyncserve import LLM
    missing = str(tmp_path / "nope" / "model")
    with pytest.raises(ConfigError) as caught:
        LLM(missing, device="cpu")
    assert str(caught.value) == f"Model path {missing!r} does not exist."
