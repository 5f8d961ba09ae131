"""MXFP4 checkpoints (GPT-OSS: `quant_method: "mxfp4"`): the MoE experts are packed, every other layer is
plain. asyncserve has no MXFP4 matmul yet, so the family dequantizes its experts to the model's dtype at
load (kernels/mxfp4.py, through `CausalLM.checkpoint_tensors`) and every linear layer is unquantized."""
from __future__ import annotations

from torch import nn

from asyncserve.errors import ConfigError
from asyncserve.layers.quantization.base import LinearMethodBase, QuantizationConfig
from asyncserve.layers.quantization.unquantized import UnquantizedLinearMethod


class Mxfp4Config(QuantizationConfig):
    name = "mxfp4"

    @classmethod
    def from_config(cls, config: dict) -> Mxfp4Config:
        if not config:
            raise ConfigError("quantization='mxfp4' names how a checkpoint's experts are stored (GPT-OSS's), "
                              "not a method asyncserve applies at load: serve an MXFP4 checkpoint, or drop it.")
        return cls()

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase:
        return UnquantizedLinearMethod()
