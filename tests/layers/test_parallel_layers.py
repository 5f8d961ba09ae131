"""Each rank holds only its shard: built as rank 1 of 2 (no collective runs while loading), every
sharded parameter equals its slice of the checkpoint tensor."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from asyncserve.layers.parallel_linear import ColumnParallelMergedLinear, RowParallelLinear
from asyncserve.layers.parallel_state import set_tensor_parallel
from asyncserve.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from asyncserve.models.llama import LlamaForCausalLM, Qwen2ForCausalLM
from asyncserve.models.loader import iterate_weights, load_weights
from asyncserve.checkpoints.tiny_model import build_tiny_checkpoint


@pytest.fixture
def rank_1_of_2():
    set_tensor_parallel(1, 2)
    yield
    set_tensor_parallel(0, 1)


def test_rank_loads_its_slices_with_kv_heads_replicated(tmp_path, rank_1_of_2):
    path = build_tiny_checkpoint(tmp_path / "kv1", "llama3", num_key_value_heads=1)
    config = AutoConfig.from_pretrained(path)
    model = LlamaForCausalLM(config)
    load_weights(model, iterate_weights(path))
    full = dict(iterate_weights(path))
    d, per_rank_q = config.head_dim, config.num_attention_heads // 2 * config.head_dim
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert isinstance(attn.qkv_proj, ColumnParallelMergedLinear) and isinstance(attn.o_proj, RowParallelLinear)
    assert (attn.num_heads, attn.num_kv_heads) == (2, 1) and (attn.attn.num_heads, attn.attn.num_kv_heads) == (2, 1)
    prefix = "model.layers.0."
    expected_qkv = torch.cat([full[prefix + "self_attn.q_proj.weight"][per_rank_q:],   # heads 2, 3
                              full[prefix + "self_attn.k_proj.weight"][:d],            # the one KV head
                              full[prefix + "self_attn.v_proj.weight"][:d]])
    assert torch.equal(attn.qkv_proj.weight, expected_qkv)
    assert torch.equal(attn.o_proj.weight, full[prefix + "self_attn.o_proj.weight"][:, per_rank_q:])
    half = config.intermediate_size // 2
    assert torch.equal(mlp.gate_up_proj.weight, torch.cat([full[prefix + "mlp.gate_proj.weight"][half:],
                                                           full[prefix + "mlp.up_proj.weight"][half:]]))
    assert torch.equal(mlp.down_proj.weight, full[prefix + "mlp.down_proj.weight"][:, half:])
    vocab = config.vocab_size
    rows = (vocab + 1) // 2
    assert isinstance(model.embed_tokens, VocabParallelEmbedding) and isinstance(model.lm_head, ParallelLMHead)
    assert torch.equal(model.embed_tokens.weight[:vocab - rows], full["model.embed_tokens.weight"][rows:])
    assert torch.equal(model.lm_head.weight[:vocab - rows], full["lm_head.weight"][rows:])
    assert not model.embed_tokens.weight[vocab - rows:].any()  # padding rows of an odd vocabulary


def test_more_kv_heads_split_by_rank(tmp_path, rank_1_of_2):
    path = build_tiny_checkpoint(tmp_path / "kv2", "qwen2")  # 2 KV heads, qkv bias, tied embeddings
    config = AutoConfig.from_pretrained(path)
    model = Qwen2ForCausalLM(config)
    load_weights(model, iterate_weights(path))
    full = dict(iterate_weights(path))
    d = config.head_dim
    attn = model.layers[1].self_attn
    assert attn.num_kv_heads == 1
    prefix = "model.layers.1.self_attn."
    assert torch.equal(attn.qkv_proj.bias, torch.cat([full[prefix + "q_proj.bias"][2 * d:],
                                                      full[prefix + "k_proj.bias"][d:],
                                                      full[prefix + "v_proj.bias"][d:]]))
    assert model.lm_head.weight is model.embed_tokens.weight
