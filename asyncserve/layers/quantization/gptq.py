"""GPTQ checkpoints (AutoGPTQ / GPTQModel / transformers' format): 4- or 8-bit integer weights with a
scale and zero point per group of input channels, optionally in activation order (`desc_act`).

Stored: qweight int32 [in / pack, out] (`pack = 32 // bits` consecutive input rows per int32, lowest
bits first), qzeros int32 [groups, out / pack] (packed along the output; format v1 stores zero - 1),
scales [groups, out], g_idx int32 [in] (the group of each input channel). At load they become the
kernel's canonical layout; act-order rows are sorted by group once so the product never gathers.
MoE experts: the same tensors per expert, stacked per layer (act-order refused there).
"""
from __future__ import annotations

import torch
from torch import nn

from asyncserve.errors import ConfigError
from asyncserve.kernels.int_packing import unpack_int_rows
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

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128, -1)
CHECKPOINT_FORMATS = {"gptq": 1, "gptq_v2": 2}  # v1 stores zero - 1, v2 the zero itself


class GPTQLinearMethod(PackedIntLinearMethod):
    """Loads GPTQ's tensors as stored; `process_weights_after_loading` turns them canonical."""

    def __init__(self, config: GPTQConfig):
        super().__init__(config.bits, config.group_size)
        self.config = config
        # Act-order scatters each group over the inputs: a slice of them would need every group.
        self.splits_input = not config.desc_act

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: list[int],
                       weight_loader: WeightLoader) -> None:
        pack = 32 // self.bits
        group_size = in_features if self.group_size == -1 else self.group_size
        check_shapes(layer, layer.prefix, "GPTQ", in_features, output_sizes, group_size, pack, pack)
        groups, out = in_features // group_size, sum(output_sizes)
        layer.group_size = group_size
        # Rows of scales and zeros are groups of inputs; one group (group_size -1) is every rank's.
        group_rows = {"input_dim": None if self.group_size == -1 else 0, "input_pack": group_size}
        layer.qweight = int_param(in_features // pack, out, loader=output_dim_loader(layer), output_dim=1,
                                  input_dim=0, input_pack=pack)
        layer.qzeros = int_param(groups, out // pack, loader=output_dim_loader(layer, pack, grouped=True),
                                 output_dim=1, output_pack=pack, **group_rows)
        layer.scales = nn.Parameter(torch.zeros(groups, out, dtype=scale_dtype()), requires_grad=False)
        set_split_dims(layer.scales, output_dim=1, **group_rows)
        layer.scales.weight_loader = output_dim_loader(layer, grouped=True)
        layer.g_idx = int_param(in_features, loader=self._g_idx_loader(layer), input_dim=0)

    @staticmethod
    def _g_idx_loader(layer: nn.Module):
        loaded_once: list[bool] = []

        @torch.no_grad()
        def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
            if loaded.shape != param.shape:
                raise ValueError(f"shape {tuple(loaded.shape)}, expected {tuple(param.shape)}")
            if loaded_once and not torch.equal(param.data, loaded.to(param.dtype)):
                raise ValueError("the shards of this fused layer have different g_idx (act-order "
                                 "permutations); they must share one to be multiplied together")
            param.data.copy_(loaded)
            loaded_once.append(True)

        return load

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        k, n, bits = layer.in_features, layer.out_features, self.bits
        q = unpack_int_rows(layer.qweight.data, bits, k)                         # [K, N]
        zeros = unpack_int_rows(layer.qzeros.data.t().contiguous(), bits, n).t()  # [G, N]
        if self.config.checkpoint_format == "gptq":
            zeros = zeros + 1
        perm = None
        g_idx = layer.g_idx.data.long()
        if self.config.desc_act and not torch.equal(g_idx, g_idx.sort().values):
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[perm], torch.arange(k, device=g_idx.device) // layer.group_size):
                raise ConfigError(f"GPTQ layer {layer.prefix!r}: g_idx does not put {layer.group_size} "
                                  "input channels in each group; the checkpoint is inconsistent with its "
                                  "group_size.")
        self.to_canonical(layer, q, zeros, perm)


