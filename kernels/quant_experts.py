"""`QuantExperts`, the quantized experts one grouped GEMM reads (kernels/moe_quant.py's docstring has the two
layouts). A module of its own, with no Triton kernel: the kernel tests reload the kernel modules to run them
in Triton's interpreter, and a class redefined by a reload would no longer match the instances the layers
built from the first definition (`isinstance` in kernels/moe.py)."""

from typing import NamedTuple

import torch

from .int_packing import dequantize_int_rows


class QuantExperts(NamedTuple):
    """One grouped GEMM's experts, quantized (see the module docstring for the two layouts)."""

    weight: torch.Tensor             # int32 [E, K * bits // 32, N] or e4m3 [E, N, K]
    scales: torch.Tensor             # [E, G, N] (int) or float32 [E, N] (fp8)
    zeros: torch.Tensor | None       # [E, G, N] (int); None for fp8
    group_size: int = 0              # int: inputs per group (K for one group)
    bits: int = 8

    @property
    def is_fp8(self) -> bool:
        return self.zeros is None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(E, N, K): the float B this stands for."""
        if self.is_fp8:
            return tuple(self.weight.shape)
        num_experts, packed_rows, n = self.weight.shape
        return num_experts, n, packed_rows * 32 // self.bits

    def dequantize(self, expert: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Expert `expert`'s float weight [N, K], computed in float32."""
        if self.is_fp8:
            return (self.weight[expert].float() * self.scales[expert].float()[:, None]).to(dtype)
        k = self.shape[2]
        return dequantize_int_rows(self.weight[expert], self.scales[expert], self.zeros[expert], self.group_size,
                                   self.bits, k).t().contiguous().to(dtype)
