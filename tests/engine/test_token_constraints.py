"""vLLM's allowed_token_ids, bad_words and truncate_prompt_tokens, through the whole engine."""
from __future__ import annotations

import gc
import random
import sys

import pytest
import torch

from asyncserve import InvalidParameterError, SamplingParams, SamplingParamsError
from asyncserve.sample.bad_words import bad_words_token_ids, banned_next_tokens
from asyncserve.sampling_params import MAX_BAD_WORDS

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


# ---- built once per request, applied per step with batched ops (issue 20) ---------------------------------


def _outside(tokenizer, allowed: set[int], count: int) -> list[str]:
    """Made-up words none of whose tokens (plain or space-prefixed) is in `allowed`: never generated."""
    rng = random.Random(1)
    words: list[str] = []
    while len(words) < count:
        word = "".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(rng.randint(3, 7)))
        ids = tokenizer.encode(word, add_special_tokens=False) + tokenizer.encode(" " + word, add_special_tokens=False)
        if word not in words and not set(ids) & allowed:
            words.append(word)
    return words


def _traced_steps(engine, requests: list[tuple[str, SamplingParams]]) -> tuple[list[tuple[int, int]], list]:
    """Runs the requests to the end; per engine step: (Python lines run in asyncserve's code, elements turned
    into tensors by torch.tensor). Also returns each request's outputs' token ids."""
    per_step: list[tuple[int, int]] = []
    counts = [0, 0]
    real_tensor = torch.tensor

    def counting_tensor(*args, **kwargs):
        result = real_tensor(*args, **kwargs)
        counts[1] += result.numel()
        return result

    def local(frame, event, arg):
        if event == "line":
            counts[0] += 1
        return local

    def tracer(frame, event, arg):
        return local if "/asyncserve/" in frame.f_code.co_filename else None

    for request_id, params in requests:
        engine.add_request(request_id, engine.input_processor.process({"prompt_token_ids": PROMPT_IDS}, params))
    finished = {}
    gc.disable()
    torch.tensor = counting_tensor
    try:
        while engine.has_unfinished_requests():
            counts[:] = [0, 0]
            sys.settrace(tracer)
            try:
                outputs = engine.step()
            finally:
                sys.settrace(None)
            per_step.append(tuple(counts))
            finished.update((o.request_id, [c.token_ids for c in o.outputs]) for o in outputs if o.finished)
    finally:
        torch.tensor = real_tensor
        gc.enable()
    return per_step, [finished[request_id] for request_id, _ in requests]


PROMPT_IDS = [42, 295, 336, 14, 284, 91, 541, 301, 310]


def test_a_steps_host_work_does_not_grow_with_the_requests_lists(make_llm):
    llm = make_llm("qwen3")
    engine, tokenizer = llm.llm_engine, llm.get_tokenizer()
    vocab = engine.model_config.vocab_size
    free = _greedy(llm, {"prompt_token_ids": PROMPT_IDS}, max_tokens=6)
    allowed = sorted(set(free) | {7, 100, 300})
    first = _greedy(llm, {"prompt_token_ids": PROMPT_IDS}, max_tokens=2, allowed_token_ids=allowed,
                    logit_bias={allowed[0]: 1.5})
    word = tokenizer.decode(first)  # its prefix is generated, its last token then banned
    assert bad_words_token_ids([word], tokenizer, vocab)[0] == first
    never = [t for t in range(vocab) if t not in allowed]

    def lists(size: str) -> dict:
        if size == "small":
            return dict(logit_bias={allowed[0]: 1.5}, allowed_token_ids=allowed, bad_words=[word],
                        stop_token_ids=[never[0]])
        return dict(logit_bias={allowed[0]: 1.5, **{t: 0.0 for t in range(vocab) if t != allowed[0]}},
                    allowed_token_ids=allowed * (vocab // len(allowed)),  # repeats change nothing
                    bad_words=[word] + _outside(tokenizer, set(allowed), 300), stop_token_ids=never[:600])

    def requests(size: str, tag: str) -> list[tuple[str, SamplingParams]]:
        common = dict(max_tokens=10, min_tokens=4, ignore_eos=True, **lists(size))
        return [(f"{tag}-greedy", SamplingParams(temperature=0.0, **common)),
                (f"{tag}-sampled", SamplingParams(temperature=1.0, seed=0, n=3, **common))]

    _traced_steps(engine, requests("small", "warm-up"))  # first-call paths (lazy imports, caches) run here
    small_steps, small_outputs = _traced_steps(engine, requests("small", "small"))
    big_steps, big_outputs = _traced_steps(engine, requests("big", "big"))
    assert big_outputs == small_outputs  # the big lists mean the same as the small ones
    assert not _contains(small_outputs[0][0], first)
    assert big_steps == small_steps  # line for line, element for element


def test_bad_words_are_tokenized_once_when_validate_ran_first(make_llm, monkeypatch):
    llm = make_llm("qwen3")
    engine, tokenizer = llm.llm_engine, llm.get_tokenizer()
    words = _outside(tokenizer, set(), 50)
    params = SamplingParams(temperature=0.0, max_tokens=4, bad_words=words)
    engine.input_processor.validate(PROMPT_IDS, params)  # as the server does, off the event loop for a big request
    encoded = []
    real_encode = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda text, *args, **kwargs: encoded.append(text)
                        or real_encode(text, *args, **kwargs))
    engine.add_request("once", engine.input_processor.process({"prompt_token_ids": PROMPT_IDS}, params))  # on the loop, in a server
    while engine.has_unfinished_requests():
        engine.step()
    assert encoded == []


