"""Which quantization config serves a method name, and the check that a quantized checkpoint is never
served as if its packed tensors were plain weights."""
from __future__ import annotations

from asyncserve.errors import ConfigError
from asyncserve.layers.quantization.base import QuantizationConfig
from asyncserve.layers.quantization.unquantized import UnquantizedConfig

# method name (config.json's quant_method, or --quantization) -> config class; None: unquantized.
QUANTIZATION_METHODS: dict[str | None, type[QuantizationConfig]] = {None: UnquantizedConfig}


def _supported() -> str:
    names = sorted(name for name in QUANTIZATION_METHODS if name is not None)
    return ", ".join(names) if names else "none yet (unquantized bf16/fp16/fp32 weights only)"


def get_quantization_config(method: str | None = None,
                            checkpoint_config: dict | None = None) -> QuantizationConfig:
    """The config for `--quantization` (`method`) and the checkpoint's `quantization_config`."""
    if checkpoint_config is not None:
        quantized_with = checkpoint_config.get("quant_method")
        if quantized_with is None:
            raise ConfigError("config.json has a quantization_config without 'quant_method': asyncserve "
                              "cannot tell how the weights are packed; serve an unquantized checkpoint.")
        if method is not None and method != quantized_with:
            raise ConfigError(f"quantization={method!r} does not match the checkpoint, which is quantized "
                              f"with {quantized_with!r} (config.json quantization_config): drop the option.")
        if quantized_with not in QUANTIZATION_METHODS:
            raise ConfigError(f"The checkpoint is quantized with {quantized_with!r} (config.json "
                              f"quantization_config), which asyncserve does not support yet (supported: "
                              f"{_supported()}); serve an unquantized (bf16/fp16) checkpoint.")
        return QUANTIZATION_METHODS[quantized_with].from_config(checkpoint_config)
    if method not in QUANTIZATION_METHODS:
        raise ConfigError(f"quantization={method!r} is not supported yet (supported: {_supported()}); "
                          "serve an unquantized (bf16/fp16) checkpoint.")
    return QUANTIZATION_METHODS[method].from_config({})
