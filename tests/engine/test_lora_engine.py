"""Multi-LoRA offline (issue 25): adapters saved by PEFT itself, served by requests that name them with a
LoRARequest; each request's greedy tokens equal transformers' with that adapter (PEFT's merged model), in one
batch with other adapters and the base model, with fewer GPU slots than adapters, and never sharing prefix
cache blocks across adapters."""
from __future__ import annotations

import pytest
import torch

from asyncserve import SamplingParams
from asyncserve.errors import InvalidParameterError, LoRAAdapterError
from asyncserve.lora_request import LoRARequest
from tests.conftest import PROMPTS, hf_greedy
from tests.peft_adapters import save_peft_adapter

pytest.importorskip("peft")

MAX_NEW = 12
TARGETS = [["q_proj", "v_proj", "o_proj"], ["k_proj", "gate_proj", "up_proj", "down_proj"]]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Two PEFT LoRA adapters of the tiny Llama (different targets, ranks and alpha; one rsLoRA), saved as
    PEFT saves them; and transformers' merged models."""
    base_dir = tiny_model_dir("llama")
    saved = []
    for index, targets in enumerate(TARGETS):
        path = str(tmp_path_factory.mktemp(f"adapter{index}"))
        merged = save_peft_adapter(base_dir, path, targets, rank=4 * (index + 1), alpha=8 + 8 * index,
                                   use_rslora=index == 1, seed=index)
        saved.append((path, merged))
    return base_dir, saved


def _expected(model, tokenizer, prompts):
    return [hf_greedy(model, tokenizer.encode(p), MAX_NEW) for p in prompts]


def test_mixed_adapters_and_base_in_one_batch_match_peft(adapters, make_llm):
    from transformers import AutoModelForCausalLM
    base_dir, saved = adapters
    llm = make_llm("llama", dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8)
    tokenizer = llm.get_tokenizer()
    prompts = PROMPTS[:6]
    requests = [LoRARequest("a", 1, saved[0][0]), None, LoRARequest("b", 2, saved[1][0])] * 2
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW), use_tqdm=False,
                           lora_request=requests)
    base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
    models = {1: saved[0][1], 2: saved[1][1], None: base}
    for output, prompt, request in zip(outputs, prompts, requests):
        model = models[request.lora_int_id if request else None]
        assert output.outputs[0].token_ids == _expected(model, tokenizer, [prompt])[0], request
    base_out = [o.outputs[0].token_ids for o, r in zip(outputs, requests) if r is None]
    adapted = [o.outputs[0].token_ids for o, r in zip(outputs, requests) if r is not None]
    assert base_out and adapted and base_out[0] != adapted[0] != adapted[1]


def test_more_adapters_than_slots_take_turns(adapters, make_llm):
    base_dir, saved = adapters
    llm = make_llm("llama", dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=8)
    tokenizer = llm.get_tokenizer()
    requests = [LoRARequest("a", 1, saved[0][0]), LoRARequest("b", 2, saved[1][0])] * 2
    outputs = llm.generate(PROMPTS[:4], SamplingParams(temperature=0.0, max_tokens=MAX_NEW), use_tqdm=False,
                           lora_request=requests)
    for output, prompt, request in zip(outputs, PROMPTS[:4], requests):
        merged = saved[request.lora_int_id - 1][1]
        assert output.outputs[0].token_ids == _expected(merged, tokenizer, [prompt])[0]
    manager = llm.llm_engine.lora
    assert manager.num_slot_loads >= 2 and manager.users == [0]


def test_prefix_cache_blocks_are_never_shared_across_adapters(adapters, make_llm):
    base_dir, saved = adapters
    llm = make_llm("llama", dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8, block_size=16)
    prompt = PROMPTS[1] * 3  # several full blocks
    params = SamplingParams(temperature=0.0, max_tokens=2)
    first = llm.generate(prompt, params, use_tqdm=False, lora_request=LoRARequest("a", 1, saved[0][0]))[0]
    other = llm.generate(prompt, params, use_tqdm=False, lora_request=LoRARequest("b", 2, saved[1][0]))[0]
    same = llm.generate(prompt, params, use_tqdm=False, lora_request=LoRARequest("a", 1, saved[0][0]))[0]
    assert first.num_cached_tokens == 0 and other.num_cached_tokens == 0
    assert same.num_cached_tokens > 0


