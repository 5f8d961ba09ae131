"""What GPTQ and AWQ share once loaded: integer weights in the kernel's canonical layout (K-rows packed
into int32, float zeros and scales per group) multiplied by `quant_gemm` (linear layers) or the fused
MoE (experts, per expert); and the checkpoint side's loaders that place a fused layer's shards along the
output dimension of packed tensors."""
from __future__ import annotations

import os
import re

import torch
from torch import nn

from asyncserve.errors import ConfigError
from asyncserve.kernels import HAS_TRITON, QuantExperts
from asyncserve.kernels.int_packing import pack_int_rows
from asyncserve.kernels.quant_gemm import quant_gemm, reserve_dequant_scratch
from asyncserve.kernels.quant_gemv_mma import MmaGemvConfig
from asyncserve.kernels.split_k import reserve_split_k_workspace
from asyncserve.layers.quantization.base import ExpertsMethodBase, LinearMethodBase, set_split_dims
from asyncserve.layers.quantization.packed_int_timing import fastest_quant_gemv_config, fastest_row_plan

# Start-up timing of each packed weight shape's products (packed_int_timing.py): the one-row GEMV's tiles, and
# per row bucket up to SPLIT_K_MAX_ROWS a K-split GEMM, the table's GEMM or dequantization + cuBLAS. On by
# default since an H100 run (its GPU tests passed; the 8B's projections at 16 and 64 rows 25% faster);
# ASYNCSERVE_QUANT_TUNE=0 keeps the tables' choices.
TUNE_PACKED_INT = os.environ.get("ASYNCSERVE_QUANT_TUNE", "1") != "0"


def scale_dtype() -> torch.dtype:
    """fp16 scales (as checkpoints store them) unless the model runs in fp32, which holds them exactly."""
    return torch.float32 if torch.get_default_dtype() == torch.float32 else torch.float16


def shard_names(layer: nn.Module, prefix: str) -> list[str]:
    """The checkpoint modules behind a layer: 'layers.0.self_attn.qkv_proj' -> [..q_proj, ..k_proj, ..v_proj]
    (the layer's own name where the checkpoint stores it as one tensor)."""
    shards = getattr(layer, "checkpoint_shards", None)
    if not shards:
        return [prefix]
    parent = prefix.rpartition(".")[0]
    return [f"{parent}.{name}" if parent else name for name in shards]


def _matches(module: str, name: str) -> bool:
    """A config's module entry against our name ('layers.0.mlp.down_proj'): a substring (AWQ's 'visual',
    'model.layers.0.mlp.down_proj'), or with 're:' a regex (compressed-tensors' 're:.*lm_head')."""
    if module.startswith("re:"):
        return any(re.match(module[3:], candidate) for candidate in (name, f"model.{name}"))
    return module.removeprefix("model.") in name


def is_skipped(layer: nn.Module, prefix: str, modules_to_not_convert: list[str], method: str) -> bool:
    """True if the checkpoint left this layer unquantized; a fused layer must be all one or the other."""
    skipped = [any(_matches(module, name) for module in modules_to_not_convert)
               for name in shard_names(layer, prefix)]
    if any(skipped) and not all(skipped):
        raise ConfigError(f"{method}: the shards of the fused layer {prefix!r} disagree on quantization "
                          f"(modules_to_not_convert={modules_to_not_convert} leaves only some of "
                          f"{shard_names(layer, prefix)} unquantized); asyncserve fuses them into one matmul.")
    return all(skipped)


