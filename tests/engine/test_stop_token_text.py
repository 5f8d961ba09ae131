"""The token that ends an output (EOS, a stop token id) is not part of its text, as in vLLM: even with
skip_special_tokens=False, where its text would otherwise show (`<|im_end|>` after every answer)."""
from __future__ import annotations

from asyncserve import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


def test_a_stop_token_id_is_left_out_of_the_text_unless_asked_for(make_llm):
    llm = make_llm("llama3")
    tokenizer = llm.llm_engine.tokenizer
    full = llm.generate("The capital of France is", SamplingParams(max_tokens=24, **GREEDY), use_tqdm=False)[0]
    stop_id = full.outputs[0].token_ids[3]
    first = full.outputs[0].token_ids.index(stop_id)
    for include in (False, True):
        out = llm.generate("The capital of France is", SamplingParams(
            max_tokens=24, stop_token_ids=[stop_id], include_stop_str_in_output=include, **GREEDY),
            use_tqdm=False)[0].outputs[0]
        assert out.token_ids == full.outputs[0].token_ids[:first + 1]
        assert out.text == tokenizer.decode(out.token_ids[:first + include])


def test_eos_text_never_shows_even_without_skipping_special_tokens(make_llm):
    llm = make_llm("qwen3")
    for eos in llm.llm_engine.eos_token_ids():
        out = llm.generate("Hello", SamplingParams(max_tokens=4, allowed_token_ids=[eos], temperature=0.0,
                                                   skip_special_tokens=False), use_tqdm=False)[0].outputs[0]
        assert out.token_ids == [eos] and out.finish_reason == "stop"
        assert out.text == ""
