"""Each rank holds only its shard: built as rank 1 of 2 (no collective runs while loading), every
sharded parameter equals its slice of the checkpoint tensor, packed quantized tensors included (cut at
whole int32 words and whole groups)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from asyncserve.layers.linear import Linear, MergedLinear
from asyncserve.layers.parallel_state import set_tensor_parallel
from asyncserve.layers.vocab_parallel import VocabParallelEmbedding
from asyncserve.models.llama import LlamaForCausalLM, Qwen2ForCausalLM
from asyncserve.models.loader import iterate_weights, load_weights
from asyncserve.testing.tiny_model import build_tiny_checkpoint


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
    assert type(attn.qkv_proj) is MergedLinear and attn.qkv_proj.output_parallel   # column-parallel
    assert type(attn.o_proj) is Linear and attn.o_proj.input_parallel                 # row-parallel
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
    assert isinstance(model.embed_tokens, VocabParallelEmbedding)
    assert type(model.lm_head) is Linear and model.lm_head.gather_output             # vocabulary-parallel
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


def _rank_1_of_2_quantized(path):
    """The Llama of a quantized checkpoint as rank 1 of 2, loaded but not yet repacked for the kernel."""
    from asyncserve.models.loader import quantization_config
    config = AutoConfig.from_pretrained(path)
    model = LlamaForCausalLM(config, quantization_config(config, path=path))
    load_weights(model, iterate_weights(path))
    return model, dict(iterate_weights(path))


def test_gptq_ranks_hold_whole_words_and_whole_groups(tiny_model_dir, tmp_path, rank_1_of_2):
    """4-bit, groups of 32: qweight packs 8 input rows per int32, qzeros 8 outputs per int32."""
    from tests.quantized_checkpoints import build_quantized
    path, _ = build_quantized(tiny_model_dir("llama"), tmp_path / "gptq", fmt="gptq", group_size=32)
    model, full = _rank_1_of_2_quantized(path)
    attn = model.layers[0].self_attn
    prefix = "model.layers.0.self_attn."
    # o_proj, row-parallel: inputs 32..63 of 64 = int32 rows 4..7, group 1 of 2.
    assert attn.o_proj.input_parallel
    assert torch.equal(attn.o_proj.qweight, full[prefix + "o_proj.qweight"][4:])
    assert torch.equal(attn.o_proj.qzeros, full[prefix + "o_proj.qzeros"][1:])
    assert torch.equal(attn.o_proj.scales, full[prefix + "o_proj.scales"][1:].float())
    assert torch.equal(attn.o_proj.g_idx, full[prefix + "o_proj.g_idx"][32:])
    # qkv, column-parallel by heads (16 wide): q outputs 32..63 of 64, k and v 16..31 of 32.
    q, k, v = (full[prefix + f"{name}.qweight"] for name in ("q_proj", "k_proj", "v_proj"))
    assert torch.equal(attn.qkv_proj.qweight, torch.cat([q[:, 32:], k[:, 16:], v[:, 16:]], dim=1))
    q, k, v = (full[prefix + f"{name}.qzeros"] for name in ("q_proj", "k_proj", "v_proj"))
    assert torch.equal(attn.qkv_proj.qzeros, torch.cat([q[:, 4:], k[:, 2:], v[:, 2:]], dim=1))


def test_awq_ranks_hold_whole_words_and_whole_groups(tiny_model_dir, tmp_path, rank_1_of_2):
    """AWQ packs 8 outputs per int32 (interleaved within the word): a rank takes whole words."""
    from tests.quantized_checkpoints import build_quantized
    path, _ = build_quantized(tiny_model_dir("llama"), tmp_path / "awq", fmt="awq", group_size=32)
    model, full = _rank_1_of_2_quantized(path)
    mlp = model.layers[1].mlp
    prefix = "model.layers.1.mlp."
    gate, up = full[prefix + "gate_proj.qweight"], full[prefix + "up_proj.qweight"]   # [64, 128 / 8]
    assert torch.equal(mlp.gate_up_proj.qweight, torch.cat([gate[:, 8:], up[:, 8:]], dim=1))
    # down_proj, row-parallel: inputs 64..127 of 128, groups 2..3 of 4.
    assert torch.equal(mlp.down_proj.qweight, full[prefix + "down_proj.qweight"][64:])
    assert torch.equal(mlp.down_proj.qzeros, full[prefix + "down_proj.qzeros"][2:])
    assert torch.equal(mlp.down_proj.scales, full[prefix + "down_proj.scales"][2:].float())


def test_gptq_act_order_row_layers_gather_their_input_instead(tiny_model_dir, tmp_path, rank_1_of_2):
    """Act-order scatters each group over every input: the rank keeps every input row (and every group)
    and splits the outputs; its forward gathers the input and the output."""
    from tests.quantized_checkpoints import build_quantized
    path, _ = build_quantized(tiny_model_dir("llama"), tmp_path / "gptq", fmt="gptq", group_size=32,
                              act_order=True)
    model, full = _rank_1_of_2_quantized(path)
    o_proj = model.layers[0].self_attn.o_proj
    prefix = "model.layers.0.self_attn.o_proj."
    assert o_proj.gather_input and not o_proj.input_parallel
    assert torch.equal(o_proj.qweight, full[prefix + "qweight"][:, 32:])
    assert torch.equal(o_proj.g_idx, full[prefix + "g_idx"])
    assert torch.equal(o_proj.scales, full[prefix + "scales"][:, 32:].float())
