"""A mixture-of-experts feed-forward: every expert's gate|up and down weights stacked in two tensors,
so that one fused kernel runs the whole layer; each checkpoint tensor loads by (shard, expert id).
Tensor-parallel as a dense MLP is: every rank holds every expert's slice of the intermediate size
(gate|up rows, down columns), and the ranks' partial outputs are summed."""
from __future__ import annotations

import torch
from torch import nn

from asyncserve.errors import ConfigError
from asyncserve.kernels import fused_moe
from asyncserve.layers.parallel_state import all_reduce, tp_rank, tp_size
from asyncserve.layers.quantization import QuantizationConfig
from asyncserve.config.tp_shapes import divide

# shard -> the parameter that holds it: gate and up stacked in w13 (gate rows first), down in w2.
EXPERT_SHARDS = {"gate": "w13_weight", "up": "w13_weight", "down": "w2_weight"}
# The same for the experts' biases (GPT-OSS): w13_bias [E, 2I], w2_bias [E, H].
EXPERT_BIAS_SHARDS = {"gate": "w13_bias", "up": "w13_bias", "down": "w2_bias"}


class FusedMoE(nn.Module):
    """hidden [T, H] and router logits [T, E] -> [T, H]: each token through its top-k experts'
    SwiGLU MLPs, weighted by the softmax over the router logits (top-k weights rescaled to sum to 1
    if `renormalize`). GPT-OSS's experts: `has_bias` (w13_bias, w2_bias) and `activation`
    "swigluoai" (the clamped SwiGLU, with `swiglu_alpha` and `swiglu_limit`)."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, quant_config: QuantizationConfig | None = None, prefix: str = "",
                 reduce_results: bool = True, *, has_bias: bool = False, activation: str = "silu",
                 swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0):
        super().__init__()
        if quant_config is not None and quant_config.name is not None:
            raise ConfigError(f"{prefix}: quantized MoE experts ({quant_config.name}) are not supported; "
                              "serve the unquantized checkpoint of this model")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.tp_size = tp_size()
        self.whole_intermediate_size = intermediate_size
        # This rank's slice of each expert's intermediate size; `reduce_results` False: the caller sums.
        intermediate_size = divide(intermediate_size, self.tp_size, f"{prefix} moe_intermediate_size")
        self.intermediate_start = tp_rank() * intermediate_size
        self.intermediate_size = intermediate_size
        self.reduce_results = reduce_results
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.w13_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size)) if has_bias else None
        self.w2_bias = nn.Parameter(torch.empty(num_experts, hidden_size)) if has_bias else None
        self.activation_options = {"activation": activation}
        if activation == "swigluoai":
            self.activation_options.update(swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)
        # What the loader must fill: every (shard, expert) of each parameter.
        for w13, w2 in ((self.w13_weight, self.w2_weight), (self.w13_bias, self.w2_bias)):
            if w13 is None:
                continue
            w13.weight_loader = w2.weight_loader = self.weight_loader
            w13.shard_ids = [(shard, e) for shard in ("gate", "up") for e in range(num_experts)]
            w2.shard_ids = [("down", e) for e in range(num_experts)]

    @torch.no_grad()
    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: tuple[str, int]) -> None:
        shard, expert = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} of a layer with {self.num_experts} experts")
        target = param[expert]
        if shard != "down":
            size = self.intermediate_size
            target = target[:size] if shard == "gate" else target[size:]
        if param.dim() == 2:  # a bias: gate / up [I] are sliced as their rows; down [H] is added once
            if shard == "down" and tp_rank() > 0:
                loaded_weight = torch.zeros_like(loaded_weight)  # the ranks' partial sums carry it once
            elif shard != "down" and self.tp_size > 1 and loaded_weight.shape == (self.whole_intermediate_size,):
                loaded_weight = loaded_weight.narrow(0, self.intermediate_start, self.intermediate_size)
        elif self.tp_size > 1:  # [I, H] gate / up rows or [H, I] down columns: this rank's slice of I
            dim = 1 if shard == "down" else 0
            if loaded_weight.dim() != 2 or loaded_weight.shape[dim] != self.whole_intermediate_size:
                raise ValueError(f"expert {expert}'s {shard} projection has shape {tuple(loaded_weight.shape)}, "
                                 f"expected {self.whole_intermediate_size} along dim {dim}")
            loaded_weight = loaded_weight.narrow(dim, self.intermediate_start, self.intermediate_size)
        if loaded_weight.shape != target.shape:
            raise ValueError(f"expert {expert}'s {shard} projection has shape {tuple(loaded_weight.shape)}, "
                             f"expected {tuple(target.shape)}")
        target.copy_(loaded_weight)

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        out = fused_moe(hidden, self.w13_weight, self.w2_weight, router_logits, self.top_k, self.renormalize,
                        w13_bias=self.w13_bias, w2_bias=self.w2_bias, **self.activation_options)
        return all_reduce(out) if self.reduce_results else out
