"""Qwen-1 (QWenLMHeadModel) served natively: its weights land where the equivalent Qwen2 has them, greedy
output is token-exact with transformers' Qwen2 of the same weights (plain and GPTQ Int4), max_model_len
stops at seq_length, and the checkpoint's remote code never runs, --trust-remote-code or not."""
from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from asyncserve import LLM, EngineConfig, SamplingParams
from asyncserve.errors import ConfigError
from asyncserve.layers.quantization.gptq import GPTQConfig
from asyncserve.models.loader import load_model
from asyncserve.engine.resolve_config import resolve_config
from tests.checkpoint_edits import copy_checkpoint
from tests.conftest import PROMPTS, assert_pool_clean, generate_joining_mid_flight, hf_greedy
from tests.qwen1_checkpoints import HEAD_DIM, HEADS, MLP_WIDTH, SEQ_LENGTH, build_qwen1_gptq

MAX_NEW = 24


@pytest.fixture(scope="module")
def reference(qwen1_checkpoint):
    return AutoModelForCausalLM.from_pretrained(qwen1_checkpoint[1], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def gptq_checkpoint(qwen1_checkpoint, tmp_path_factory):
    return build_qwen1_gptq(*qwen1_checkpoint, tmp_path_factory.mktemp("qwen1-gptq"))


@pytest.fixture
def make_llm():
    made = []

    def make(path: str, **kwargs) -> LLM:
        llm = LLM(path, device="cpu", num_gpu_blocks_override=512, **kwargs)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        assert_pool_clean(llm.llm_engine)


def _expected(model, tokenizer, prompts=PROMPTS, max_new=MAX_NEW) -> list[list[int]]:
    return [hf_greedy(model, tokenizer.encode(prompt), max_new) for prompt in prompts]


def test_every_tensor_lands_where_the_qwen2_reference_has_it(qwen1_checkpoint, reference):
    ours = load_model(resolve_config(EngineConfig(qwen1_checkpoint[0], device="cpu", dtype="float32")))
    size = HEADS * HEAD_DIM
    assert torch.equal(ours.embed_tokens.weight, reference.model.embed_tokens.weight)
    assert torch.equal(ours.ln_f.weight, reference.model.norm.weight)
    assert torch.equal(ours.lm_head.weight, reference.lm_head.weight)
    for block, hf_layer in zip(ours.h, reference.model.layers, strict=True):
        hf_attn = hf_layer.self_attn
        q, k, v = block.attn.c_attn.weight.split(size)
        assert torch.equal(q, hf_attn.q_proj.weight) and torch.equal(k, hf_attn.k_proj.weight)
        assert torch.equal(v, hf_attn.v_proj.weight)
        q_bias, k_bias, v_bias = block.attn.c_attn.bias.split(size)
        assert torch.equal(q_bias, hf_attn.q_proj.bias) and torch.equal(k_bias, hf_attn.k_proj.bias)
        assert torch.equal(v_bias, hf_attn.v_proj.bias)
        assert block.attn.c_proj.bias is None
        assert torch.equal(block.attn.c_proj.weight, hf_attn.o_proj.weight)
        gate, up = block.mlp.gate_up_proj.weight.split(MLP_WIDTH)  # w2 is Qwen-1's gate, w1 its up
        assert torch.equal(gate, hf_layer.mlp.gate_proj.weight)
        assert torch.equal(up, hf_layer.mlp.up_proj.weight)
        assert torch.equal(block.mlp.c_proj.weight, hf_layer.mlp.down_proj.weight)
        assert torch.equal(block.ln_1.weight, hf_layer.input_layernorm.weight)
        assert torch.equal(block.ln_2.weight, hf_layer.post_attention_layernorm.weight)


def test_batch_of_very_different_lengths_matches_transformers(qwen1_checkpoint, reference, make_llm):
    llm = make_llm(qwen1_checkpoint[0])
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_NEW), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == _expected(reference, llm.get_tokenizer())


def test_requests_joining_mid_flight_match_transformers(qwen1_checkpoint, reference, make_llm):
    """Continuous batching: new prompts prefill (in chunks) while earlier ones decode."""
    llm = make_llm(qwen1_checkpoint[0], max_num_batched_tokens=32, max_num_seqs=4)
    results = generate_joining_mid_flight(llm.llm_engine, PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_NEW))
    assert results == _expected(reference, llm.get_tokenizer())


def test_gptq_int4_checkpoint_matches_its_dequantized_reference(gptq_checkpoint, make_llm):
    """Qwen-14B-Chat-Int4's layout: quantize_config.json, 4 bits, groups of 128, no act-order; c_attn,
    c_proj, w1/w2 (fused into one gate|up layer) and the MLP's c_proj packed."""
    path, reference_path = gptq_checkpoint
    reference = AutoModelForCausalLM.from_pretrained(reference_path, dtype=torch.float32).eval()
    llm = make_llm(path, dtype="float32")
    quant = llm.llm_engine.config.quantization
    assert isinstance(quant, GPTQConfig) and (quant.bits, quant.group_size, quant.desc_act) == (4, 128, False)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_NEW), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == _expected(reference, llm.get_tokenizer())


def test_max_model_len_stops_at_seq_length(qwen1_checkpoint):
    """Past seq_length Qwen-1 needs dynamic NTK and log-n scaling, which are not built: never go there."""
    path = qwen1_checkpoint[0]
    assert resolve_config(EngineConfig(path, device="cpu")).model.max_model_len == SEQ_LENGTH
    with pytest.raises(ConfigError, match=f"larger than the model supports \\({SEQ_LENGTH}"):
        resolve_config(EngineConfig(path, device="cpu", max_model_len=SEQ_LENGTH + 1))


def test_eos_is_endoftext_and_im_end(qwen1_checkpoint, make_llm):
    llm = make_llm(qwen1_checkpoint[0])
    tokenizer = llm.get_tokenizer()
    assert llm.llm_engine.eos_token_ids() == sorted(tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]))


def test_partial_rotary_is_refused_by_name(qwen1_checkpoint, tmp_path):
    path = copy_checkpoint(qwen1_checkpoint[0], tmp_path / "partial-rotary", {"rotary_pct": 0.5})
    with pytest.raises(ConfigError, match="rotary_pct=0.5"):
        resolve_config(EngineConfig(path, device="cpu"))


def test_eos_ids_come_from_qwen_tiktoken_without_generation_config_or_tokenizer(qwen1_checkpoint, tmp_path):
    """config.json names no EOS: <|endoftext|> and <|im_end|> follow the ranks of qwen.tiktoken."""
    path = shutil.copytree(qwen1_checkpoint[0], tmp_path / "no-generation-config")
    os.remove(path / "generation_config.json")
    with open(path / "qwen.tiktoken") as f:
        num_ranks = sum(1 for line in f if line.strip())
    config = resolve_config(EngineConfig(str(path), device="cpu", skip_tokenizer_init=True))
    assert config.model.eos_token_ids == [num_ranks, num_ranks + 2]


def test_trust_remote_code_changes_nothing_and_no_remote_code_runs(qwen1_checkpoint, reference, make_llm,
                                                                   caplog):
    """The checkpoint's modeling/tokenization/configuration_qwen.py raise when imported."""
    with caplog.at_level(logging.INFO, logger="asyncserve"):
        llm = make_llm(qwen1_checkpoint[0], trust_remote_code=True)
    assert "its remote code is not run" in caplog.text
    prompts = PROMPTS[:2]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == _expected(reference, llm.get_tokenizer(), prompts, 8)
