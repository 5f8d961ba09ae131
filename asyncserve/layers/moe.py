"""A mixture-of-experts feed-forward: every expert's gate|up and down weights stacked per layer, so that
one fused kernel runs the whole layer; each checkpoint tensor loads by (shard, expert id). How the
experts are stored (plain, GPTQ / AWQ integers, FP8) is the quantization config's experts method.
Tensor-parallel as a dense MLP is: every rank holds every expert's slice of the intermediate size
(gate|up rows, down columns), and the ranks' partial outputs are summed."""
from __future__ import annotations

import os

import torch
from torch import nn

from asyncserve.errors import ConfigError
from asyncserve.kernels import fused_moe, use_triton
from asyncserve.kernels.moe_row import MOE_ROW_CONFIGS, fused_moe_row_applies, fused_moe_row_triton
from asyncserve.layers.single_row import fastest, time_ms
from asyncserve.layers.parallel_state import all_reduce, tp_rank, tp_size
from asyncserve.layers.quantization import QuantizationConfig, UnquantizedExpertsMethod
from asyncserve.config.tp_shapes import divide

# The experts' biases (GPT-OSS): w13_bias [E, 2I], w2_bias [E, H].
EXPERT_BIAS_SHARDS = {"gate": "w13_bias", "up": "w13_bias", "down": "w2_bias"}


def expert_param_name(shard: str, tensor: str) -> str:
    """The stacked parameter of a checkpoint's per-expert tensor: ('up', 'qweight') -> 'w13_qweight'."""
    return f"{'w2' if shard == 'down' else 'w13'}_{tensor}"


SUPPORTED_EXPERT_METHODS = ("gptq", "awq", "fp8", "compressed-tensors")

