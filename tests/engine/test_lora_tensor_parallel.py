"""Multi-LoRA over two tensor-parallel ranks (CPU, gloo, fp32): adapters saved by PEFT reach every rank with
the step message and each rank serves its part of them; one batch of two adapters of different ranks (over
fused QKV and gate|up slices, o_proj and down_proj) beside base-model requests gives transformers + PEFT's
greedy tokens, and so does an adapter loaded later into a slot another adapter held."""
from __future__ import annotations

import pytest
import torch

from asyncserve import SamplingParams
from asyncserve.lora_request import LoRARequest
from tests.conftest import PROMPTS, hf_greedy
from tests.peft_adapters import save_peft_adapter

pytest.importorskip("peft")

MAX_NEW = 8
# (targets, rank, alpha, rsLoRA): every projection adapted by one or both; QKV and gate|up partly and wholly.
ADAPTERS = [(["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], 4, 8, False),
            (["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], 8, 16, True),
            (["k_proj", "o_proj", "gate_proj"], 2, 4, False)]


@pytest.fixture(scope="module")
def family_adapters(tiny_model_dir, tmp_path_factory):
    """family -> (checkpoint, [(adapter path, PEFT's merged model)]), built once per family."""
    built = {}

    def get(family: str):
        if family not in built:
            base_dir = tiny_model_dir(family)
            saved = []
            for index, (targets, rank, alpha, rslora) in enumerate(ADAPTERS):
                path = str(tmp_path_factory.mktemp(f"tp-{family}-adapter{index}"))
                saved.append((path, save_peft_adapter(base_dir, path, targets, rank=rank, alpha=alpha,
                                                      use_rslora=rslora, seed=20 + index)))
            built[family] = base_dir, saved
        return built[family]

    return get


def _peft_tokens(model, tokenizer, prompt: str) -> list[int]:
    return hf_greedy(model, tokenizer.encode(prompt), MAX_NEW)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_two_ranks_serve_mixed_adapters_as_peft_and_reload_slots(family, family_adapters):
    from transformers import AutoModelForCausalLM

    from asyncserve import LLM
    base_dir, saved = family_adapters(family)
    llm = LLM(base_dir, tensor_parallel_size=2, device="cpu", dtype="float32", num_gpu_blocks_override=64,
              max_model_len=512, enable_lora=True, max_loras=2, max_lora_rank=8)
    tokenizer = llm.get_tokenizer()
    base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
    merged = {None: base, **{index + 1: model for index, (_, model) in enumerate(saved)}}
    lora = {index + 1: LoRARequest(f"adapter{index}", index + 1, path) for index, (path, _) in enumerate(saved)}
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)

    def check(prompts, lora_ids):
        outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=[lora.get(i) for i in lora_ids])
        got = [output.outputs[0].token_ids for output in outputs]
        assert got == [_peft_tokens(merged[i], tokenizer, p) for p, i in zip(prompts, lora_ids)], lora_ids
        return got

    # Adapters of rank 4 and 8 (padded to 8 in the slots) and the base model in one batch.
    mixed = check(PROMPTS[:6], [1, None, 2, 2, None, 1])
    assert len({tuple(tokens) for tokens in mixed[:3]}) == 3  # each adapter changed the output
    # A third adapter with both slots loaded: it takes the least recently used idle one, on every rank.
    check(PROMPTS[:3], [3, 1, 3])
    check(PROMPTS[:2], [2, None])
    assert llm.llm_engine.lora.num_slot_loads >= 4
    llm.shutdown()
