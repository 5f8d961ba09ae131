"""FP8 (e4m3) weights with a float32 scale per output channel: from checkpoints saved with
`quant_method: "fp8"` (per-tensor scales, one per shard of a fused layer, or per-channel), or quantized
at load from a bf16/fp16 checkpoint with `--quantization fp8` (per-channel: amax / 448).

W[n, k] = weight_fp8[n, k] * weight_scale[n], multiplied by `kernels.fp8_linear`: a Triton GEMV for one
row, FP8 tensor cores (`torch._scaled_mm`, each activation row quantized with its own scale) for more,
and elsewhere the weight dequantized to the activations' dtype (exact against float weights).
MoE experts: the same per expert, stacked per layer (`w13_weight` [E, 2I, H] e4m3 with `w13_weight_scale`
[E, 2I], `w2_*` likewise), multiplied weight-only by the fused MoE's dequantizing GEMM.
"""
from __future__ import annotations

import torch
from torch import nn

from asyncserve.errors import ConfigError
from asyncserve.kernels import QuantExperts
from asyncserve.kernels.fp8_linear import fp8_linear
from asyncserve.layers.parallel_state import all_reduce_max
from asyncserve.layers.quantization.base import (ExpertsMethodBase, LinearMethodBase, QuantizationConfig,
                                                 WeightLoader, expert_param, set_split_dims)
from asyncserve.layers.quantization.packed_int import is_skipped
from asyncserve.layers.quantization.unquantized import UnquantizedExpertsMethod, UnquantizedLinearMethod

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def quantize_per_channel(weight: torch.Tensor, across_ranks: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (fp8 [N, K], float32 scale [N]) with |w| / scale within e4m3's range;
    `across_ranks`: K is this rank's slice of a row-parallel weight, scaled by the whole row's range."""
    weight = weight.float()
    amax = weight.abs().amax(dim=1)
    if across_ranks:
        amax = all_reduce_max(amax)
    scale = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (weight / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class FP8LinearMethod(LinearMethodBase):
    def __init__(self, serialized: bool, static_input_scale: bool):
        self.serialized = serialized  # False: a float checkpoint quantized at load
        self.static_input_scale = static_input_scale

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: list[int],
                       weight_loader: WeightLoader) -> None:
        dtype = FP8 if self.serialized else torch.get_default_dtype()
        weight = nn.Parameter(torch.empty(sum(output_sizes), in_features, dtype=dtype), requires_grad=False)
        set_split_dims(weight, output_dim=0, input_dim=1)
        weight.weight_loader = weight_loader  # the layer's: [out, in] rows, shards stacked
        layer.register_parameter("weight", weight)
        if not self.serialized:
            return
        scale = nn.Parameter(torch.zeros(sum(output_sizes), dtype=torch.float32), requires_grad=False)
        set_split_dims(scale, output_dim=0)  # a per-tensor scale (one number) is every rank's
        scale.weight_loader = _scale_loader(layer)
        layer.register_parameter("weight_scale", scale)
        if self.static_input_scale:  # read so the checkpoint loads; activations are scaled per row here
            input_scale = nn.Parameter(torch.zeros(1, dtype=torch.float32), requires_grad=False)
            input_scale.weight_loader = _max_loader
            layer.register_parameter("input_scale", input_scale)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if not self.serialized:
            across_ranks = getattr(layer, "input_parallel", False)  # a row-parallel slice: the whole row's range
            weight, scale = quantize_per_channel(layer.weight.data, across_ranks)
            layer.weight = nn.Parameter(weight, requires_grad=False)
            layer.weight_scale = nn.Parameter(scale, requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return fp8_linear(x, layer.weight, layer.weight_scale, bias)


def _scale_loader(layer: nn.Module):
    """A per-tensor scale (one number) fills its shard's rows; a per-channel one ([rows] or [rows, 1])
    is copied."""

    @torch.no_grad()
    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        start, size = layer.shard_offsets[shard_id] if shard_id is not None else (0, param.shape[0])
        if loaded.numel() not in (1, size):
            raise ValueError(f"weight_scale of shape {tuple(loaded.shape)}: expected one number (per "
                             f"tensor) or {size} (per output channel)")
        param.data[start:start + size] = loaded.reshape(-1).float()

    return load


@torch.no_grad()
def _max_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
    if loaded.numel() != 1:
        raise ValueError(f"input_scale of shape {tuple(loaded.shape)}: expected one number")
    param.data.fill_(max(float(param.data), float(loaded.reshape(()))))


class FP8ExpertsMethod(ExpertsMethodBase):
    """e4m3 experts with a float32 scale per output row (a per-tensor scale fills its shard's rows), or
    (`serialized` False) float experts quantized per row at load. Input scales are read and unused: the
    activations stay in the model's dtype (weight-only)."""

    def __init__(self, serialized: bool):
        self.serialized = serialized

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        dtype = FP8 if self.serialized else torch.get_default_dtype()
        expert_param(layer, "w13_weight", torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype), 0)
        expert_param(layer, "w2_weight", torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype), 1)
        if not self.serialized:
            return
        scale_loader = _expert_scale_loader(layer)
        scales = lambda rows: torch.zeros(num_experts, rows, dtype=torch.float32)
        expert_param(layer, "w13_weight_scale", scales(2 * intermediate_size), 0, loader=scale_loader)
        expert_param(layer, "w2_weight_scale", scales(hidden_size), None, loader=scale_loader)
        for name in ("w13_input_scale", "w2_input_scale"):
            expert_param(layer, name, torch.zeros(num_experts, 0), None, loader=_unused_input_scale, optional=True)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.serialized:
            return
        for name, across_ranks in (("w13", False), ("w2", layer.tp_size > 1)):  # down: a slice of each row
            weight = getattr(layer, f"{name}_weight").data
            num_experts, rows, _ = weight.shape
            quantized, scale = quantize_per_channel(weight.reshape(num_experts * rows, -1), across_ranks)
            delattr(layer, f"{name}_weight")
            layer.register_parameter(f"{name}_weight", nn.Parameter(quantized.view(weight.shape), requires_grad=False))
            layer.register_parameter(f"{name}_weight_scale",
                                     nn.Parameter(scale.view(num_experts, rows), requires_grad=False))

    def experts(self, layer: nn.Module) -> tuple:
        return (QuantExperts(layer.w13_weight, layer.w13_weight_scale, None),
                QuantExperts(layer.w2_weight, layer.w2_weight_scale, None))


