"""Which quantization config serves a method name, and the check that a quantized checkpoint is never
served as if its packed tensors were plain weights."""
from __future__ import annotations

from asyncserve.config.quantization import canonical_method, check_method_name, supported_methods
from asyncserve.errors import ConfigError
from asyncserve.layers.quantization.awq import AWQConfig
from asyncserve.layers.quantization.base import QuantizationConfig
from asyncserve.layers.quantization.compressed_tensors import CompressedTensorsConfig
from asyncserve.layers.quantization.fp8 import FP8Config
from asyncserve.layers.quantization.gptq import GPTQConfig
from asyncserve.layers.quantization.mxfp4 import Mxfp4Config
from asyncserve.layers.quantization.unquantized import UnquantizedConfig

# method name (config.json's quant_method, or --quantization) -> config class; None: unquantized.
QUANTIZATION_METHODS: dict[str | None, type[QuantizationConfig]] = {
    None: UnquantizedConfig, "gptq": GPTQConfig, "awq": AWQConfig, "fp8": FP8Config,
    "compressed-tensors": CompressedTensorsConfig, "mxfp4": Mxfp4Config}


def get_quantization_config(method: str | None = None,
                            checkpoint_config: dict | None = None) -> QuantizationConfig:
    """The config for `--quantization` (`method`) and the checkpoint's `quantization_config`."""
    if checkpoint_config is not None:
        quantized_with = checkpoint_config.get("quant_method")
        if quantized_with is None:
            raise ConfigError("config.json has a quantization_config without 'quant_method': asyncserve "
                              "cannot tell how the weights are packed; serve an unquantized checkpoint.")
        if method is not None and canonical_method(method) != canonical_method(quantized_with):
            raise ConfigError(f"quantization={method!r} does not match the checkpoint, which is quantized "
                              f"with {quantized_with!r} (config.json quantization_config): drop the option.")
        if canonical_method(quantized_with) not in QUANTIZATION_METHODS:
            raise ConfigError(f"The checkpoint is quantized with {quantized_with!r} (config.json "
                              f"quantization_config), which asyncserve does not support yet (supported: "
                              f"{supported_methods()}); serve an unquantized (bf16/fp16) checkpoint.")
        return QUANTIZATION_METHODS[canonical_method(quantized_with)].from_config(checkpoint_config)
    check_method_name(method)
    return QUANTIZATION_METHODS[canonical_method(method)].from_config({})
