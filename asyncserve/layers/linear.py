"""Linear layers: the weight is created and multiplied by the layer's linear method (plain or
quantized), and each parameter loads itself from the checkpoint; fused projections (QKV, gate|up)
stack several checkpoint tensors in one weight."""
from __future__ import annotations

import logging

import torch
from torch import nn

from asyncserve.layers.quantization import QuantizationConfig, UnquantizedConfig, UnquantizedLinearMethod
from asyncserve.layers.single_row import SingleRowKernel, linear

__all__ = ["LinearBase", "Linear", "MergedLinear", "Conv1DLinear", "SingleRowKernel", "default_weight_loader",
           "linear", "tune_single_row_products"]

logger = logging.getLogger("asyncserve")

_UNQUANTIZED = UnquantizedConfig()


@torch.no_grad()
def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    """Copies a whole checkpoint tensor (cast to the parameter's dtype) after checking its shape."""
    if param.shape != loaded_weight.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded_weight.shape)}, the parameter "
                         f"expects {tuple(param.shape)}")
    param.copy_(loaded_weight)


class LinearBase(nn.Module):
    """x [T, in] -> [T, sum(output_sizes)] through `quant_method`, which owns the weight."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool,
                 quant_config: QuantizationConfig | None, prefix: str,
                 shared_weight: nn.Parameter | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = sum(output_sizes)
        self.output_sizes = output_sizes
        self.prefix = prefix
        if shared_weight is not None:  # tied embeddings: the weight is another module's, plain
            self.quant_method = UnquantizedLinearMethod()
            self.weight = shared_weight
        else:
            self.quant_method = (quant_config or _UNQUANTIZED).get_quant_method(self, prefix)
            self.quant_method.create_weights(self, in_features, output_sizes, self.weight_loader)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features))
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, *shard_id) -> None:
        raise NotImplementedError


class Linear(LinearBase):
    """One projection; `shared_weight` reuses another module's parameter (a tied LM head)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 quant_config: QuantizationConfig | None = None, prefix: str = "",
                 shared_weight: nn.Parameter | None = None):
        super().__init__(in_features, [out_features], bias, quant_config, prefix, shared_weight)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        default_weight_loader(param, loaded_weight)


class MergedLinear(LinearBase):
    """One matmul for several projections: output rows stacked in `shard_sizes` order, each shard
    filled from its own checkpoint tensor (shard_id = its key)."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False,
                 quant_config: QuantizationConfig | None = None, prefix: str = ""):
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (start, size)
            start += size
        super().__init__(in_features, list(shard_sizes.values()), bias, quant_config, prefix)

    @torch.no_grad()
    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str) -> None:
        start, size = self.shard_offsets[shard_id]
        if loaded_weight.shape[0] != size or loaded_weight.shape[1:] != param.shape[1:]:
            raise ValueError(f"checkpoint shard {shard_id!r} has shape {tuple(loaded_weight.shape)}, "
                             f"expected {size} rows of {tuple(param.shape[1:])}")
        param[start:start + size].copy_(loaded_weight)


def tune_single_row_products(model: nn.Module) -> None:
    """Lets every linear layer's method time its one-row kernels (batch-1 decode) on this device: on a
    GPU the kernel, on the CPU the weight's layout (cpu_layout.py)."""
    timings: dict = {}
    report = []
    for module in model.modules():
        if isinstance(module, LinearBase):
            line = module.quant_method.tune_single_row(module, timings)
            if line is not None:
                report.append(line)
    on_cpu = next(model.parameters()).device.type == "cpu"
    logger.info("one-row products: %s", "; ".join(report) or (
        "weights as loaded (row-major) for every shape" if on_cpu else "cuBLAS GEMM for every shape"))


class Conv1DLinear(Linear):
    """GPT-2's Conv1D: the checkpoint stores a plain weight as [in, out]; it is transposed at load, so
    the layer multiplies like any other. Quantized tensors (GPTQ's qweight, ...) load as they are."""

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if param is getattr(self, "weight", None) and loaded_weight.dim() == 2:
            loaded_weight = loaded_weight.t()
        default_weight_loader(param, loaded_weight)
