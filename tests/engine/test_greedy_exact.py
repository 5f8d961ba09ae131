"""Greedy output is token-exact with transformers for every supported family."""
from __future__ import annotations

import pytest

from asyncserve import SamplingParams
from asyncserve.testing.tiny_model import FAMILIES
from tests.conftest import PROMPTS, generate_joining_mid_flight, hf_greedy

MAX_NEW = 24


def _expected(hf_reference, family, prompts, max_new=MAX_NEW):
    model, tokenizer = hf_reference(family)
    return [hf_greedy(model, tokenizer.encode(p), max_new) for p in prompts]


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_mixed_lengths_matches_transformers(family, make_llm, hf_reference):
    llm = make_llm(family)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_NEW), use_tqdm=False)
    expected = _expected(hf_reference, family, PROMPTS)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    for output in outputs:
        assert output.finished
        assert output.outputs[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("family", FAMILIES)
def test_requests_joining_mid_flight_match_transformers(family, make_llm, hf_reference):
    """Continuous batching: new prompts prefill (in chunks) while earlier ones decode."""
    llm = make_llm(family, max_num_batched_tokens=32, max_num_seqs=4)
    results = generate_joining_mid_flight(llm.llm_engine, PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_NEW))
    assert results == _expected(hf_reference, family, PROMPTS)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_is_the_decoded_tokens(family, make_llm):
    llm = make_llm(family)
    tokenizer = llm.get_tokenizer()
    # Random weights emit random byte-fallback tokens; sentencepiece's ByteFallback decoder turns a whole
    # run of them into U+FFFD when any byte is invalid, which no incremental decoder can reproduce.
    # Real text has valid runs: ban the byte tokens so the output is text, as a trained model's is.
    byte_tokens = {tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)}
    byte_tokens.discard(tokenizer.unk_token_id)
    byte_tokens.discard(None)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW,
                            logit_bias={t: -100.0 for t in byte_tokens} or None)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        completion = output.outputs[0]
        if tokenizer.backend_tokenizer.decoder.__class__.__name__ == "ByteLevel":
            assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        else:
            # Sentencepiece-style decoders drop the first word's space at the start of a text; the
            # output is decoded in the prompt's context, as vLLM does, so it keeps that space.
            prompt_ids = output.prompt_token_ids
            whole = tokenizer.decode(prompt_ids + completion.token_ids, skip_special_tokens=True)
            assert completion.text == whole[len(tokenizer.decode(prompt_ids, skip_special_tokens=True)):]


def test_prompt_forms_and_order(make_llm):
    llm = make_llm("qwen3")
    tokenizer = llm.get_tokenizer()
    ids = tokenizer.encode("The capital of France is")
    params = SamplingParams(temperature=0.0, max_tokens=8)
    by_text = llm.generate("The capital of France is", params, use_tqdm=False)
    by_ids = llm.generate([{"prompt_token_ids": ids}, "A"], params, use_tqdm=False)
    assert len(by_text) == 1
    assert by_text[0].prompt == "The capital of France is"
    assert by_text[0].prompt_token_ids == ids == by_ids[0].prompt_token_ids
    assert by_text[0].outputs[0].token_ids == by_ids[0].outputs[0].token_ids
    assert by_ids[1].prompt == "A"


def test_chat_applies_the_template(make_llm, hf_reference):
    llm = make_llm("qwen3")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)[0]
    tokenizer = llm.get_tokenizer()
    expected_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
    assert out.prompt_token_ids == expected_ids
    model, _ = hf_reference("qwen3")
    assert out.outputs[0].token_ids == hf_greedy(model, expected_ids, 8)
