"""Plain weights in the model's dtype, with a one-row kernel chosen per shape at start-up."""
from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn import functional as F

from asyncserve.layers.cpu_layout import (MIN_TIMED_BYTES, OneRowTimer, column_major, is_column_major,
                                          prefers_column_major)
from asyncserve.layers.quantization.base import (ExpertsMethodBase, LinearMethodBase, QuantizationConfig,
                                                 WeightLoader, expert_param, set_split_dims)
from asyncserve.layers.single_row import (SingleRowKernel, fastest_gated_row_kernel, fastest_normed_row_kernel,
                                          fastest_single_row_kernel, linear, linear_gated, linear_normed)


# Batch-1 fusions into the one-row GEMV, each kept only where timed faster at start-up: a gated MLP's
# activation into its down projection, a layer's residual add and RMSNorm into the qkv and gate|up
# projections after them. On by default since an H100 run (tests/gpu/test_one_row_fusions_cuda.py passed; see
# runner/decode_graphs.py for the figures); ASYNCSERVE_FUSED_GATED_ROW=0 / ASYNCSERVE_FUSED_NORM_ROW=0 turn
# them off.
FUSE_GATED_ROW = os.environ.get("ASYNCSERVE_FUSED_GATED_ROW", "1") != "0"
FUSE_NORM_ROW = os.environ.get("ASYNCSERVE_FUSED_NORM_ROW", "1") != "0"


class UnquantizedLinearMethod(LinearMethodBase):
    """One [out, in] weight; batch-1 products may take the kernel `tune_single_row` chose."""

    def __init__(self):
        self.single_row: SingleRowKernel = None  # None: cuBLAS GEMM, as for every other batch
        # A gated MLP's down projection: the GEMV config that applies the activation to its one row, and the
        # activation's name (None: the activation runs as its own kernel). `tune_gated_row` sets both.
        self.gated_row: tuple | None = None
        self.gated_activation: str | None = None
        # A projection behind a layer's RMSNorm: the GEMV config that applies the norm to its one row.
        self.normed_row: tuple | None = None

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: list[int],
                       weight_loader: WeightLoader) -> None:
        weight = set_split_dims(nn.Parameter(torch.empty(sum(output_sizes), in_features)), output_dim=0, input_dim=1)
        weight.weight_loader = weight_loader
        layer.register_parameter("weight", weight)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.single_row is None or x.shape[0] != 1:  # the common case: no further call
            return F.linear(x, layer.weight, bias)
        return linear(x, layer.weight, bias, self.single_row)

    def apply_gated(self, layer: nn.Module, gate_up: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """layer(activation(gate_up)) for one row, in the GEMV `tune_gated_row` chose."""
        return linear_gated(gate_up, layer.weight, bias, self.gated_row, self.gated_activation)

    def tune_gated_row(self, layer: nn.Module, activation: str, timings: dict) -> str | None:
        """Times the activation fused into this (down) projection's one-row GEMV against the two kernels."""
        weight = layer.weight
        if weight.device.type != "cuda" or not FUSE_GATED_ROW:
            return None
        key = ("gated", activation, tuple(weight.shape), weight.dtype)
        if key not in timings:
            timings[key] = fastest_gated_row_kernel(weight, activation, self.single_row)
        self.gated_row, separate, fused = timings[key]
        self.gated_activation = activation if self.gated_row is not None else None
        if self.gated_row is None:
            return None
        return (f"{weight.shape[0]}x{weight.shape[1]} after {activation}: one GEMV {self.gated_row} {fused * 1e3:.1f} us "
                f"(two kernels {separate * 1e3:.1f} us)")

    def apply_normed(self, layer: nn.Module, hidden: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module):
        """(layer(norm(hidden + residual)), hidden + residual) for one row, in the GEMV `tune_normed_row` chose."""
        return linear_normed(hidden, residual, norm.weight, norm.eps, layer.weight, layer.bias, self.normed_row)

    def tune_normed_row(self, layer: nn.Module, timings: dict) -> str | None:
        """Times the RMSNorm before this projection fused into its one-row GEMV against the two kernels."""
        weight = layer.weight
        if weight.device.type != "cuda" or not FUSE_NORM_ROW:
            return None
        key = ("normed", tuple(weight.shape), weight.dtype)
        if key not in timings:
            timings[key] = fastest_normed_row_kernel(weight, self.single_row)
        self.normed_row, separate, fused = timings[key]
        if self.normed_row is None:
            return None
        return (f"{weight.shape[0]}x{weight.shape[1]} after its norm: one GEMV {self.normed_row} {fused * 1e3:.1f} us "
                f"(two kernels {separate * 1e3:.1f} us)")

    def tune_single_row(self, layer: nn.Module, timings: dict) -> str | None:
        weight = layer.weight
        key = (tuple(weight.shape), weight.dtype)
        if weight.device.type == "cpu":
            return self._choose_cpu_layout(weight, key, timings)
        if key in timings:
            self.single_row = timings[key][0]
            return None
        timings[key] = fastest_single_row_kernel(weight)
        self.single_row, baseline, best = timings[key]
        if self.single_row is None:
            return None
        return f"{key[0][0]}x{key[0][1]}: {self.single_row} {best * 1e3:.1f} us (cuBLAS {baseline * 1e3:.1f} us)"

    @staticmethod
    def _choose_cpu_layout(weight: nn.Parameter, key: tuple, timings: dict) -> str | None:
        """On the CPU the choice is the weight's layout (see cpu_layout.py); F.linear reads either.
        A tied LM head shares its parameter with the embedding, which then reads the same layout."""
        if weight.numel() * weight.element_size() < MIN_TIMED_BYTES:
            return None
        first = key not in timings
        if first:
            timer = timings.setdefault("cpu one-row timer", OneRowTimer())  # one scratch buffer for all
            timings[key] = timer(weight.data)
        row_ms, column_ms = timings[key]
        if not prefers_column_major(row_ms, column_ms):
            return None
        if not is_column_major(weight):
            weight.data = column_major(weight.data)
        if not first:
            return None
        return f"{key[0][0]}x{key[0][1]}: column-major {column_ms * 1e3:.0f} us (row-major {row_ms * 1e3:.0f} us)"


class UnquantizedExpertsMethod(ExpertsMethodBase):
    """Every expert's gate|up in `w13_weight` [E, 2I, H] and down in `w2_weight` [E, H, I]."""

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        expert_param(layer, "w13_weight", torch.empty(num_experts, 2 * intermediate_size, hidden_size), 0)
        expert_param(layer, "w2_weight", torch.empty(num_experts, hidden_size, intermediate_size), 1)

    def experts(self, layer: nn.Module) -> tuple:
        return layer.w13_weight, layer.w2_weight


class UnquantizedConfig(QuantizationConfig):
    """No quantization: every linear layer gets its own `UnquantizedLinearMethod`."""

    name = None

    def get_quant_method(self, layer: nn.Module, prefix: str) -> UnquantizedLinearMethod:
        return UnquantizedLinearMethod()

    def get_experts_method(self, layer: nn.Module, prefix: str) -> UnquantizedExpertsMethod:
        return UnquantizedExpertsMethod()
