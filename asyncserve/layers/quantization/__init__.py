"""Linear methods: how each linear layer stores and multiplies its weight, chosen by the checkpoint's
quantization config."""
from asyncserve.layers.quantization.base import (ExpertsMethodBase, LinearMethodBase, QuantizationConfig, WeightLoader,
                                                 expert_param, set_split_dims)
from asyncserve.layers.quantization.registry import QUANTIZATION_METHODS, check_method_name, get_quantization_config
from asyncserve.layers.quantization.unquantized import (UnquantizedConfig, UnquantizedExpertsMethod,
                                                        UnquantizedLinearMethod)

__all__ = ["LinearMethodBase", "QuantizationConfig", "WeightLoader", "set_split_dims", "QUANTIZATION_METHODS",
           "get_quantization_config", "check_method_name", "UnquantizedConfig", "UnquantizedLinearMethod", "ExpertsMethodBase", "expert_param",
           "UnquantizedExpertsMethod"]