def output_dim_loader(layer: nn.Module, pack: int = 1, grouped: bool = False):
    """weight_loader for a tensor whose dim 1 is the output (in units of `pack` outputs per element):
    a whole tensor, or one shard of a fused layer placed at its output offset. `grouped`: its rows are
    the groups (scales, zeros), so a row mismatch is a group-size disagreement."""

    @torch.no_grad()
    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        if shard_id is None:
            target = param.data
        else:
            start, size = layer.shard_offsets[shard_id]
            target = param.data[:, start // pack:(start + size) // pack]
        if loaded.shape != target.shape:
            raise ValueError(f"shape {tuple(loaded.shape)}, expected {tuple(target.shape)}"
                             + (f" (rows are groups of {layer.group_size} inputs: all shards of a fused "
                                "layer and the config must agree on the group size)"
                                if grouped and loaded.shape[0] != target.shape[0] else ""))
        target.copy_(loaded)

    return load


def int_param(*shape: int, loader, **split_dims) -> nn.Parameter:
    param = set_split_dims(nn.Parameter(torch.zeros(*shape, dtype=torch.int32), requires_grad=False), **split_dims)
    param.weight_loader = loader
    return param


def check_shapes(layer: nn.Module, prefix: str, method: str, in_features: int, output_sizes: list[int],
                 group_size: int, in_pack: int, out_pack: int) -> None:
    """Fails at start, naming the layer, when its sizes (this rank's part of them) cannot be packed or
    grouped."""
    ranks = getattr(layer, "tp_size", 1)
    part = f" on each of tensor_parallel_size={ranks} ranks" if ranks > 1 else ""
    if in_features % group_size or in_features % in_pack:
        raise ConfigError(f"{method}: layer {prefix!r} has {in_features} inputs{part}, not a multiple of the "
                          f"group size {group_size} (and of {in_pack} values per int32).")
    bad = [size for size in output_sizes if size % out_pack]
    if bad:
        raise ConfigError(f"{method}: layer {prefix!r} has output sizes {output_sizes}{part}, not multiples of "
                          f"{out_pack} values per int32.")


class PackedIntLinearMethod(LinearMethodBase):
    """After `to_canonical`: qweight int32 [K*bits/32, N], zeros and scales [G, N], and an optional input
    permutation (act-order) applied to x's columns so the product itself has no gather."""

    def __init__(self, bits: int, group_size: int):
        self.bits = bits
        self.group_size = group_size  # -1 resolved per layer at create_weights
        self.perm: torch.Tensor | None = None
        self.dtype = torch.get_default_dtype()  # the model's (activations') dtype, for scales and zeros
        self.gemv_config: tuple | None = None  # the one-row GEMV's tiles, when start-up timing chose them
        self.row_plan: tuple | None = None  # what a few rows take (packed_int_timing.fastest_row_plan)

    def to_canonical(self, layer: nn.Module, q: torch.Tensor, zeros: torch.Tensor,
                     perm: torch.Tensor | None) -> None:
        """q [K, N] ints, zeros [G, N] ints: replaces the checkpoint's tensors by the kernel's."""
        scales = layer.scales.data.to(self.dtype)  # the kernel takes them in the activations' dtype
        for name in ("qweight", "qzeros", "g_idx", "scales"):
            if hasattr(layer, name):
                delattr(layer, name)
        if perm is not None:
            q = q[perm]
            self.perm = perm
        layer.qweight = nn.Parameter(pack_int_rows(q, self.bits), requires_grad=False)
        layer.scales = nn.Parameter(scales, requires_grad=False)
        layer.zeros = nn.Parameter(zeros.to(scales.dtype), requires_grad=False)
        if q.is_cuda:  # many-row products dequantize into it, few rows may split K into it (see quant_gemm)
            reserve_dequant_scratch(q.numel(), scales.dtype, q.device)
            reserve_split_k_workspace(q.shape[1], q.device)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.perm is not None:
            x = x[:, self.perm]
        out = quant_gemm(x, layer.qweight, layer.scales, layer.zeros, layer.group_size, self.bits, self.gemv_config,
                         self.row_plan)
        return out if bias is None else out + bias

    def tune_single_row(self, layer: nn.Module, timings: dict) -> str | None:
        """Times this shape's one-row GEMV and its few-row products (once per shape; see TUNE_PACKED_INT)."""
        qweight = layer.qweight
        if not TUNE_PACKED_INT or qweight.device.type != "cuda" or not HAS_TRITON:
            return None
        key = ("packed int", tuple(qweight.shape), self.bits, layer.group_size, layer.scales.dtype)
        first = key not in timings
        if first:
            args = (qweight, layer.scales, layer.zeros, layer.group_size, self.bits)
            timings[key] = fastest_quant_gemv_config(*args), fastest_row_plan(*args)
        (self.gemv_config, table_ms, best_ms), (self.row_plan, report) = timings[key]
        if not first:
            return None
        k, n = qweight.shape[0] * 32 // self.bits, qweight.shape[1]
        rows = ", ".join(f"{bucket} rows {name} {ms * 1e3:.1f} us (untimed {baseline * 1e3:.1f})"
                         for bucket, name, ms, baseline in report)
        one_row = (f"tensor-core {tuple(self.gemv_config)}" if isinstance(self.gemv_config, MmaGemvConfig)
                   else f"GEMV {self.gemv_config}")
        return (f"int{self.bits} {k}x{n}: 1 row {one_row} {best_ms * 1e3:.1f} us "
                f"(table {table_ms * 1e3:.1f}); {rows}")


class PackedIntExpertsMethod(ExpertsMethodBase):
    """GPTQ's and AWQ's experts once loaded: `QuantExperts` in the kernel's canonical layout per expert
    (`w13_qweight` / `w2_qweight` int32 [E, K * bits // 32, N], `*_scales` and `*_zeros` [E, G, N] in
    the activations' dtype), dequantized tile by tile inside the fused MoE GEMMs."""

    method = ""  # the format's name in messages

    def __init__(self, bits: int, group_size: int):
        self.bits, self.group_size = bits, group_size  # group_size -1: one group over all inputs
        self.dtype = torch.get_default_dtype()

    def group_sizes(self, hidden_size: int, intermediate_size: int) -> tuple[int, int]:
        """The inputs per group of gate|up (over H) and of down (over this rank's I)."""
        if self.group_size == -1:
            return hidden_size, intermediate_size
        return self.group_size, self.group_size

    def check_expert_shapes(self, layer: nn.Module, hidden_size: int, intermediate_size: int, pack: int) -> None:
        """Fails at start, naming the layer, when H or this rank's I cannot be packed or grouped."""
        ranks = getattr(layer, "tp_size", 1)
        part = f" on each of tensor_parallel_size={ranks} ranks" if ranks > 1 else ""
        group_13, group_2 = self.group_sizes(hidden_size, intermediate_size)
        if hidden_size % group_13 or hidden_size % pack:
            raise ConfigError(f"{self.method}: MoE layer {layer.prefix!r} has hidden size {hidden_size}, not a "
                              f"multiple of the group size {group_13} (and of {pack} values per int32).")
        if intermediate_size % group_2 or intermediate_size % pack:
            raise ConfigError(f"{self.method}: MoE layer {layer.prefix!r} has expert intermediate size "
                              f"{intermediate_size}{part}, not a multiple of the group size {group_2} (and of "
                              f"{pack} values per int32).")

    def set_canonical(self, layer: nn.Module, name: str, qweight: torch.Tensor, zeros: torch.Tensor) -> None:
        """Replaces `<name>_qweight` / `_qzeros` / `_scales` by the kernel's tensors (zeros as floats)."""
        scales = getattr(layer, f"{name}_scales").data.to(self.dtype)
        for tensor in ("qweight", "qzeros", "scales"):
            delattr(layer, f"{name}_{tensor}")
        for tensor, value in (("qweight", qweight), ("scales", scales), ("zeros", zeros.to(self.dtype))):
            layer.register_parameter(f"{name}_{tensor}", nn.Parameter(value, requires_grad=False))

    def experts(self, layer: nn.Module) -> tuple:
        hidden_size, intermediate_size = layer.hidden_size, layer.intermediate_size
        group_13, group_2 = self.group_sizes(hidden_size, intermediate_size)
        return (QuantExperts(layer.w13_qweight, layer.w13_scales, layer.w13_zeros, group_13, self.bits),
                QuantExperts(layer.w2_qweight, layer.w2_scales, layer.w2_zeros, group_2, self.bits))