def test_full_vocabulary_logit_bias_with_allowed_ids_is_the_argmax_of_biased_transformers_logits(
        make_llm, hf_reference):
    llm = make_llm("qwen3")
    model, tokenizer = hf_reference("qwen3")
    vocab = llm.llm_engine.model_config.vocab_size
    generator = torch.Generator().manual_seed(0)
    bias = ((torch.rand(vocab, generator=generator) - 0.5) * 6).tolist()
    allowed = sorted(torch.randperm(vocab, generator=generator)[:200].tolist())
    ours = _greedy(llm, PROMPT, logit_bias=dict(enumerate(bias)), allowed_token_ids=allowed)
    ids = tokenizer.encode(PROMPT)
    num_prompt = len(ids)
    with torch.no_grad():
        for _ in range(8):
            logits = model(torch.tensor([ids])).logits[0, -1].float() + torch.tensor(bias)
            ids.append(allowed[int(logits[allowed].argmax())])
    assert ours == ids[num_prompt:]


def test_bad_words_hold_in_every_sample_of_n(make_llm):
    llm = make_llm("qwen3")
    tokenizer = llm.get_tokenizer()
    allowed = [7, 100, 300, 500]
    params = dict(temperature=1.0, seed=4, n=4, max_tokens=24, ignore_eos=True, allowed_token_ids=allowed)
    free = [c.token_ids for c in llm.generate(PROMPT, SamplingParams(**params), use_tqdm=False)[0].outputs]
    pairs = [tokenizer.decode([a, b]) for a in allowed for b in allowed]
    words = [w for w in pairs if len(bad_words_token_ids([w], tokenizer, len(tokenizer))[0]) == 2][:6]
    words.append(tokenizer.decode([allowed[0]]))  # a single-token word too
    sequences = bad_words_token_ids(words, tokenizer, len(tokenizer))
    assert any(_contains(out, s) for out in free for s in sequences)  # the constraint has work to do
    banned = [c.token_ids for c in llm.generate(PROMPT, SamplingParams(bad_words=words, **params),
                                                use_tqdm=False)[0].outputs]
    assert len(banned) == 4
    for out in banned:
        assert len(out) == 24 and not any(_contains(out, s) for s in sequences)


def test_stop_token_ids_end_each_of_n_samples_only_after_min_tokens(make_llm):
    llm = make_llm("qwen3")
    allowed = [7, 100, 300, 500]
    stop = 300
    outputs = llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=1, n=6, max_tokens=30, min_tokens=3,
                                                  ignore_eos=True, allowed_token_ids=allowed,
                                                  stop_token_ids=[stop]), use_tqdm=False)[0].outputs
    stopped = [c for c in outputs if c.finish_reason == "stop"]
    assert len(stopped) >= 2
    for completion in outputs:
        tokens = completion.token_ids
        assert stop not in tokens[:3]
        if completion.finish_reason == "stop":
            assert tokens[-1] == stop and stop not in tokens[:-1] and completion.stop_reason == stop
        else:
            assert len(tokens) == 30 and stop not in tokens


def test_more_bad_words_than_the_bound_are_refused():
    with pytest.raises(SamplingParamsError, match=f"at most {MAX_BAD_WORDS} words") as caught:
        SamplingParams(bad_words=["word"] * (MAX_BAD_WORDS + 1))
    assert caught.value.param == "bad_words"


@pytest.mark.parametrize("params,field", [
    (dict(allowed_token_ids=[1] * 769), "allowed_token_ids"),
    (dict(stop_token_ids=[1] * 769), "stop_token_ids"),
    (dict(logit_bias={10 ** 6: 1.0}), "logit_bias"),
])
def test_token_lists_beyond_the_vocabulary_are_refused_naming_the_field(make_llm, params, field):
    llm = make_llm("qwen3")
    with pytest.raises(InvalidParameterError) as caught:
        llm.generate(PROMPT, SamplingParams(**params), use_tqdm=False)
    assert caught.value.param == field
