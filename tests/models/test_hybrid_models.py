"""Hybrid linear-attention families (Qwen3-Next, Qwen3.5, Qwen3.5-MoE) are token-exact with transformers in
float32 on tiny checkpoints of their public layouts: with requests joining mid-flight and prompts chunked
across the DeltaNet kernel's 64-token chunks, through preemption (recompute and swap), and for forks
(n > 1), whose recurrent state must be the prompt's, not their parent's later one."""
from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from asyncserve import LLM, SamplingParams
from asyncserve.errors import ConfigError
from asyncserve.testing.tiny_model import HYBRID_FAMILIES
from tests.conftest import (
    PROMPTS,
    assert_pool_clean,
    generate_joining_mid_flight,
    hf_greedy,
)

MAX_NEW = 24
CHUNK_BUDGET = 40  # prompt chunks end inside the kernel's 64-token chunks


_greedy_cache: dict = {}


def _hf_greedy_to_the_end(model, ids: list[int], max_new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                             eos_token_id=None, pad_token_id=model.generation_config.pad_token_id,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def _expected(hf_reference, family, prompts, max_new=MAX_NEW, ignore_eos=False):
    """transformers' greedy continuations, computed once per prompt across the tests."""
    model, tokenizer = hf_reference(family)
    generate = _hf_greedy_to_the_end if ignore_eos else hf_greedy
    for prompt in prompts:
        if (family, prompt, max_new, ignore_eos) not in _greedy_cache:
            _greedy_cache[family, prompt, max_new, ignore_eos] = generate(model, tokenizer.encode(prompt), max_new)
    return [_greedy_cache[family, prompt, max_new, ignore_eos] for prompt in prompts]


def _assert_states_free(llm: LLM) -> None:
    engine = llm.llm_engine
    assert_pool_clean(engine)
    states = engine.kv_manager.states
    assert states.num_free == states.num_slots and not states.pending_fork_copies


def _record_prompt_chunks(engine) -> list[tuple[int, int]]:
    """(start, length) of every prompt chunk that continues an earlier one."""
    chunks = []
    schedule = engine.scheduler.schedule

    def recording():
        message, scheduled = schedule()
        for entry, (seq, _) in zip(message.seqs, scheduled):
            if 0 < entry.start_position < seq.num_prompt_tokens:
                chunks.append((entry.start_position, entry.num_new_tokens))
        return message, scheduled

    engine.scheduler.schedule = recording
    return chunks


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_requests_joining_mid_flight_match_transformers(family, make_llm, hf_reference):
    llm = make_llm(family, max_num_batched_tokens=CHUNK_BUDGET, max_num_seqs=4)
    chunks = _record_prompt_chunks(llm.llm_engine)
    results = generate_joining_mid_flight(llm.llm_engine, PROMPTS, SamplingParams(temperature=0.0,
                                                                                   max_tokens=MAX_NEW))
    assert results == _expected(hf_reference, family, PROMPTS)
    assert any(start % 64 for start, _ in chunks), "no prompt chunk started inside a kernel chunk"
    _assert_states_free(llm)


@pytest.mark.parametrize(("family", "mode"), [("qwen3_next", "recompute"), ("qwen3_5_moe", "swap")])
def test_preempted_sequences_resume_exactly(family, mode, make_llm, hf_reference):
    """12 blocks (192 tokens) for four running sequences that need 15 and grow: sequences are preempted,
    then recomputed from zeros or swapped back with their states, and still match transformers."""
    llm = make_llm(family, num_gpu_blocks_override=12, max_model_len=192, max_num_seqs=4,
                   preemption_mode=mode, swap_space=0.01)
    prompts = [p for p in PROMPTS if len(p) < 200]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    engine = llm.llm_engine
    assert engine.scheduler.num_preemptions > 0
    assert (engine.kv_manager.num_swaps > 0) == (mode == "swap")
    assert [o.outputs[0].token_ids for o in outputs] == _expected(hf_reference, family, prompts, ignore_eos=True)
    _assert_states_free(llm)


def test_greedy_forks_all_continue_from_the_prompts_state(make_llm, hf_reference):
    """n = 3 under greedy sampling: every fork is transformers' greedy continuation. The parent decodes its
    first token in the step launched before the forks exist; a fork given that later state would differ."""
    llm = make_llm("qwen3_5", max_num_batched_tokens=CHUNK_BUDGET)
    prompts = [PROMPTS[4], PROMPTS[0]]
    outputs = llm.generate(prompts, SamplingParams(n=3, temperature=0.0, max_tokens=16, ignore_eos=True),
                           use_tqdm=False)
    model, tokenizer = hf_reference("qwen3_5")
    for prompt, output in zip(prompts, outputs):
        expected = hf_greedy(model, tokenizer.encode(prompt), 16)  # may stop at EOS; ours ignores it
        assert [c.token_ids[:len(expected)] for c in output.outputs] == [expected] * 3
    _assert_states_free(llm)


def test_sampled_forks_equal_single_requests_with_their_seeds(make_llm):
    """Sample i of an n = 3 request draws from seed + i, as a lone request with that seed does: equal
    token ids only if each fork's state started as the prompt's."""
    llm = make_llm("qwen3_next")
    prompt = PROMPTS[5]
    forked = llm.generate(prompt, SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True),
                          use_tqdm=False)[0]
    alone = [llm.generate(prompt, SamplingParams(temperature=1.0, seed=11 + i, max_tokens=12, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids for i in range(3)]
    assert [c.token_ids for c in forked.outputs] == alone
    assert len({tuple(ids) for ids in alone}) > 1
    best = llm.generate(prompt, SamplingParams(n=1, best_of=3, temperature=1.0, seed=11, max_tokens=12,
                                               ignore_eos=True, logprobs=0), use_tqdm=False)[0]
    assert best.outputs[0].token_ids in alone
    _assert_states_free(llm)


def _stacked_public_layout(source: str, target: str) -> None:
    """The checkpoint as Qwen3.5-MoE's hub files store it: each layer's experts stacked in one gate|up and
    one down tensor, and an MTP head beside the model."""
    shutil.copytree(source, target)
    tensors = load_file(os.path.join(target, "model.safetensors"))
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    kept = {}
    for name, tensor in tensors.items():
        parts = name.split(".")
        if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
            at = parts.index("experts")
            prefix = ".".join(parts[:at + 1])
            experts.setdefault(prefix, {}).setdefault(int(parts[at + 1]), {})[parts[at + 2]] = tensor
        else:
            kept[name] = tensor
    for prefix, by_expert in experts.items():
        ordered = [by_expert[e] for e in sorted(by_expert)]
        kept[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([e["gate_proj"], e["up_proj"]]) for e in ordered])
        kept[f"{prefix}.down_proj"] = torch.stack([e["down_proj"] for e in ordered])
    kept["mtp.fc.weight"] = torch.zeros(64, 128)
    kept["mtp.layers.0.input_layernorm.weight"] = torch.zeros(64)
    save_file(kept, os.path.join(target, "model.safetensors"), metadata={"format": "pt"})


def test_stacked_experts_and_the_mtp_head_of_the_public_layout_load(tiny_model_dir, tmp_path, hf_reference):
    stacked = str(tmp_path / "stacked")
    _stacked_public_layout(tiny_model_dir("qwen3_5_moe"), stacked)
    llm = LLM(stacked, device="cpu", num_gpu_blocks_override=256)
    outputs = llm.generate(PROMPTS[:3], SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == _expected(hf_reference, "qwen3_5_moe", PROMPTS[:3], 12)


def test_the_text_part_of_a_multimodal_checkpoint_is_served(tiny_model_dir, caplog):
    path = tiny_model_dir("qwen3_5")
    with open(os.path.join(path, "config.json")) as f:
        assert "text_config" in json.load(f)
    with caplog.at_level(logging.INFO, logger="asyncserve"):
        llm = LLM(path, device="cpu", num_gpu_blocks_override=64, max_model_len=512)
    config = llm.llm_engine.config
    assert config.model.hf_config.architectures == ["Qwen3_5ForConditionalGeneration"]
    assert config.model.vocab_size == config.model.hf_config.vocab_size == 768
    assert "text part of a multimodal checkpoint" in caplog.text


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_prefix_caching_is_off_with_one_line_saying_why(family, tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="asyncserve"):
        llm = LLM(tiny_model_dir(family), device="cpu", num_gpu_blocks_override=64, max_model_len=512,
                  enable_prefix_caching=True,
                  max_num_seqs=5)
    config = llm.llm_engine.config
    assert not config.cache.enable_prefix_caching and not llm.llm_engine.block_pool.enable_caching
    assert config.cache.num_state_slots == 5
    lines = [r.message for r in caplog.records if r.message.startswith("prefix caching is off")]
    assert len(lines) == 1 and "recurrent state" in lines[0]
    assert "state pool (linear attention): 5 slots" in caplog.text


def test_tensor_parallelism_is_refused_before_any_worker_starts(tiny_model_dir):
    with pytest.raises(ConfigError, match="Gated DeltaNet layers are not tensor-parallel"):
        LLM(tiny_model_dir("qwen3_next"), device="cpu", tensor_parallel_size=2, num_gpu_blocks_override=64)


def test_the_text_only_form_of_a_qwen3_5_checkpoint_loads(tiny_model_dir, tmp_path, hf_reference):
    """transformers' Qwen3_5ForCausalLM saves config.json's text config alone (`qwen3_5_text`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    source = tiny_model_dir("qwen3_5")
    text_only = str(tmp_path / "text-only")
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).save_pretrained(text_only)
    AutoTokenizer.from_pretrained(source).save_pretrained(text_only)
    with open(os.path.join(text_only, "config.json")) as f:
        config = json.load(f)
    assert (config["architectures"], config["model_type"]) == (["Qwen3_5ForCausalLM"], "qwen3_5_text")
    llm = LLM(text_only, device="cpu", num_gpu_blocks_override=256)
    outputs = llm.generate(PROMPTS[:3], SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == _expected(hf_reference, "qwen3_5", PROMPTS[:3], 12)


def test_the_state_pool_is_counted_in_the_memory_budget(tiny_model_dir):
    """On the CPU the KV pool gets cpu_kv_cache_space less the state pool (max_num_seqs slots and the graphs'
    padding slot); a state pool larger than the space is refused by name."""
    from asyncserve.runner.state_pool import state_bytes_per_slot
    space = 0.002  # GiB
    llm = LLM(tiny_model_dir("qwen3_next"), device="cpu", cpu_kv_cache_space=space, max_num_seqs=6, max_model_len=128)
    engine = llm.llm_engine
    runner = engine.executor.runner
    state_bytes = state_bytes_per_slot(runner.model.state_layers()) * 7
    assert engine.executor.state_slot_bytes() * 7 == state_bytes > 0
    assert engine.block_pool.num_blocks == (int(space * (1 << 30)) - state_bytes) // engine.executor.bytes_per_block()
    assert sum(t.numel() * t.element_size() for t in runner.state_pool.tensors) == state_bytes


def test_max_num_seqs_is_lowered_to_the_states_that_fit_with_a_warning(tiny_model_dir, caplog, hf_reference):
    """States of max_num_seqs sequences that would take more than half the cache space: fewer sequences run at
    once (vLLM refuses to start instead), the log says so and how to choose, and the output stays exact."""
    from asyncserve.runner.state_pool import state_bytes_per_slot
    space = 0.002  # GiB
    with caplog.at_level(logging.WARNING, logger="asyncserve"):
        llm = LLM(tiny_model_dir("qwen3_next"), device="cpu", cpu_kv_cache_space=space, max_num_seqs=200,
                  max_model_len=512)
    engine = llm.llm_engine
    per_slot = state_bytes_per_slot(engine.executor.runner.model.state_layers())
    slots = engine.config.scheduler.max_num_seqs
    assert slots == int(space * (1 << 30) / 2 // per_slot) - 1 < 200
    assert engine.config.cache.num_state_slots == slots == engine.kv_manager.states.num_slots
    assert f"max_num_seqs lowered from 200 to {slots}" in caplog.text
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == _expected(hf_reference, "qwen3_next", PROMPTS, 12)
    _assert_states_free(llm)


def test_states_may_take_more_than_half_where_they_outweigh_a_sequences_kv(tiny_model_dir, caplog):
    """With a short max_model_len a sequence's state outweighs the KV it can ever hold: the state pool takes
    its proportional share (state / (state + max_model_len tokens of KV)) instead of half, so more sequences
    run and the KV pool still holds max_model_len tokens for each of them."""
    from asyncserve.runner.state_pool import state_bytes_per_slot
    space, max_model_len = 0.002, 16  # GiB, tokens
    with caplog.at_level(logging.WARNING, logger="asyncserve"):
        llm = LLM(tiny_model_dir("qwen3_next"), device="cpu", cpu_kv_cache_space=space, max_num_seqs=200,
                  max_model_len=max_model_len, max_num_batched_tokens=64)
    engine = llm.llm_engine
    available = space * (1 << 30)
    per_slot = state_bytes_per_slot(engine.executor.runner.model.state_layers())
    kv_per_seq = -(-max_model_len // engine.config.cache.block_size) * engine.executor.bytes_per_block()
    assert per_slot > kv_per_seq  # the case this rule is for
    slots = engine.config.scheduler.max_num_seqs
    assert slots == int(available * per_slot / (per_slot + kv_per_seq) // per_slot) - 1
    assert slots > int(available / 2 // per_slot) - 1  # more than the half split ran
    assert engine.block_pool.num_blocks * engine.config.cache.block_size >= slots * max_model_len
    assert f"max_num_seqs lowered from 200 to {slots}" in caplog.text
    _assert_states_free(llm)


def test_mamba_ssm_cache_dtype_sets_the_recurrent_states_element_type(tiny_model_dir):
    """vLLM's --mamba-ssm-cache-dtype: 'auto' is the model's dtype (float32 here), bfloat16 halves the
    delta-rule state; the conv state keeps the model's dtype; an unknown name is refused by name."""
    path = tiny_model_dir("qwen3_next")
    runners = {name: LLM(path, device="cpu", max_num_seqs=2, max_model_len=64, num_gpu_blocks_override=16,
                         mamba_ssm_cache_dtype=name).llm_engine.executor.runner for name in ("auto", "bfloat16")}
    dtypes = {name: [t.dtype for t in runner.state_pool.tensors] for name, runner in runners.items()}
    assert set(dtypes["auto"]) == {torch.float32}
    assert dtypes["bfloat16"][1::2] == [torch.bfloat16] * (len(dtypes["bfloat16"]) // 2)  # delta-rule states
    assert set(dtypes["bfloat16"][0::2]) == {torch.float32}  # conv states: the model's dtype
    with pytest.raises(ConfigError, match="mamba_ssm_cache_dtype='fp8'"):
        LLM(path, device="cpu", mamba_ssm_cache_dtype="fp8")


def test_prompt_steps_carry_int64_offsets_on_the_device_and_the_host(make_llm, monkeypatch):
    """fla's varlen kernels get the step's offsets as int64 on both sides, made once per step (every layer
    sees the same tensors, so fla's identity cache of chunk indices hits after the first layer)."""
    from asyncserve.layers import gated_delta_net
    seen = []
    original = gated_delta_net._varlen_offsets

    def recording(meta):
        starts, host = original(meta)
        seen.append((meta.query_start_loc, starts, host))
        return starts, host

    monkeypatch.setattr(gated_delta_net, "_varlen_offsets", recording)
    llm = make_llm("qwen3_next", max_num_batched_tokens=CHUNK_BUDGET, max_num_seqs=4)
    llm.generate(PROMPTS[:3], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    steps = [entry for entry in seen if entry[2] is not None]
    assert steps and len(steps) == len(seen)
    for query_start_loc, starts, host in steps:
        assert starts.dtype == host.dtype == torch.int64 and host.device.type == "cpu"
        assert starts.tolist() == host.tolist() == query_start_loc.tolist()
    layers_per_step = sum(1 for entry in seen if entry[1] is seen[0][1])
    assert layers_per_step == len(llm.llm_engine.executor.runner.model.state_layers())
