"""vLLM's cache_salt offline (the prompt dict's key): prefix-cache blocks are shared only among requests
with the same salt (per-tenant isolation); tests/server/test_cache_salt_field.py has the request field."""
from __future__ import annotations

import pytest

from asyncserve import SamplingParams
from tests.conftest import PROMPTS

PROMPT = PROMPTS[1] * 3  # several full blocks
PARAMS = SamplingParams(temperature=0.0, max_tokens=2)


def _cached(llm, salt=None):
    prompt = {"prompt": PROMPT} if salt is None else {"prompt": PROMPT, "cache_salt": salt}
    return llm.generate(prompt, PARAMS, use_tqdm=False)[0].num_cached_tokens


def test_salted_requests_share_blocks_only_with_their_own_salt(make_llm):
    llm = make_llm("qwen3", block_size=16)
    assert _cached(llm, "tenant-a") == 0
    assert _cached(llm, "tenant-b") == 0 and _cached(llm) == 0  # another salt, and none, miss
    assert _cached(llm, "tenant-a") > 0 and _cached(llm, "tenant-b") > 0 and _cached(llm) > 0


def test_a_bad_salt_is_refused(make_llm):
    from asyncserve.errors import InvalidParameterError
    llm = make_llm("qwen3")
    with pytest.raises(InvalidParameterError, match="cache_salt"):
        llm.generate({"prompt": "hi", "cache_salt": ""}, PARAMS, use_tqdm=False)
