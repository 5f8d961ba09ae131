"""`kv_cache_dtype='fp8'` on CUDA: the Triton kernels over an e4m3 pool, CUDA-graph decode, and the pool
sized by the memory profile at twice the bf16 tokens."""
from __future__ import annotations

import gc

import pytest
import torch

from asyncserve import LLM, SamplingParams
from tests.conftest import PROMPTS
from tests.engine.test_fp8_kv_cache import MAX_TOKENS, MIN_AGREEMENT

pytestmark = pytest.mark.gpu




@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_fp8_decode_graphs_and_eager_agree(family, make_cuda_llm):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    graphs = make_cuda_llm(family, dtype="bfloat16", kv_cache_dtype="fp8")
    eager = make_cuda_llm(family, dtype="bfloat16", kv_cache_dtype="fp8", enforce_eager=True)
    assert graphs.llm_engine.executor.runner.kv_pool.storage.dtype == torch.float8_e4m3fn
    tokens = [o.outputs[0].token_ids for o in graphs.generate(PROMPTS, params, use_tqdm=False)]
    assert graphs.llm_engine.executor.runner.num_graph_steps > 0
    assert tokens == [o.outputs[0].token_ids for o in eager.generate(PROMPTS, params, use_tqdm=False)]


def test_fp8_kv_cache_on_cuda_agrees_with_the_unquantized_cache_on_most_greedy_tokens(make_cuda_llm):
    """As the CPU test (tests/engine/test_fp8_kv_cache.py), through the Triton kernels."""
    agreeing = total = 0
    for family in ("llama", "qwen3"):
        exact = make_cuda_llm(family, dtype="float32").generate(
            PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
        fp8 = make_cuda_llm(family, dtype="float32", kv_cache_dtype="fp8", enable_prefix_caching=False)
        forced = [{"prompt_token_ids": out.prompt_token_ids + out.outputs[0].token_ids} for out in exact]
        scored = fp8.generate(forced, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1),
                              use_tqdm=False)
        for out, score in zip(exact, scored):
            start = len(out.prompt_token_ids)
            for position, token in enumerate(out.outputs[0].token_ids, start):
                agreeing += score.prompt_logprobs[position][token].rank == 1
                total += 1
    assert MIN_AGREEMENT <= agreeing / total < 1.0, f"{agreeing}/{total}"


def _profiled_num_blocks(path: str, **kwargs) -> int:
    llm = LLM(path, device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3, max_num_seqs=8,
              enforce_eager=True, **kwargs)
    num_blocks = llm.llm_engine.block_pool.num_blocks
    out = llm.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) >= 1 for o in out)
    del llm, out
    gc.collect()
    torch.cuda.empty_cache()
    return num_blocks


def test_memory_profile_gives_an_fp8_pool_twice_the_bf16_blocks(tiny_model_dir):
    path = tiny_model_dir("qwen3")
    bf16 = _profiled_num_blocks(path)
    fp8 = _profiled_num_blocks(path, kv_cache_dtype="fp8")
    assert abs(fp8 / bf16 - 2.0) < 0.01, (fp8, bf16)
