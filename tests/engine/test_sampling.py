"""Sampling through the whole engine, and the sampler's laws on crafted logits."""
from __future__ import annotations

import math

import pytest
import torch

from asyncserve import SamplingParams
from asyncserve.sample.sampler import Sampler, SamplingTensors
from tests.conftest import PROMPTS


def test_top_k_1_equals_greedy(make_llm):
    llm = make_llm("qwen3")
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    top1 = llm.generate(PROMPTS, SamplingParams(temperature=1.3, top_k=1, max_tokens=16), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in top1] == [o.outputs[0].token_ids for o in greedy]


def test_same_seed_same_output_whatever_the_batch(make_llm):
    llm = make_llm("llama3")
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate("Once upon a time", seeded, use_tqdm=False)[0].outputs[0].token_ids
    noise = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    batch = llm.generate(PROMPTS + ["Once upon a time"], [noise] * len(PROMPTS) + [seeded], use_tqdm=False)
    assert batch[-1].outputs[0].token_ids == alone
    other_seed = llm.generate("Once upon a time", SamplingParams(temperature=1.0, seed=99, max_tokens=20,
                                                                 ignore_eos=True), use_tqdm=False)
    assert other_seed[0].outputs[0].token_ids != alone


def _tensors(num_rows, **kwargs):
    defaults = dict(temperature=torch.ones(num_rows), top_p=None, top_k=None, min_p=None,
                    generators=[None] * num_rows, all_greedy=False)
    defaults.update(kwargs)
    return SamplingTensors(**defaults)


def test_top_k_and_top_p_never_pick_outside_their_set():
    torch.manual_seed(0)
    vocab, rows = 50, 400
    logits = torch.randn(1, vocab).repeat(rows, 1) * 2
    sampler = Sampler()
    top_k = sampler(logits, _tensors(rows, top_k=torch.full((rows,), 5))).token_ids
    allowed_k = set(logits[0].topk(5).indices.tolist())
    assert set(top_k.tolist()) <= allowed_k
    assert len(set(top_k.tolist())) > 1
    probs = logits[0].softmax(-1)
    order = probs.argsort(descending=True)
    cumulative = probs[order].cumsum(0)
    nucleus = set(order[: int((cumulative < 0.6).sum()) + 1].tolist())
    top_p = sampler(logits, _tensors(rows, top_p=torch.full((rows,), 0.6))).token_ids
    assert set(top_p.tolist()) <= nucleus
    min_p = sampler(logits, _tensors(rows, min_p=torch.full((rows,), 0.3))).token_ids
    assert all(probs[t] >= 0.3 * probs.max() for t in min_p.tolist())


def test_temperature_sampling_follows_softmax_chi_square():
    torch.manual_seed(1)
    vocab, rows, temperature = 8, 20000, 0.7
    logits = torch.randn(vocab)
    sampler = Sampler()
    out = sampler(logits.repeat(rows, 1), _tensors(rows, temperature=torch.full((rows,), temperature)))
    counts = torch.bincount(out.token_ids, minlength=vocab).double()
    expected = (logits / temperature).softmax(-1).double() * rows
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    # 7 degrees of freedom: P(chi2 > 24.3) = 0.001.
    assert chi_square < 24.3, (counts, expected)


def test_penalties_change_what_is_picked():
    vocab = 6
    logits = torch.tensor([[0.0, 3.0, 2.9, 0.0, 0.0, 0.0]])
    outputs = torch.tensor([[1, 1, vocab]])
    prompt = torch.tensor([[vocab]])
    base = dict(temperature=torch.zeros(1), all_greedy=True, output_tokens=outputs, prompt_tokens=prompt)
    sampler = Sampler()
    frequency = _tensors(1, **base, presence_penalty=torch.zeros(1), frequency_penalty=torch.tensor([0.1]),
                         repetition_penalty=torch.ones(1))
    assert sampler(logits, frequency).token_ids.item() == 2  # 3.0 - 2 * 0.1 < 2.9
    repetition = _tensors(1, **base, presence_penalty=torch.zeros(1), frequency_penalty=torch.zeros(1),
                          repetition_penalty=torch.tensor([1.1]))
    assert sampler(logits, repetition).token_ids.item() == 2  # 3.0 / 1.1 < 2.9
    none = _tensors(1, **base, presence_penalty=torch.zeros(1), frequency_penalty=torch.zeros(1),
                    repetition_penalty=torch.ones(1))
    assert sampler(logits, none).token_ids.item() == 1


def test_logprobs_of_chosen_and_top_tokens(make_llm):
    llm = make_llm("qwen3")
    out = llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=4, logprobs=3),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    total = 0.0
    for token_id, position in zip(out.token_ids, out.logprobs):
        assert position[token_id].rank == 1  # greedy picks the most likely token
        assert len(position) == 3
        values = sorted((lp.logprob for lp in position.values()), reverse=True)
        assert all(v <= 0.0 for v in values)
        total += position[token_id].logprob
    assert math.isclose(out.cumulative_logprob, total, rel_tol=1e-6)


def test_prompt_logprobs_match_transformers(make_llm, hf_reference):
    llm = make_llm("qwen2", max_num_batched_tokens=16)  # the prompt is scored in several chunks
    prompt = PROMPTS[4]
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2),
                       use_tqdm=False)[0]
    model, tokenizer = hf_reference("qwen2")
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(ids)
    for position in range(1, len(ids)):
        entry = out.prompt_logprobs[position][ids[position]]
        assert entry.logprob == pytest.approx(reference[position - 1, ids[position]].item(), abs=1e-4)


def test_n_returns_n_different_completions(make_llm):
    llm = make_llm("qwen3")
    out = llm.generate("Hello, my name is", SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12,
                                                            ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_best_of_keeps_the_most_likely(make_llm):
    llm = make_llm("qwen3")
    out = llm.generate("Hello", SamplingParams(n=1, best_of=4, temperature=1.0, seed=3, max_tokens=6,
                                                ignore_eos=True, logprobs=0), use_tqdm=False)[0]
    assert len(out.outputs) == 1
    all_four = llm.generate("Hello", SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=6,
                                                     ignore_eos=True, logprobs=0), use_tqdm=False)[0]
    best = max(all_four.outputs, key=lambda c: c.cumulative_logprob)
    assert out.outputs[0].token_ids == best.token_ids


def test_prompt_logprobs_score_every_position_when_the_prefix_is_cached(make_llm):
    """A prompt whose blocks are in the prefix cache is still scored whole (vLLM skips the cache for it)."""
    llm = make_llm("qwen2", enable_prefix_caching=True)
    prompt = PROMPTS[4]
    llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)  # fills the cache
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1),
                       use_tqdm=False)[0]
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    assert out.prompt_logprobs[0] is None and all(entry for entry in out.prompt_logprobs[1:])
    again = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)[0]
    assert again.num_cached_tokens > 0  # the cache still serves requests without prompt logprobs
