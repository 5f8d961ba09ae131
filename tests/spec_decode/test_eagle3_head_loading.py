"""An EAGLE-3 head in --speculative-config: its public tensor names load where they belong, the target's
embedding is shared when the head has none, and a head that cannot work with the target fails at start-up
with a line that says why."""
from __future__ import annotations

import pytest
import torch

from asyncserve.cli import build_parser, engine_config, parse_args
from asyncserve.errors import ConfigError
from asyncserve.models.eagle3 import aux_layer_ids
from asyncserve.testing.eagle3_head import eagle3_head_tensors
from tests.spec_decode.eagle3_heads import DRAFT_VOCAB, eagle3_config, random_head


def test_cli_flag_reaches_the_engine_config():
    args = parse_args(build_parser(), ["--speculative-config",
                                       '{"method": "eagle3", "model": "/ckpt/head", "num_speculative_tokens": 3}'])
    config = engine_config(args).speculative_config
    assert (config.method, config.model, config.num_speculative_tokens) == ("eagle3", "/ckpt/head", 3)


def test_the_public_names_load_where_they_belong(make_llm, tiny_model_dir, tmp_path):
    path = random_head(tmp_path / "head", tiny_model_dir("llama"))
    llm = make_llm("llama", speculative_config=eagle3_config(path))
    runner = llm.llm_engine.executor.runner
    head = runner.drafter.model
    tensors = eagle3_head_tensors(64, 128, 4, 2, 16, head.vocab_size, DRAFT_VOCAB)  # the same seed
    qkv = torch.cat([tensors[f"midlayer.self_attn.{name}_proj.weight"] for name in "qkv"])
    assert torch.equal(head.layers[0].self_attn.qkv_proj.weight, qkv)
    assert torch.equal(head.fc.weight, tensors["fc.weight"])
    assert torch.equal(head.layers[0].hidden_norm.weight, tensors["midlayer.hidden_norm.weight"])
    assert torch.equal(head.lm_head.weight, tensors["lm_head.weight"])
    assert torch.equal(head.d2t, tensors["d2t"])
    assert head.embed_tokens is runner.model.embed_tokens  # absent from the checkpoint: shared
    assert runner.model.aux_hidden_layer_ids == (0, 1, 2)


def test_a_head_with_its_own_embedding_keeps_it(make_llm, tiny_model_dir, tmp_path):
    target = tiny_model_dir("llama")
    embedding = torch.randn(make_llm("llama").llm_engine.executor.runner.model.embed_tokens.weight.shape)
    path = random_head(tmp_path / "head", target, overrides={"embed_tokens.weight": embedding})
    head = make_llm("llama", speculative_config=eagle3_config(path)).llm_engine.executor.runner.drafter.model
    assert torch.equal(head.embed_tokens.weight, embedding)


def test_a_tensor_of_the_wrong_shape_is_named(make_llm, tiny_model_dir, tmp_path):
    path = random_head(tmp_path / "head", tiny_model_dir("llama"), overrides={"fc.weight": torch.zeros(64, 128)})
    with pytest.raises(ConfigError, match=r"EAGLE-3 head .*: tensor 'fc.weight' does not fit fc.weight: "
                                          r"checkpoint tensor has shape \(64, 128\)"):
        make_llm("llama", speculative_config=eagle3_config(path))


def test_a_smaller_draft_vocabulary_without_d2t_is_refused(make_llm, tiny_model_dir, tmp_path):
    path = random_head(tmp_path / "head", tiny_model_dir("llama"), overrides={"d2t": None})
    with pytest.raises(ConfigError, match="its draft vocabulary has 100 tokens .* no 'd2t'"):
        make_llm("llama", speculative_config=eagle3_config(path))


def test_a_whole_model_is_not_a_head(make_llm, tiny_model_dir):
    with pytest.raises(ConfigError, match="method 'eagle3' needs an EAGLE-3 head; .* has architectures "
                                          r"\['LlamaForCausalLM'\]"):
        make_llm("llama", speculative_config=eagle3_config(tiny_model_dir("llama")))


def test_a_target_family_without_the_hidden_states_hook_is_refused_by_name(make_llm, tiny_model_dir, tmp_path):
    path = random_head(tmp_path / "head", tiny_model_dir("gemma2"))
    with pytest.raises(ConfigError, match="Gemma2ForCausalLM does not expose them"):
        make_llm("gemma2", speculative_config=eagle3_config(path))


def test_aux_layers_outside_the_target_are_refused(make_llm, tiny_model_dir, tmp_path):
    path = random_head(tmp_path / "head", tiny_model_dir("llama"), aux_layer_ids=[0, 1, 5])
    with pytest.raises(ConfigError, match=r"reads the target's layers \[0, 1, 5\]; it needs three distinct "
                                          r"layer ids in 0 .. 2"):
        make_llm("llama", speculative_config=eagle3_config(path))


def test_the_default_aux_layers_are_vllms():
    class Config:
        pass

    assert aux_layer_ids(Config(), 32) == (2, 16, 29)
    nested = Config()
    nested.eagle_config = {"eagle_aux_hidden_state_layer_ids": [1, 23, 44]}
    assert aux_layer_ids(nested, 48) == (1, 23, 44)
