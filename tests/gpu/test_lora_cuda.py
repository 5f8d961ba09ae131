"""LoRA on CUDA: decode steps replay CUDA graphs that read each row's adapter slot from the persistent buffer,
and a batch of two adapters and the base model gives what the eager engine gives (the CPU tests compare both
with PEFT), with the Triton kernels at work."""
from __future__ import annotations

import pytest

from asyncserve import LoRARequest, SamplingParams
from tests.conftest import PROMPTS
from tests.peft_adapters import save_peft_adapter

pytestmark = pytest.mark.gpu
pytest.importorskip("peft")


def test_graphs_with_adapters_agree_with_eager_and_with_peft(make_cuda_llm, tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama")
    [save_peft_adapter(base, str(tmp_path / f"a{i}"), targets, rank=8, alpha=16, seed=i)
              for i, targets in enumerate([["q_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]])]
    requests = [LoRARequest("a", 1, str(tmp_path / "a0")), None, LoRARequest("b", 2, str(tmp_path / "a1"))] * 2
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    kwargs = dict(dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8)
    graphs_llm = make_cuda_llm("llama", **kwargs)
    graphs = graphs_llm.generate(PROMPTS[:6], params, use_tqdm=False, lora_request=requests)
    eager = make_cuda_llm("llama", enforce_eager=True, **kwargs).generate(PROMPTS[:6], params, use_tqdm=False,
                                                                           lora_request=requests)
    assert [o.outputs[0].token_ids for o in graphs] == [o.outputs[0].token_ids for o in eager]
    assert graphs_llm.llm_engine.executor.runner.num_graph_steps > 0
    by_adapter = {}
    for output, request in zip(graphs, requests):
        by_adapter.setdefault(request.lora_int_id if request else 0, []).append(output.outputs[0].token_ids)
    assert by_adapter[0] != by_adapter[1] != by_adapter[2]  # each adapter changed the output


def test_prompt_chunks_take_the_tiled_kernels_and_agree_with_the_per_row_ones(make_cuda_llm, tiny_model_dir,
                                                                              tmp_path, monkeypatch):
    from asyncserve.runner import inputs
    save_peft_adapter(tiny_model_dir("llama"), str(tmp_path / "a"), ["q_proj", "up_proj", "down_proj"], rank=8,
                      alpha=16, seed=3)
    request = LoRARequest("a", 1, str(tmp_path / "a"))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    kwargs = {"dtype": "float32", "enable_lora": True, "max_loras": 1, "max_lora_rank": 8, "enforce_eager": True}
    tiled = make_cuda_llm("llama", **kwargs).generate(PROMPTS[:4], params, use_tqdm=False, lora_request=request)
    monkeypatch.setattr(inputs, "lora_chunks", lambda segments: [])  # every step on the per-row kernels
    per_row = make_cuda_llm("llama", **kwargs).generate(PROMPTS[:4], params, use_tqdm=False, lora_request=request)
    assert [o.outputs[0].token_ids for o in tiled] == [o.outputs[0].token_ids for o in per_row]