def _expert_scale_loader(layer: nn.Module):
    """One expert's weight_scale: one number (per tensor) fills the shard's rows, a per-channel one ([rows]
    or [rows, 1]) is placed as they are (gate / up: this rank's slice)."""

    @torch.no_grad()
    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[str, int]) -> None:
        rows = layer.hidden_size if shard_id[0] == "down" else layer.whole_intermediate_size
        if loaded.numel() not in (1, rows):
            raise ValueError(f"weight_scale of shape {tuple(loaded.shape)}: expected one number (per tensor) or "
                             f"{rows} (per output channel)")
        layer.weight_loader(param, loaded.float().reshape(-1).expand(rows), shard_id)

    return load


def _unused_input_scale(param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[str, int]) -> None:
    if loaded.numel() != 1:
        raise ValueError(f"input_scale of shape {tuple(loaded.shape)}: expected one number")


class FP8Config(QuantizationConfig):
    """config.json's `quantization_config` with quant_method 'fp8', or `--quantization fp8` alone."""

    name = "fp8"

    def __init__(self, serialized: bool = False, activation_scheme: str = "dynamic",
                 ignored_layers: list[str] | None = None):
        if activation_scheme not in ("static", "dynamic"):
            raise ConfigError(f"FP8 activation_scheme={activation_scheme!r} is not supported (supported: "
                              "'static', 'dynamic').")
        self.serialized, self.activation_scheme = serialized, activation_scheme
        self.ignored_layers = ignored_layers or []

    @classmethod
    def from_config(cls, config: dict) -> FP8Config:
        if not config:
            return cls()  # --quantization fp8: quantize the float checkpoint's weights at load
        if config.get("weight_block_size"):
            raise ConfigError(f"FP8 with weight_block_size={config['weight_block_size']} (block-wise scales) "
                              "is not supported (supported: per-tensor and per-channel scales).")
        return cls(True, str(config.get("activation_scheme", "dynamic")), config.get("ignored_layers"))

    def get_quant_method(self, layer: nn.Module, prefix: str):
        if prefix == "lm_head" or is_skipped(layer, prefix, self.ignored_layers, "FP8"):
            return UnquantizedLinearMethod()  # the LM head stays in the model's dtype, as vLLM keeps it
        return FP8LinearMethod(self.serialized, self.activation_scheme == "static")

    def get_experts_method(self, layer: nn.Module, prefix: str):
        if is_skipped(layer, prefix, self.ignored_layers, "FP8"):
            return UnquantizedExpertsMethod()
        return FP8ExpertsMethod(self.serialized)