def test_lora_requests_are_checked_before_anything_runs(adapters, make_llm, tmp_path):
    base_dir, saved = adapters
    plain = make_llm("llama", dtype="float32")
    with pytest.raises(InvalidParameterError, match="enable_lora=True"):
        plain.generate("hi", SamplingParams(max_tokens=2), lora_request=LoRARequest("a", 1, saved[0][0]))
    llm = make_llm("llama", dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=4)
    with pytest.raises(LoRAAdapterError, match="rank 8, over max_lora_rank=4"):
        llm.generate("hi", SamplingParams(max_tokens=2), lora_request=LoRARequest("b", 2, saved[1][0]))
    with pytest.raises(LoRAAdapterError, match="no adapter_config.json"):
        llm.generate("hi", SamplingParams(max_tokens=2), lora_request=LoRARequest("c", 3, str(tmp_path)))
    llm.generate("hi", SamplingParams(max_tokens=2), lora_request=LoRARequest("a", 1, saved[0][0]))
    with pytest.raises(LoRAAdapterError, match="lora_int_id 1 is already adapter 'a'"):
        llm.generate("hi", SamplingParams(max_tokens=2), lora_request=LoRARequest("z", 1, saved[1][0]))
    assert not llm.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_adapters_on_a_quantized_base_match_peft_on_its_dequantized_weights(fmt, tiny_model_dir, tmp_path, make_llm):
    """A GPTQ / AWQ base keeps its int4 weights; the adapter (fp32 here, the model's dtype) adds beside them."""
    from tests.quantized_checkpoints import build_quantized
    quantized, dequantized = build_quantized(tiny_model_dir("llama"), tmp_path / fmt, fmt=fmt)
    merged = save_peft_adapter(dequantized, str(tmp_path / "adapter"), ["q_proj", "o_proj", "up_proj"], rank=4,
                               alpha=8, seed=3)
    from asyncserve import LLM
    llm = LLM(quantized, device="cpu", dtype="float32", num_gpu_blocks_override=256, enable_lora=True, max_loras=1,
              max_lora_rank=4)
    tokenizer = llm.get_tokenizer()
    outputs = llm.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=MAX_NEW), use_tqdm=False,
                           lora_request=LoRARequest("q", 1, str(tmp_path / "adapter")))
    assert [o.outputs[0].token_ids for o in outputs] == _expected(merged, tokenizer, PROMPTS[:2])


def test_an_adapter_of_another_base_model_is_refused_and_the_engine_goes_on(tmp_path, make_llm):
    import json

    from safetensors.torch import save_file
    (tmp_path / "other").mkdir()
    (tmp_path / "other/adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(4, 4096), f"{prefix}.lora_B.weight": torch.zeros(4096, 4)},
              str(tmp_path / "other/adapter_model.safetensors"))  # an 8B's q_proj, not the tiny model's
    llm = make_llm("llama", dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=4)
    with pytest.raises(LoRAAdapterError, match="trained on another base model"):
        llm.generate("hi", SamplingParams(max_tokens=2), lora_request=LoRARequest("other", 1, str(tmp_path / "other")))
    assert llm.generate("hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_steps_without_adapter_rows_skip_the_lora_kernels(adapters, make_llm, monkeypatch):
    from asyncserve.layers import lora as lora_layers
    calls = []
    original = lora_layers.lora_shrink
    monkeypatch.setattr(lora_layers, "lora_shrink", lambda *args: calls.append(1) or original(*args))
    base_dir, saved = adapters
    llm = make_llm("llama", dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=8)
    calls.clear()  # the memory profile's forward ran them
    llm.generate(PROMPTS[:2], SamplingParams(max_tokens=3), use_tqdm=False)
    assert not calls
    llm.generate(PROMPTS[:2], SamplingParams(max_tokens=3), use_tqdm=False,
                 lora_request=LoRARequest("a", 1, saved[0][0]))
    assert calls


def test_speculation_keeps_an_adapters_greedy_tokens(adapters, make_llm):
    """n-gram drafts verified through the adapter: the same tokens as the adapter without speculation."""
    base_dir, saved = adapters
    request = LoRARequest("a", 1, saved[0][0])
    params = SamplingParams(temperature=0.0, max_tokens=24, frequency_penalty=-2.0)  # loops: drafts come true
    kwargs = {"dtype": "float32", "enable_lora": True, "max_loras": 1, "max_lora_rank": 8}
    plain = make_llm("llama", **kwargs).generate(PROMPTS[:3], params, use_tqdm=False, lora_request=request)
    llm = make_llm("llama", speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                "prompt_lookup_max": 3, "prompt_lookup_min": 1,
                                                "disable_when_slower": False}, **kwargs)  # speculate at every step
    spec = llm.generate(PROMPTS[:3], params, use_tqdm=False, lora_request=request)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    stats = llm.llm_engine.speculator.stats
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens > 0