# One token's layer in two kernels (kernels/moe_row.py) where start-up timing finds it faster than the grouped
# path's six. On by default since an H100 run (its GPU tests passed; Qwen3-30B-A3B batch-1 215.6 -> 235.8
# tok/s); ASYNCSERVE_MOE_ONE_ROW=0 keeps the grouped path.
TUNE_ONE_ROW_MOE = os.environ.get("ASYNCSERVE_MOE_ONE_ROW", "1") != "0"


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
        self.prefix = prefix
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size = hidden_size
        self.tp_size = tp_size()
        self.whole_intermediate_size = intermediate_size
        # This rank's slice of each expert's intermediate size; `reduce_results` False: the caller sums.
        intermediate_size = divide(intermediate_size, self.tp_size, f"{prefix} moe_intermediate_size")
        self.intermediate_start = tp_rank() * intermediate_size
        self.intermediate_size = intermediate_size
        self.reduce_results = reduce_results
        self.quant_method = (UnquantizedExpertsMethod() if quant_config is None
                             else quant_config.get_experts_method(self, prefix))
        if self.quant_method is None:
            raise ConfigError(f"{prefix}: quantized MoE experts ({quant_config.name}) are not supported "
                              f"(supported: {', '.join(SUPPORTED_EXPERT_METHODS)}); serve the unquantized "
                              "checkpoint of this model")
        self.quant_method.create_weights(self, num_experts, hidden_size, intermediate_size)
        self.w13_bias = self.w2_bias = None
        if has_bias:
            self.w13_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size))
            self.w2_bias = nn.Parameter(torch.empty(num_experts, hidden_size))
            for name, dim in (("w13_bias", 0), ("w2_bias", None)):
                param = getattr(self, name)
                param.expert_dim, param.expert_pack, param.weight_loader = dim, 1, self.weight_loader
                shards = ("down",) if name == "w2_bias" else ("gate", "up")
                param.shard_ids = [(shard, e) for shard in shards for e in range(num_experts)]
        self.activation_options = {"activation": activation}
        if activation == "swigluoai":
            self.activation_options.update(swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)
        self.one_row_config = None  # a MOE_ROW_CONFIGS entry: one token takes the two-kernel path

    @torch.no_grad()
    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: tuple[str, int]) -> None:
        """One expert's checkpoint tensor into its place: this rank's slice of the intermediate size
        along the parameter's `expert_dim` (in `expert_pack` channels per element), gate then up."""
        shard, expert = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} of a layer with {self.num_experts} experts")
        target = param.data[expert]
        dim, pack = param.expert_dim, param.expert_pack
        if param is self.w2_bias and tp_rank() > 0:
            loaded_weight = torch.zeros_like(loaded_weight)  # the ranks' partial sums carry it once
        if dim is not None:
            size = self.intermediate_size // pack
            if self.tp_size > 1:
                whole = self.whole_intermediate_size // pack
                if loaded_weight.dim() <= dim or loaded_weight.shape[dim] != whole:
                    raise ValueError(f"expert {expert}'s {shard} projection has shape "
                                     f"{tuple(loaded_weight.shape)}, expected {whole} along dim {dim}")
                loaded_weight = loaded_weight.narrow(dim, self.intermediate_start // pack, size)
            if shard != "down":
                target = target.narrow(dim, 0 if shard == "gate" else size, size)
        if loaded_weight.shape != target.shape:
            raise ValueError(f"expert {expert}'s {shard} projection has shape {tuple(loaded_weight.shape)}, "
                             f"expected {tuple(target.shape)}")
        target.copy_(loaded_weight)

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_weights_after_loading(self)

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        w13, w2 = self.quant_method.experts(self)
        moe = fused_moe
        options = dict(w13_bias=self.w13_bias, w2_bias=self.w2_bias, **self.activation_options)
        if self.one_row_config is not None and hidden.shape[0] == 1:
            moe, options["config"] = fused_moe_row_triton, self.one_row_config
        out = moe(hidden, w13, w2, router_logits, self.top_k, self.renormalize, **options)
        return all_reduce(out) if self.reduce_results else out

    @torch.inference_mode()
    def tune_single_row_fusions(self, timings: dict) -> list[str]:
        """Times one token's layer through the grouped path and each MOE_ROW_CONFIGS entry (once per shape),
        keeping the fastest two-kernel config where it beats the grouped path (see TUNE_ONE_ROW_MOE)."""
        w13, w2 = self.quant_method.experts(self)
        if not TUNE_ONE_ROW_MOE or not isinstance(w13, torch.Tensor) or not use_triton(w13):
            return []
        hidden = torch.randn(1, self.hidden_size, dtype=w13.dtype, device=w13.device)
        if not fused_moe_row_applies(hidden, w13):
            return []
        key = ("one-row MoE", tuple(w13.shape), tuple(w2.shape), w13.dtype, self.top_k, self.renormalize,
               self.w13_bias is not None, tuple(self.activation_options.items()))
        first = key not in timings
        if first:
            timings[key] = fastest_one_row_moe(self, hidden, w13, w2)
        self.one_row_config, grouped_ms, row_ms = timings[key]
        if not first or self.one_row_config is None:
            return []
        return [f"MoE {self.num_experts} experts top-{self.top_k}, one token: two kernels {self.one_row_config} "
                f"{row_ms * 1e3:.1f} us (grouped path {grouped_ms * 1e3:.1f} us)"]


def fastest_one_row_moe(layer: FusedMoE, hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor):
    """(config or None, grouped ms, its ms): each call routes to other experts (eight router logit rows in
    turn), so the experts' weights come from memory as in decode, not from the L2."""
    logits = [torch.randn(1, layer.num_experts, dtype=hidden.dtype, device=hidden.device) for _ in range(8)]
    options = dict(w13_bias=layer.w13_bias, w2_bias=layer.w2_bias, **layer.activation_options)

    def timed(moe, **extra) -> float:
        def run():
            for row in logits:
                moe(hidden, w13, w2, row, layer.top_k, layer.renormalize, **options, **extra)
        return time_ms(run, repeats=5) / len(logits)

    grouped = timed(fused_moe)
    best, best_time = fastest(MOE_ROW_CONFIGS, lambda config: timed(fused_moe_row_triton, config=config), grouped)
    return best, grouped, best_time
