"""vLLM's allowed_token_ids, bad_words and truncate_prompt_tokens, through the whole engine."""
from __future__ import annotations

import pytest
import torch

from asyncserve import InvalidParameterError, SamplingParams, SamplingParamsError
from asyncserve.bad_words import bad_words_token_ids, banned_next_tokens

PROMPT = "Hello, my name is"


def _greedy(llm, prompt, max_tokens=8, **params) -> list[int]:
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **params)
    return llm.generate(prompt, sampling, use_tqdm=False)[0].outputs[0].token_ids


def _contains(tokens: list[int], sequence: list[int]) -> bool:
    return any(tokens[i:i + len(sequence)] == sequence for i in range(len(tokens) - len(sequence) + 1))


def test_allowed_token_ids_greedy_is_the_argmax_over_those_ids_of_transformers_logits(make_llm, hf_reference):
    llm = make_llm("qwen3")
    model, tokenizer = hf_reference("qwen3")
    prompt_ids = tokenizer.encode(PROMPT)
    unrestricted = _greedy(llm, PROMPT)
    allowed = sorted({7, 100, 300, 500} - set(unrestricted[:1]))
    ours = _greedy(llm, PROMPT, allowed_token_ids=allowed)
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(8):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(allowed[int(logits[allowed].argmax())])
    assert ours == ids[len(prompt_ids):]
    assert ours[0] != unrestricted[0]


def test_allowed_token_ids_bound_random_sampling_in_a_batch_with_other_requests(make_llm):
    llm = make_llm("qwen3")
    allowed = [5, 50, 500]
    outputs = llm.generate([PROMPT, PROMPT], [
        SamplingParams(temperature=1.5, seed=3, max_tokens=40, ignore_eos=True, allowed_token_ids=allowed),
        SamplingParams(temperature=1.5, seed=3, max_tokens=40, ignore_eos=True)], use_tqdm=False)
    constrained, free = (o.outputs[0].token_ids for o in outputs)
    assert set(constrained) <= set(allowed) and len(set(constrained)) > 1
    assert not set(free) <= set(allowed)


def test_a_single_token_bad_word_is_never_generated(make_llm):
    llm = make_llm("qwen3")
    tokenizer = llm.get_tokenizer()
    unrestricted = _greedy(llm, PROMPT, max_tokens=16)
    word = tokenizer.decode(unrestricted[:1])
    sequences = bad_words_token_ids([word], tokenizer, len(tokenizer))
    assert unrestricted[:1] in sequences  # the word is that very token
    banned = [s[0] for s in sequences if len(s) == 1]
    output = _greedy(llm, PROMPT, max_tokens=16, bad_words=[word])
    assert not set(output) & set(banned)
    assert output[0] != unrestricted[0]


def test_a_multi_token_bad_word_bans_only_its_last_token_after_the_rest(make_llm):
    llm = make_llm("qwen3")
    tokenizer = llm.get_tokenizer()
    unrestricted = _greedy(llm, PROMPT)
    word = tokenizer.decode(unrestricted[:2])
    assert bad_words_token_ids([word], tokenizer, len(tokenizer))[0] == unrestricted[:2]
    output = _greedy(llm, PROMPT, bad_words=[word])
    assert output[0] == unrestricted[0]  # the first token alone is allowed
    assert output[1] != unrestricted[1]  # completing the word is not
    assert not _contains(output, unrestricted[:2])


def test_bad_words_are_encoded_plain_and_with_a_leading_space_as_vllm_does(make_llm):
    tokenizer = make_llm("qwen3").get_tokenizer()
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    vocab = len(tokenizer)
    for word in ("the", " the", "world", "time"):
        plain, spaced = encode(word.lstrip()), encode(" " + word.lstrip())
        expected = [plain] + ([spaced] if spaced[0] != plain[0] and len(spaced) == len(plain) else [])
        assert bad_words_token_ids([word], tokenizer, vocab) == expected
    assert len(bad_words_token_ids(["the"], tokenizer, vocab)) == 2  # "the" and " the" are both one token
    with pytest.raises(InvalidParameterError, match="outside the model's vocabulary"):
        bad_words_token_ids(["the"], tokenizer, 10)


def test_banned_next_tokens_match_the_generated_tokens_only():
    sequences = [[9], [1, 2], [1, 2, 3]]
    assert banned_next_tokens(sequences, [1, 2], num_prompt_tokens=2) == [9]  # [1, 2] is the prompt
    assert banned_next_tokens(sequences, [5, 1], num_prompt_tokens=1) == [9, 2]
    assert banned_next_tokens(sequences, [5, 1, 2], num_prompt_tokens=1) == [9, 3]
    assert banned_next_tokens(sequences, [5, 4, 2], num_prompt_tokens=1) == [9]


def test_truncate_prompt_tokens_keeps_the_last_tokens(make_llm):
    llm = make_llm("qwen3")
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 4
    tail = llm.get_tokenizer().encode(long_prompt)[-5:]
    output = llm.generate(long_prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                                      truncate_prompt_tokens=5), use_tqdm=False)[0]
    assert output.prompt_token_ids == tail
    assert output.outputs[0].token_ids == _greedy(llm, {"prompt_token_ids": tail}, max_tokens=6)
    short = llm.generate("A", SamplingParams(max_tokens=1, truncate_prompt_tokens=5), use_tqdm=False)[0]
    assert short.prompt_token_ids == llm.get_tokenizer().encode("A")


@pytest.mark.parametrize("params,field", [
    (dict(allowed_token_ids=[]), "allowed_token_ids"),
    (dict(allowed_token_ids=[-1]), "allowed_token_ids"),
    (dict(bad_words=[""]), "bad_words"),
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
    (dict(truncate_prompt_tokens=-2), "truncate_prompt_tokens"),
])
def test_invalid_constraints_are_refused_naming_the_field(params, field):
    with pytest.raises(SamplingParamsError) as caught:
        SamplingParams(**params)
    assert caught.value.param == field


@pytest.mark.parametrize("params,field", [
    (dict(allowed_token_ids=[1, 10 ** 6]), "allowed_token_ids"),
    (dict(truncate_prompt_tokens=10 ** 6), "truncate_prompt_tokens"),
])
def test_constraints_beyond_the_model_are_refused_before_queueing(make_llm, params, field):
    llm = make_llm("qwen3")
    with pytest.raises(InvalidParameterError) as caught:
        llm.generate(PROMPT, SamplingParams(**params), use_tqdm=False)
    assert caught.value.param == field
