"""Beam search: the best beam equals transformers' `num_beams` generate; beams share cached blocks."""
from __future__ import annotations

import pytest
import torch

from asyncserve import BeamSearchParams

PROMPTS = ["Hello, my name is", "The capital of France is", "Once upon a time"]


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_best_beam_matches_transformers(family, make_llm, hf_reference):
    llm = make_llm(family)
    model, tokenizer = hf_reference(family)
    width, max_tokens = 3, 8
    outputs = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=width, max_tokens=max_tokens,
                                                        ignore_eos=True))
    for prompt, output in zip(PROMPTS, outputs):
        ids = tokenizer.encode(prompt)
        with torch.no_grad():
            # No EOS in play on either side, so transformers' beams all run to max_new_tokens too.
            reference = model.generate(torch.tensor([ids]), num_beams=width, max_new_tokens=max_tokens,
                                       min_new_tokens=max_tokens, do_sample=False, early_stopping=False,
                                       num_return_sequences=width, output_scores=True,
                                       return_dict_in_generate=True)
        best = output.sequences[0]
        assert best.tokens[len(ids):] == reference.sequences[0, len(ids):].tolist()
        assert len(output.sequences) == width
        scores = [beam.cum_logprob for beam in output.sequences]
        assert scores == sorted(scores, reverse=True)


def test_beams_reuse_cached_prefix_blocks(make_llm):
    llm = make_llm("qwen3")
    prompt = "The quick brown fox jumps over the lazy dog. " * 6
    llm.beam_search(prompt, BeamSearchParams(beam_width=4, max_tokens=6, ignore_eos=True))
    assert llm.llm_engine.block_pool.num_cache_hits > 0
