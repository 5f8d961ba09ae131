"""The linear-method seam: a linear layer asks its quantization config for a method that creates its
weights and multiplies by them, so plain, GPTQ, AWQ, FP8 and LoRA-wrapped layers share one layer class."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar

import torch
from torch import nn

# weight_loader(param, loaded_weight[, shard_id]): copies one checkpoint tensor (this rank's part of it)
# into its place.
WeightLoader = Callable[..., None]


def set_split_dims(param: nn.Parameter, *, output_dim: int | None = None, input_dim: int | None = None,
                   output_pack: int = 1, input_pack: int = 1) -> nn.Parameter:
    """Says how the layer cuts a checkpoint tensor of `param` to this rank's part: which of its dims runs
    along the layer's outputs and inputs (None: not split along them), with `pack` outputs (inputs) per
    element (8 4-bit values per int32; a group of inputs per row of scales)."""
    param.output_dim, param.input_dim = output_dim, input_dim
    param.output_pack, param.input_pack = output_pack, input_pack
    return param


class LinearMethodBase(ABC):
    """How one linear layer stores its weight and computes x @ W^T (+ bias)."""

    # Whether a row-parallel layer may hold a slice of the inputs (False where the input groups are
    # scattered over the inputs, as GPTQ's act-order: the layer then gathers its input instead).
    splits_input: bool = True

    @abstractmethod
    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: list[int],
                       weight_loader: WeightLoader) -> None:
        """Registers the layer's weight parameters for this rank's `in_features` and `output_sizes`,
        each carrying `weight_loader` and its split dims (`set_split_dims`)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """[T, in] -> [T, out]: the layer's forward."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Repacks the loaded tensors for the kernel (once, after loading); nothing by default."""

    def tune_single_row(self, layer: nn.Module, timings: dict) -> str | None:
        """Picks the one-row (batch-1) kernel by timing on the GPU; `timings` is shared across layers
        so each shape is timed once. Returns a line for the start-up log, or None."""
        return None


class ExpertsMethodBase(ABC):
    """How a `FusedMoE` layer stores its experts: the checkpoint's per-expert tensors stacked per layer
    (`w13_<name>`, gate then up along the outputs; `w2_<name>`), each loaded by (shard, expert) through
    the layer's loader, then what `kernels.fused_moe` multiplies by."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        """Registers the stacked parameters for this rank's `intermediate_size` (`expert_param`)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Turns the loaded tensors into the kernel's layout (once, after loading); nothing by default."""

    @abstractmethod
    def experts(self, layer: nn.Module) -> tuple:
        """(w13, w2) for `fused_moe`: float stacks [E, 2I, H] and [E, H, I], or `QuantExperts`."""


def expert_param(layer: nn.Module, name: str, tensor: torch.Tensor, split_dim: int | None, split_pack: int = 1,
                 loader: WeightLoader | None = None, optional: bool = False) -> nn.Parameter:
    """Registers `name` ('w13_...' or 'w2_...', [E, ...]) on the MoE layer. `split_dim`: the dim of one
    expert's checkpoint tensor that runs along the intermediate size (gate / up outputs, down inputs),
    with `split_pack` channels per element, which the layer's loader cuts to this rank's part and where
    gate and up sit side by side (None: whole on every rank). `optional`: read if present, else unused."""
    param = nn.Parameter(tensor, requires_grad=False)
    param.expert_dim, param.expert_pack = split_dim, split_pack
    param.weight_loader = loader or layer.weight_loader
    shards = ("gate", "up") if name.startswith("w13_") else ("down",)
    param.shard_ids = [(shard, e) for shard in shards for e in range(tensor.shape[0])]
    param.checkpoint_optional = optional
    layer.register_parameter(name, param)
    return param


class QuantizationConfig(ABC):
    """A checkpoint's quantization scheme (config.json's `quantization_config` or `--quantization`)."""

    name: ClassVar[str | None]

    @classmethod
    def from_config(cls, config: dict) -> QuantizationConfig:
        """Built from the checkpoint's `quantization_config` dict ({} for `--quantization` alone)."""
        return cls()

    @abstractmethod
    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase:
        """The method of the linear layer named `prefix` (e.g. 'layers.0.self_attn.qkv_proj')."""

    def get_experts_method(self, layer: nn.Module, prefix: str) -> ExpertsMethodBase | None:
        """The method of the MoE layer named `prefix` ('layers.1.mlp.experts'); None: this scheme's experts
        are not supported (the layer refuses them by name)."""
        return None