class GPTQExpertsMethod(PackedIntExpertsMethod):
    """Every expert's GPTQ tensors stacked per layer as stored (w13: gate then up along the outputs);
    qweight already has the kernel's layout, the zeros are unpacked once. g_idx is read to check that
    the groups run in order (act-order experts are refused at start)."""

    method = "GPTQ"

    def __init__(self, config: GPTQConfig):
        super().__init__(config.bits, config.group_size)
        self.config = config

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        pack = 32 // self.bits
        self.check_expert_shapes(layer, hidden_size, intermediate_size, pack)
        group_13, group_2 = self.group_sizes(hidden_size, intermediate_size)
        groups_2_dim = None if self.group_size == -1 else 0  # one group over I: every rank's whole
        ints = lambda *shape: torch.zeros(num_experts, *shape, dtype=torch.int32)
        floats = lambda *shape: torch.zeros(num_experts, *shape, dtype=scale_dtype())
        expert_param(layer, "w13_qweight", ints(hidden_size // pack, 2 * intermediate_size), 1)
        expert_param(layer, "w13_qzeros", ints(hidden_size // group_13, 2 * intermediate_size // pack), 1, pack)
        expert_param(layer, "w13_scales", floats(hidden_size // group_13, 2 * intermediate_size), 1)
        expert_param(layer, "w2_qweight", ints(intermediate_size // pack, hidden_size), 0, pack)
        expert_param(layer, "w2_qzeros", ints(intermediate_size // group_2, hidden_size // pack), groups_2_dim,
                     group_2)
        expert_param(layer, "w2_scales", floats(intermediate_size // group_2, hidden_size), groups_2_dim, group_2)
        for name in ("w13_g_idx", "w2_g_idx"):
            expert_param(layer, name, ints(0), None, loader=self._g_idx_check, optional=True)

    def _g_idx_check(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[str, int]) -> None:
        inputs = loaded.numel()
        group_size = inputs if self.group_size == -1 else self.group_size
        in_order = torch.arange(inputs, device=loaded.device) // group_size
        if loaded.dim() != 1 or not torch.equal(loaded.long(), in_order):
            raise ValueError(f"g_idx puts expert {shard_id[1]}'s {shard_id[0]} inputs out of group order "
                             "(act-order); GPTQ MoE experts are served with desc_act=false only")

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        for name in ("w13", "w2"):
            qzeros = getattr(layer, f"{name}_qzeros").data                       # [E, G, N / pack]
            n = qzeros.shape[2] * 32 // self.bits
            zeros = torch.stack([unpack_int_rows(qzeros[e].t().contiguous(), self.bits, n).t()
                                 for e in range(qzeros.shape[0])])              # [E, G, N]
            if self.config.checkpoint_format == "gptq":
                zeros = zeros + 1
            self.set_canonical(layer, name, getattr(layer, f"{name}_qweight").data, zeros)


class GPTQConfig(QuantizationConfig):
    """config.json's `quantization_config` (or quantize_config.json) with quant_method 'gptq'."""

    name = "gptq"

    def __init__(self, bits: int = 4, group_size: int = 128, desc_act: bool = False, sym: bool = True,
                 checkpoint_format: str = "gptq", modules_to_not_convert: list[str] | None = None):
        if bits not in BITS:
            raise ConfigError(f"GPTQ with bits={bits} is not supported (supported: {list(BITS)}).")
        if group_size not in GROUP_SIZES:
            raise ConfigError(f"GPTQ with group_size={group_size} is not supported (supported: "
                              f"{list(GROUP_SIZES)}).")
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ConfigError(f"GPTQ checkpoint_format={checkpoint_format!r} is not supported (supported: "
                              f"{sorted(CHECKPOINT_FORMATS)}).")
        self.bits, self.group_size, self.desc_act, self.sym = bits, group_size, desc_act, sym
        self.checkpoint_format = checkpoint_format
        self.modules_to_not_convert = modules_to_not_convert or []

    @classmethod
    def from_config(cls, config: dict) -> GPTQConfig:
        if "bits" not in config:
            raise ConfigError("quantization='gptq' needs a GPTQ checkpoint: config.json's "
                              "quantization_config (or quantize_config.json) says how its weights are packed.")
        return cls(bits=int(config["bits"]), group_size=int(config.get("group_size", 128)),
                   desc_act=bool(config.get("desc_act", False)), sym=bool(config.get("sym", True)),
                   checkpoint_format=str(config.get("checkpoint_format") or "gptq").lower(),
                   modules_to_not_convert=config.get("modules_to_not_convert"))

    def get_quant_method(self, layer: nn.Module, prefix: str):
        if prefix == "lm_head" or is_skipped(layer, prefix, self.modules_to_not_convert, "GPTQ"):
            return UnquantizedLinearMethod()  # GPTQ checkpoints keep the LM head in float
        return GPTQLinearMethod(self)

    def get_experts_method(self, layer: nn.Module, prefix: str):
        if is_skipped(layer, prefix, self.modules_to_not_convert, "GPTQ"):
            return UnquantizedExpertsMethod()
        if self.desc_act:
            raise ConfigError(f"GPTQ with desc_act=true (act-order) is not supported for MoE experts ({prefix}): "
                              "each expert would need its own input permutation inside the grouped GEMM; "
                              "serve a desc_act=false checkpoint of this model.")
        return GPTQExpertsMethod(self)
