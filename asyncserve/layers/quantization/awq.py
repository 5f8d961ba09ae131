"""AWQ checkpoints (AutoAWQ's GEMM format): 4-bit weights with a scale and zero point per group of
input channels.

Stored: qweight int32 [in, out / 8] and qzeros int32 [groups, out / 8], both packing 8 consecutive
output columns per int32 in AWQ's interleaved order (the value of column j of a word sits at nibble
`AWQ_REVERSE_ORDER[j]`; packing writes column `AWQ_ORDER[i]` at nibble i), scales [groups, out].
At load they become the kernel's canonical layout (input rows packed, float zeros); MoE experts the
same, per expert, stacked per layer.
"""
from __future__ import annotations

import torch
from torch import nn

from asyncserve.errors import ConfigError
from asyncserve.kernels.int_packing import pack_int_rows
from asyncserve.layers.quantization.base import QuantizationConfig, WeightLoader, expert_param, set_split_dims
from asyncserve.layers.quantization.packed_int import (
    PackedIntExpertsMethod,
    PackedIntLinearMethod,
    check_shapes,
    int_param,
    is_skipped,
    output_dim_loader,
    scale_dtype,
)
from asyncserve.layers.quantization.unquantized import UnquantizedExpertsMethod, UnquantizedLinearMethod

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)          # nibble i holds column AWQ_ORDER[i]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j sits at nibble AWQ_REVERSE_ORDER[j]
GROUP_SIZES = (32, 64, 128)


def unpack_awq_columns(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C / 8] in AWQ's interleaved order -> [R, C] values in [0, 16)."""
    shifts = torch.tensor(AWQ_REVERSE_ORDER, dtype=torch.int32, device=packed.device) * 4
    values = (packed.unsqueeze(-1) >> shifts) & 0xF               # [R, C / 8, 8]: columns in order
    return values.reshape(packed.shape[0], -1)


class AWQLinearMethod(PackedIntLinearMethod):
    """Loads AWQ's interleaved tensors as stored; `process_weights_after_loading` turns them canonical."""

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: list[int],
                       weight_loader: WeightLoader) -> None:
        check_shapes(layer, layer.prefix, "AWQ", in_features, output_sizes, self.group_size, 8, 8)
        groups, out = in_features // self.group_size, sum(output_sizes)
        layer.group_size = self.group_size
        group_rows = {"input_dim": 0, "input_pack": self.group_size}  # rows of scales and zeros: groups
        layer.qweight = int_param(in_features, out // 8, loader=output_dim_loader(layer, 8), output_dim=1,
                                  output_pack=8, input_dim=0)
        layer.qzeros = int_param(groups, out // 8, loader=output_dim_loader(layer, 8, grouped=True),
                                 output_dim=1, output_pack=8, **group_rows)
        layer.scales = nn.Parameter(torch.zeros(groups, out, dtype=scale_dtype()), requires_grad=False)
        set_split_dims(layer.scales, output_dim=1, **group_rows)
        layer.scales.weight_loader = output_dim_loader(layer, grouped=True)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.to_canonical(layer, unpack_awq_columns(layer.qweight.data), unpack_awq_columns(layer.qzeros.data),
                          perm=None)


class AWQExpertsMethod(PackedIntExpertsMethod):
    """Every expert's AWQ tensors stacked per layer as stored (w13: gate then up along the outputs),
    turned into the kernel's canonical layout one expert at a time."""

    method = "AWQ"

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        self.check_expert_shapes(layer, hidden_size, intermediate_size, 8)
        group = self.group_size
        ints = lambda *shape: torch.zeros(num_experts, *shape, dtype=torch.int32)
        expert_param(layer, "w13_qweight", ints(hidden_size, 2 * intermediate_size // 8), 1, 8)
        expert_param(layer, "w13_qzeros", ints(hidden_size // group, 2 * intermediate_size // 8), 1, 8)
        expert_param(layer, "w13_scales", torch.zeros(num_experts, hidden_size // group, 2 * intermediate_size,
                                                      dtype=scale_dtype()), 1)
        expert_param(layer, "w2_qweight", ints(intermediate_size, hidden_size // 8), 0)
        expert_param(layer, "w2_qzeros", ints(intermediate_size // group, hidden_size // 8), 0, group)
        expert_param(layer, "w2_scales", torch.zeros(num_experts, intermediate_size // group, hidden_size,
                                                     dtype=scale_dtype()), 0, group)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        for name in ("w13", "w2"):
            qweight, qzeros = getattr(layer, f"{name}_qweight").data, getattr(layer, f"{name}_qzeros").data
            experts = range(qweight.shape[0])  # one at a time: the unpacked codes of a layer are large
            self.set_canonical(layer, name, torch.stack([pack_int_rows(unpack_awq_columns(qweight[e]), 4)
                                                         for e in experts]),
                               torch.stack([unpack_awq_columns(qzeros[e]) for e in experts]))


class AWQConfig(QuantizationConfig):
    """config.json's `quantization_config` (or AutoAWQ's quant_config.json) with quant_method 'awq'."""

    name = "awq"

    def __init__(self, bits: int = 4, group_size: int = 128, zero_point: bool = True, version: str = "gemm",
                 modules_to_not_convert: list[str] | None = None):
        if bits != 4:
            raise ConfigError(f"AWQ with bits={bits} is not supported (supported: [4]).")
        if group_size not in GROUP_SIZES:
            raise ConfigError(f"AWQ with group_size={group_size} is not supported (supported: "
                              f"{list(GROUP_SIZES)}).")
        if not zero_point:
            raise ConfigError("AWQ with zero_point=false is not supported (supported: zero_point=true).")
        if version != "gemm":
            raise ConfigError(f"AWQ version={version!r} is not supported (supported: 'gemm'); its tensors "
                              "are packed differently.")
        self.bits, self.group_size = bits, group_size
        self.modules_to_not_convert = modules_to_not_convert or []

    @classmethod
    def from_config(cls, config: dict) -> AWQConfig:
        bits = config.get("bits", config.get("w_bit"))
        if bits is None:
            raise ConfigError("quantization='awq' needs an AWQ checkpoint: config.json's quantization_config "
                              "says how its weights are packed.")
        return cls(bits=int(bits), group_size=int(config.get("group_size", config.get("q_group_size", 128))),
                   zero_point=bool(config.get("zero_point", True)),
                   version=str(config.get("version") or "gemm").lower(),
                   modules_to_not_convert=config.get("modules_to_not_convert"))

    def get_quant_method(self, layer: nn.Module, prefix: str):
        if prefix == "lm_head" or is_skipped(layer, prefix, self.modules_to_not_convert, "AWQ"):
            return UnquantizedLinearMethod()  # AWQ checkpoints keep the LM head in float
        return AWQLinearMethod(self.bits, self.group_size)

    def get_experts_method(self, layer: nn.Module, prefix: str):
        if is_skipped(layer, prefix, self.modules_to_not_convert, "AWQ"):
            return UnquantizedExpertsMethod()
        return AWQExpertsMethod(self.bits, self.group_size)
