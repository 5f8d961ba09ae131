"""Quantization configs: unquantized by default; a method that is not built, named or declared by the
checkpoint's config.json, is refused by name (never served as plain weights)."""
from __future__ import annotations

import pytest

from asyncserve import LLM
from asyncserve.errors import ConfigError
from asyncserve.layers.quantization import UnquantizedConfig, get_quantization_config
from tests.checkpoint_edits import copy_checkpoint


def test_no_method_and_no_checkpoint_config_is_unquantized():
    assert type(get_quantization_config()) is UnquantizedConfig


@pytest.mark.parametrize("method", ["bitsandbytes", "squeezellm", "exl2"])
def test_a_named_method_is_refused_by_name(method):
    with pytest.raises(ConfigError, match=f"quantization='{method}' is not supported yet"):
        get_quantization_config(method)


def test_a_quantized_checkpoint_is_refused_by_name():
    with pytest.raises(ConfigError, match="quantized with 'bitsandbytes'.*not support"):
        get_quantization_config(None, {"quant_method": "bitsandbytes", "bits": 4})


def test_a_quantization_config_without_its_method_is_refused():
    with pytest.raises(ConfigError, match="without 'quant_method'"):
        get_quantization_config(None, {"bits": 4})


def test_a_method_that_contradicts_the_checkpoint_is_refused():
    with pytest.raises(ConfigError, match="quantization='awq' does not match.*'gptq'"):
        get_quantization_config("awq", {"quant_method": "gptq"})


def test_the_engine_refuses_a_quantized_checkpoint(tiny_model_dir, tmp_path):
    path = copy_checkpoint(tiny_model_dir("qwen3"), tmp_path / "exl2",
                           {"quantization_config": {"quant_method": "exl2", "bits": 4}})
    with pytest.raises(ConfigError, match="quantized with 'exl2'"):
        LLM(path, device="cpu", num_gpu_blocks_override=64)


def test_the_names_config_accepts_are_the_methods_layers_serve():
    """config/quantization.py checks --quantization before torch loads; layers/ maps the same names."""
    from asyncserve.config.quantization import METHOD_NAMES
    from asyncserve.layers.quantization import QUANTIZATION_METHODS
    assert set(QUANTIZATION_METHODS) == {None, *METHOD_NAMES}
