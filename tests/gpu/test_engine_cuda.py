"""The engine on CUDA: Triton kernels, the dedicated stream and CUDA graphs keep greedy output exact."""
from __future__ import annotations

import pytest
import torch

from asyncserve import LLM, SamplingParams
from asyncserve.testing.tiny_model import FAMILIES
from tests.conftest import PROMPTS, hf_greedy

pytestmark = pytest.mark.gpu

MAX_NEW = 24


def transformers_follows_the_config(family: str) -> bool:
    """Whether the installed transformers computes `family` as its config says. transformers before ~5.2x
    fixed GPT-OSS's clamped SwiGLU at alpha 1.702 and limit 7.0 whatever the config held; the tiny checkpoint
    sets limit 3.0 (so that the clamp acts on small activations), which newer transformers and we read."""
    if family != "gpt_oss":
        return True
    import inspect

    from transformers.models.gpt_oss import modeling_gpt_oss
    return "config.swiglu_limit" in inspect.getsource(modeling_gpt_oss.GptOssExperts.__init__)




@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_fp32_on_cuda_matches_transformers(family, enforce_eager, make_cuda_llm, hf_reference, tiny_model_dir):
    llm = make_cuda_llm(family, dtype="float32", enforce_eager=enforce_eager)
    assert (llm.llm_engine.executor.runner.decode_graphs is None) == enforce_eager
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_NEW), use_tqdm=False)
    if transformers_follows_the_config(family):
        model, tokenizer = hf_reference(family)
        expected = [hf_greedy(model, tokenizer.encode(p), MAX_NEW) for p in PROMPTS]
    else:  # the CPU engine, which CI checks token for token against a transformers that reads the config
        cpu = LLM(tiny_model_dir(family), device="cpu", dtype="float32")
        expected = [o.outputs[0].token_ids for o in cpu.generate(PROMPTS, SamplingParams(
            temperature=0.0, max_tokens=MAX_NEW), use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in outputs] == expected
    # Steps were launched before the engine read the tokens they take as input (fed on the device),
    # and decode steps replayed graphs unless eager.
    runner = llm.llm_engine.executor.runner
    assert runner.num_device_fed_steps > 0
    assert (runner.num_graph_steps > 0) != enforce_eager


@pytest.mark.parametrize("short_graphs", [False, True], ids=["default", "short-context-graphs"])
@pytest.mark.parametrize("family", ["llama3", "qwen3", "gemma2"])
def test_graphs_and_eager_agree_in_bf16(family, short_graphs, make_cuda_llm, monkeypatch):
    """Bit-for-bit in bf16 too: graphs and eager steps split a context's keys into the same partitions,
    with or without the short-context graphs (whose one-partition bound eager steps then share)."""
    from asyncserve.kernels import attention_decode
    from asyncserve.runner import decode_graphs
    monkeypatch.setattr(decode_graphs, "SHORT_CONTEXT_GRAPHS", short_graphs)
    monkeypatch.setattr(attention_decode, "LONG_SINGLE_PARTITION", short_graphs)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    graphs = make_cuda_llm(family, dtype="bfloat16").generate(PROMPTS, params, use_tqdm=False)
    eager = make_cuda_llm(family, dtype="bfloat16", enforce_eager=True).generate(PROMPTS, params,
                                                                                 use_tqdm=False)
    assert [o.outputs[0].token_ids for o in graphs] == [o.outputs[0].token_ids for o in eager]


def test_seeded_sampling_on_cuda_is_reproducible(make_cuda_llm):
    llm = make_cuda_llm("qwen3", dtype="bfloat16")
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=11, max_tokens=16, ignore_eos=True)
    first = llm.generate(PROMPTS, params, use_tqdm=False)
    second = llm.generate(PROMPTS[::-1], params, use_tqdm=False)[::-1]
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in second]


def test_kv_pool_is_sized_from_memory_utilization(tiny_model_dir):
    from asyncserve import LLM
    llm = LLM(tiny_model_dir("qwen3"), device="cuda", gpu_memory_utilization=0.3, max_num_seqs=8)
    pool = llm.llm_engine.block_pool
    assert pool.num_blocks * 16 >= llm.llm_engine.model_config.max_model_len
    used = torch.cuda.memory_reserved() / torch.cuda.get_device_properties(0).total_memory
    assert used < 0.35
    out = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) >= 1 for o in out)


@pytest.mark.parametrize("family", ["llama3", "qwen2", "gemma2", "gemma3", "mixtral", "qwen3_moe"])
def test_mixed_decode_and_chunked_prefill_steps_on_cuda(family, make_cuda_llm, hf_reference):
    """Small token budget: steps mix decodes (decode kernel) with prefill chunks (prefill kernel), replayed
    from the mixed-step graph pieces with attention between them."""
    llm = make_cuda_llm(family, dtype="float32", max_num_batched_tokens=32, max_num_seqs=4)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
    mixed = 0
    for index, prompt in enumerate(PROMPTS):
        engine.add_request(str(index), engine.input_processor.process(prompt, params))
    results = {}
    while engine.has_unfinished_requests():
        step, scheduled = engine.schedule()
        mixed += len({seq.is_prefilling for seq, _ in scheduled}) == 2
        for output in engine.process(scheduled, engine.executor.execute(step)):
            if output.finished:
                results[int(output.request_id)] = output.outputs[0].token_ids
    assert mixed > 0
    assert engine.executor.runner.num_mixed_graph_steps >= mixed
    model, tokenizer = hf_reference(family)
    assert [results[i] for i in range(len(PROMPTS))] == [hf_greedy(model, tokenizer.encode(p), MAX_NEW)
                                                         for p in PROMPTS]
