"""OPT (pre-LN; post-LN with project_in/out), GPT-2 and Phi-3 (plain with partial rotary; LongRoPE) are
token-exact with transformers in float32, with requests of very different lengths joining mid-flight."""
from __future__ import annotations

import copy

import pytest
import torch

from asyncserve import LLM, SamplingParams
from tests.conftest import PROMPTS, assert_pool_clean, generate_joining_mid_flight
from tests.models.tiny_families import LONGROPE_ORIGINAL, VARIANTS

MAX_NEW = 16
# Around LongRoPE's threshold (48 tokens): prompts that stay below it, one that grows past it, one exactly
# at it (its first generated token is the first long one), and two longer than it (prefilled in chunks).
LONGROPE_PROMPTS = [
    "A",
    "Hello, my name is",
    "Once upon a time, in a land far away, there lived a",
    "Once upon a time, in a land far away, there lived a king who loved riddles, and every morning he "
    "asked his court a new one",
    PROMPTS[2],
    " ".join(["The quick brown fox jumps over the lazy dog."] * 4),
]
LONGROPE_NEW = 32


def _hf_greedy(path: str, prompts_ids: list[list[int]], max_new: int) -> list[list[int]]:
    """transformers' greedy generate, one prompt at a time, never stopping early."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None
    outputs = []
    with torch.no_grad():
        for ids in prompts_ids:
            out = model.generate(torch.tensor([ids]), generation_config=config, max_new_tokens=max_new,
                                 min_new_tokens=max_new, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            outputs.append(out[0, len(ids):].tolist())
    return outputs


def _generate_joining_mid_flight(llm: LLM, prompts_ids: list[list[int]], max_new: int) -> list[list[int]]:
    """Two requests start; another joins every third step, prefilling in chunks while others decode."""
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    results = generate_joining_mid_flight(llm.llm_engine, [{"prompt_token_ids": ids} for ids in prompts_ids], params)
    assert_pool_clean(llm.llm_engine)
    return results


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "phi3-longrope"])
def test_greedy_matches_transformers_with_requests_joining(variant, variant_dir):
    path = variant_dir(variant)
    llm = LLM(path, device="cpu", num_gpu_blocks_override=256, max_num_batched_tokens=32, max_num_seqs=4)
    tokenizer = llm.get_tokenizer()
    prompts_ids = [tokenizer.encode(p) for p in PROMPTS]
    assert max(map(len, prompts_ids)) > 200 and min(map(len, prompts_ids)) == 1
    ours = _generate_joining_mid_flight(llm, prompts_ids, MAX_NEW)
    assert ours == _hf_greedy(path, prompts_ids, MAX_NEW)


@pytest.mark.parametrize("fused", [False, True], ids=["rotary-then-write", "fused-rotary-write"])
def test_longrope_switches_factor_sets_as_transformers_does(variant_dir, fused, monkeypatch):
    """Short prompts stay short, one grows past the threshold (its KV recomputed with the long set, as
    transformers' generate does), long prompts are long from their first chunk; prefix caching on, with a
    short prompt that is a prefix of a long one: their blocks must not be shared."""
    from asyncserve.layers import attention
    monkeypatch.setattr(attention, "FUSE_ROTARY_WITH_CACHE", fused)  # the table rows LongRoPE hands the fusion
    path = variant_dir("phi3-longrope")
    llm = LLM(path, device="cpu", num_gpu_blocks_override=256, max_num_batched_tokens=32, max_num_seqs=4,
              block_size=8)
    tokenizer = llm.get_tokenizer()
    prompts_ids = [tokenizer.encode(p) for p in LONGROPE_PROMPTS]
    prompts_ids.insert(4, prompts_ids[4][:40])   # before its long version: its short blocks are cached first
    lengths = [len(ids) for ids in prompts_ids]
    assert lengths[3] == LONGROPE_ORIGINAL                                  # exactly at the threshold
    assert lengths[2] < LONGROPE_ORIGINAL < lengths[2] + LONGROPE_NEW       # grows past it
    assert lengths[5] > LONGROPE_ORIGINAL and lengths[6] > LONGROPE_ORIGINAL  # long prompts, chunked
    ours = _generate_joining_mid_flight(llm, prompts_ids, LONGROPE_NEW)
    assert ours == _hf_greedy(path, prompts_ids, LONGROPE_NEW)
