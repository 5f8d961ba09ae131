"""Start-up says, in one line each, when a setting does less or other than a user may think, and checks
what it can from config.json before anything loads."""
from __future__ import annotations

import logging

import pytest

from asyncserve.config import EngineConfig
from asyncserve.errors import ConfigError
from asyncserve.engine.resolve_config import resolve_config


def _notes(caplog, **settings) -> list[str]:
    with caplog.at_level(logging.INFO, logger="asyncserve"):
        resolve_config(EngineConfig(device="cpu", **settings))
    return [record.getMessage() for record in caplog.records]


@pytest.fixture
def path(tiny_model_dir) -> str:
    return tiny_model_dir("qwen3")


def test_quantizing_an_unquantized_checkpoint_to_fp8_at_load_is_said(path, caplog):
    assert _notes(caplog, model=path, quantization="fp8") == [
        "quantizing the weights to FP8 at load (--quantization fp8 on an unquantized checkpoint): e4m3 with one "
        "scale per output row; outputs differ slightly from the checkpoint's own"]


def test_random_weights_are_said(path, caplog):
    assert _notes(caplog, model=path, load_format="dummy") == [
        "the weights are random (--load-format dummy): outputs mean nothing; for benchmarks"]


def test_gpu_memory_utilization_on_the_cpu_is_said_to_do_nothing(path, caplog):
    assert _notes(caplog, model=path, gpu_memory_utilization=0.5, cpu_kv_cache_space=0.25) == [
        "--gpu-memory-utilization 0.5 has no effect on the CPU: the KV cache takes --cpu-kv-cache-space (0.25 GiB)"]


def test_a_revision_of_a_local_folder_is_said_to_be_ignored(path, caplog):
    assert _notes(caplog, model=path, revision="v2") == [
        f"--revision v2 is ignored: {path} is a local folder, used as it is"]


def test_plain_settings_say_nothing(path, caplog):
    assert _notes(caplog, model=path) == []


@pytest.mark.parametrize("size,message", [
    (3, "num_attention_heads (4) is not divisible by tensor_parallel_size (3)"),
    (8, "num_attention_heads (4) is not divisible by tensor_parallel_size (8)"),
])
def test_tensor_parallel_shapes_are_checked_when_the_config_is_made(tiny_model_dir, size, message):
    with pytest.raises(ConfigError) as caught:
        EngineConfig(model=tiny_model_dir("llama"), tensor_parallel_size=size)
    assert str(caught.value) == f"The model cannot be split over tensor_parallel_size={size}: {message}."


def test_tensor_parallel_sizes_that_divide_pass_the_early_check(tiny_model_dir):
    assert EngineConfig(model=tiny_model_dir("llama"), tensor_parallel_size=2).tensor_parallel_size == 2
