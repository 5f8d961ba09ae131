"""A draft model in --speculative-config: vLLM's spellings, and start-up checks that name both models when a
pair cannot work."""
from __future__ import annotations

import pytest

from asyncserve.cli import build_parser, engine_config, parse_args
from asyncserve.config.speculative import parse_speculative_config
from asyncserve.errors import ConfigError
from asyncserve.testing.tiny_model import build_tiny_checkpoint


def test_current_and_older_spellings():
    current = parse_speculative_config({"method": "draft_model", "model": "org/small", "num_speculative_tokens": 3,
                                        "draft_tensor_parallel_size": 1})
    older = parse_speculative_config('{"model": "org/small", "num_speculative_tokens": 3}')
    oldest = parse_speculative_config({"speculative_model": "org/small", "num_speculative_tokens": 3})
    assert current == older == oldest
    assert (current.method, current.model, current.num_speculative_tokens) == ("draft_model", "org/small", 3)


def test_cli_flag_reaches_the_engine_config():
    args = parse_args(build_parser(), ["--speculative-config",
                                       '{"method": "draft_model", "model": "/ckpt/small", "num_speculative_tokens": 5}'])
    config = engine_config(args).speculative_config
    assert (config.method, config.model, config.num_speculative_tokens) == ("draft_model", "/ckpt/small", 5)


def test_a_draft_with_another_vocabulary_is_refused_naming_both(make_llm, tiny_model_dir, tmp_path):
    draft = build_tiny_checkpoint(tmp_path / "wide", "qwen3", vocab_size=1000)
    target = tiny_model_dir("qwen3")
    with pytest.raises(ConfigError) as caught:
        make_llm("qwen3", speculative_config={"model": draft, "num_speculative_tokens": 2})
    message = str(caught.value)
    assert f"the draft model {draft!r} has a vocabulary of 1000 tokens" in message
    assert f"the target {target!r} one of " in message and "share the target's tokenizer" in message


def test_a_draft_with_fewer_positions_than_max_model_len_is_refused(make_llm, tmp_path):
    draft = build_tiny_checkpoint(tmp_path / "short", "qwen3", max_position_embeddings=64)
    with pytest.raises(ConfigError, match="supports 64 positions, fewer than max_model_len=128: lower "
                                          "max_model_len to 64"):
        make_llm("qwen3", max_model_len=128, speculative_config={"model": draft, "num_speculative_tokens": 2})


def test_a_draft_path_that_does_not_exist_fails_in_one_line(make_llm):
    with pytest.raises(ConfigError, match="does not exist"):
        make_llm("qwen3", speculative_config={"model": "/no/such/draft", "num_speculative_tokens": 2})


def test_the_draft_shares_the_targets_block_budget(make_llm, tiny_model_dir, tmp_path):
    """Its pool has as many blocks as the target's; a block id's bytes count both (the CPU's KV space is
    divided by the sum)."""
    draft = build_tiny_checkpoint(tmp_path / "one-layer", "qwen3", num_hidden_layers=1)
    plain = make_llm("qwen3", num_gpu_blocks_override=None, cpu_kv_cache_space=0.01)
    llm = make_llm("qwen3", num_gpu_blocks_override=None, cpu_kv_cache_space=0.01,
                   speculative_config={"model": draft, "num_speculative_tokens": 2})
    runner = llm.llm_engine.executor.runner
    target_bytes = plain.llm_engine.executor.bytes_per_block()
    assert llm.llm_engine.executor.bytes_per_block() == target_bytes * 3 // 2  # 2 layers + 1 layer
    assert runner.drafter.kv_pool.num_blocks == runner.kv_pool.num_blocks
    assert abs(runner.kv_pool.num_blocks - plain.llm_engine.executor.runner.kv_pool.num_blocks * 2 / 3) <= 1
