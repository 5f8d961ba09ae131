"""Linear layers, tensor-parallel by construction (Megatron's split): a layer holds this rank's part of
its weight, created and multiplied by the linear method (plain or quantized) its quantization config
chose, and every parameter loads its part from the whole checkpoint tensor. At tensor_parallel_size 1
every part is the whole, nothing communicates and `forward` is the linear method's product alone.

- column-parallel (`parallel="column"`, and every `MergedLinear`): this rank's rows of the output (QKV by
  heads, gate|up by intermediate slice); nothing to communicate, unless `gather_output` (the LM head).
- row-parallel (`parallel="row"`): this rank's columns of the input; the ranks' partial products are
  summed (all-reduce) and the bias is added once, after the sum.
- replicated (`parallel=None`): every rank holds the whole weight (MoE routers, OPT's project_in/out).
"""
from __future__ import annotations

import functools
import logging
from typing import Literal

import torch
from torch import nn

from asyncserve.layers.parallel_state import all_gather_last_dim, all_reduce, tp_rank, tp_size
from asyncserve.layers.quantization import QuantizationConfig, UnquantizedConfig, UnquantizedLinearMethod
from asyncserve.layers.norm import norm_in
from asyncserve.layers.single_row import SingleRowKernel, linear
from asyncserve.config.tp_shapes import divide, heads_per_rank

__all__ = ["LinearBase", "Linear", "MergedLinear", "qkv_linear", "SingleRowKernel", "default_weight_loader",
           "linear", "tune_single_row_products"]

logger = logging.getLogger("asyncserve")

_UNQUANTIZED = UnquantizedConfig()
Parallel = Literal["column", "row"] | None


@torch.no_grad()
def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    """Copies a whole checkpoint tensor (cast to the parameter's dtype) after checking its shape."""
    if param.shape != loaded_weight.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded_weight.shape)}, the parameter "
                         f"expects {tuple(param.shape)}")
    param.copy_(loaded_weight)


def _check_extent(loaded: torch.Tensor, dim: int, whole: int, pack: int, what: str) -> None:
    """The checkpoint tensor holds the layer's `whole` outputs (inputs) along `dim`, `pack` per element."""
    if loaded.dim() <= dim or loaded.shape[dim] * pack != whole:
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, expected {whole} {what}"
                         + (f" ({whole // pack} elements of {pack})" if pack > 1 else "") + f" along dim {dim}")


def _narrow(loaded: torch.Tensor, dim: int, start: int, size: int, whole: int, pack: int,
            what: str) -> torch.Tensor:
    """[start, start + size) of a checkpoint tensor's `whole` outputs (inputs) along `dim`, where one
    element holds `pack` of them; zero rows past `whole` (a padded vocabulary's last rank)."""
    _check_extent(loaded, dim, whole, pack, what)
    if start % pack or size % pack:
        raise ValueError(f"this rank's {what} [{start}, {start + size}) do not fall on whole elements of {pack}")
    present = max(0, min(start + size, whole) - start)
    part = loaded.narrow(dim, start // pack, present // pack)
    if present < size:
        padding = list(part.shape)
        padding[dim] = (size - present) // pack
        part = torch.cat([part, part.new_zeros(padding)], dim)
    return part


class LinearBase(nn.Module):
    """x [T, in] -> [T, sum(output_sizes)] through `quant_method`, which owns the weight.

    `in_features`, `output_sizes` and `out_features` are what this rank holds and multiplies; the whole
    layer's are `whole_in_features` and `whole_output_sizes`. `shard_offsets` (fused layers) places each
    checkpoint shard in this rank's rows: name -> (start, size)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool,
                 quant_config: QuantizationConfig | None, prefix: str, *, parallel: Parallel = None,
                 shard_names: list[str] | None = None, output_parts: list[tuple[int, int]] | None = None,
                 gather_output: bool = False, reduce_results: bool = True,
                 shared_weight: nn.Parameter | None = None, checkpoint_transposed: bool = False):
        super().__init__()
        self.prefix = prefix
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.whole_in_features, self.whole_output_sizes = in_features, list(output_sizes)
        self.reduce_results = reduce_results
        if shared_weight is not None:  # tied embeddings: the weight is another module's, plain
            self.quant_method = UnquantizedLinearMethod()
        else:
            self.quant_method = (quant_config or _UNQUANTIZED).get_quant_method(self, prefix)
        split = self.tp_size > 1 and parallel is not None
        # A layout whose input groups are scattered (GPTQ act-order) cannot hold a slice of the input:
        # such a row-parallel layer gathers its input and splits its output instead.
        self.gather_input = split and parallel == "row" and not self.quant_method.splits_input
        if self.gather_input:
            parallel, gather_output = "column", True
        self.input_parallel = split and parallel == "row"
        self.output_parallel = split and parallel == "column"
        self.gather_output = self.output_parallel and gather_output
        self.communicates = self.input_parallel or self.gather_output

        self.in_features = (divide(in_features, self.tp_size, f"{prefix} input size") if self.input_parallel
                            else in_features)
        self.input_start = self.tp_rank * self.in_features if self.input_parallel else 0
        if not self.output_parallel:
            output_parts = [(0, size) for size in output_sizes]
        elif output_parts is None or self.gather_input:
            output_parts = [self._even_part(size, padded=gather_output) for size in output_sizes]
        self.output_parts = output_parts
        self.output_sizes = [size for _, size in output_parts]
        self.out_features = sum(self.output_sizes)
        if shard_names is not None:
            local = whole = 0
            self.shard_offsets: dict[str, tuple[int, int]] = {}
            self.whole_shard_offsets: dict[str, tuple[int, int]] = {}
            for name, (_, size), whole_size in zip(shard_names, output_parts, output_sizes, strict=True):
                self.shard_offsets[name], self.whole_shard_offsets[name] = (local, size), (whole, whole_size)
                local, whole = local + size, whole + whole_size
            self.shard_index = {name: i for i, name in enumerate(shard_names)}

        if shared_weight is not None:
            self.weight = shared_weight
        else:
            self.quant_method.create_weights(self, self.in_features, self.output_sizes, self.weight_loader)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features))
            self.bias.weight_loader = self.weight_loader
            self.bias.output_dim = 0
        else:
            self.register_parameter("bias", None)
        for name, param in self.named_parameters(recurse=False):
            if param is not shared_weight:
                param.weight_loader = functools.partial(self._load, param.weight_loader,
                                                        checkpoint_transposed and name == "weight")

    def _even_part(self, size: int, padded: bool) -> tuple[int, int]:
        """This rank's (start, size) of `size` outputs; `padded`: ceil(size / ranks) each, the tail zero."""
        per_rank = -(-size // self.tp_size) if padded else divide(size, self.tp_size, f"{self.prefix} output size")
        return self.tp_rank * per_rank, per_rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.communicates:  # one rank, or a column-parallel layer: the product alone
            return self.quant_method.apply(self, x, self.bias)
        if self.input_parallel:
            if not self.reduce_results:  # the caller sums (with other partial results): bias on rank 0
                return self.quant_method.apply(self, x, self.bias if self.tp_rank == 0 else None)
            out = all_reduce(self.quant_method.apply(self, x, None))
            return out if self.bias is None else out + self.bias
        if self.gather_input:
            x = all_gather_last_dim(x)
        out = all_gather_last_dim(self.quant_method.apply(self, x, self.bias))
        whole = sum(self.whole_output_sizes)
        return out if out.shape[-1] == whole else out[..., :whole]

    def forward_activated(self, act: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
        """self(act(gate_up)); one row (batch-1 decode) may run both in the GEMV the method chose for it."""
        if (gate_up.shape[0] != 1 or self.communicates
                or getattr(self.quant_method, "gated_row", None) is None
                or getattr(act, "gemv_activation", None) != self.quant_method.gated_activation):
            return self(act(gate_up))
        return self.quant_method.apply_gated(self, gate_up, self.bias)

    def forward_normed(self, norm: nn.Module, hidden: torch.Tensor, residual: torch.Tensor | None):
        """(self(norm(hidden + residual)), hidden + residual): a pre-norm layer's norm and the projection after
        it (residual None: the first layer's, norm(hidden) and hidden). One row (batch-1 decode) may run both
        in the GEMV the method chose for it."""
        if (hidden.shape[0] == 1 and not self.communicates and getattr(norm, "gemv_fusable", False)
                and getattr(self.quant_method, "normed_row", None) is not None):
            return self.quant_method.apply_normed(self, hidden.contiguous(),
                                                  None if residual is None else residual.contiguous(), norm)
        normed, residual = norm_in(norm, hidden, residual)
        return self(normed), residual

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, *shard_id) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def _load(self, load_part, transpose: bool, param: nn.Parameter, loaded: torch.Tensor,
              shard_id: str | None = None) -> None:
        """Every parameter's weight_loader: the checkpoint tensor in our layout (GPT-2's Conv1D stores
        [in, out]), cut to this rank's part, then placed by the method's (or the layer's) loader."""
        if transpose and loaded.dim() == 2:
            loaded = loaded.t()
        output_dim = getattr(param, "output_dim", None)
        if (self.output_parallel and shard_id is None and getattr(self, "shard_offsets", None)
                and output_dim is not None and loaded.numel() > 1):
            # One checkpoint tensor for several shards (Phi-3's qkv_proj): each shard cut on its own.
            pack = getattr(param, "output_pack", 1)
            _check_extent(loaded, output_dim, sum(self.whole_output_sizes), pack, "outputs")
            for name, (start, size) in self.whole_shard_offsets.items():
                self._load(load_part, False, param, loaded.narrow(output_dim, start // pack, size // pack), name)
            return
        if self.tp_size > 1 and loaded.numel() > 1:  # a single number (a per-tensor scale) is everyone's
            if self.output_parallel and output_dim is not None:
                index = self.shard_index[shard_id] if shard_id is not None else 0
                start, size = self.output_parts[index]
                loaded = _narrow(loaded, output_dim, start, size, self.whole_output_sizes[index],
                                 getattr(param, "output_pack", 1), "outputs")
            input_dim = getattr(param, "input_dim", None)
            if self.input_parallel and input_dim is not None:
                loaded = _narrow(loaded, input_dim, self.input_start, self.in_features, self.whole_in_features,
                                 getattr(param, "input_pack", 1), "inputs")
        if shard_id is None:
            load_part(param, loaded)
        else:
            load_part(param, loaded, shard_id)


class Linear(LinearBase):
    """One projection; `shared_weight` reuses another module's parameter (a tied LM head);
    `checkpoint_transposed`: the checkpoint stores the plain weight as [in, out] (GPT-2's Conv1D)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 quant_config: QuantizationConfig | None = None, prefix: str = "",
                 shared_weight: nn.Parameter | None = None, *, parallel: Parallel = None,
                 gather_output: bool = False, reduce_results: bool = True, checkpoint_transposed: bool = False):
        super().__init__(in_features, [out_features], bias, quant_config, prefix, parallel=parallel,
                         gather_output=gather_output, reduce_results=reduce_results, shared_weight=shared_weight,
                         checkpoint_transposed=checkpoint_transposed)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        default_weight_loader(param, loaded_weight)


class MergedLinear(LinearBase):
    """One column-parallel matmul for several projections: output rows stacked in `shard_sizes` order,
    each shard filled from its own checkpoint tensor (shard_id = its key), or all from one tensor
    (`fused_in_checkpoint`). With `head_dim`, shards split by whole heads, replicated over ranks where
    a shard has fewer heads than ranks (KV heads)."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False,
                 quant_config: QuantizationConfig | None = None, prefix: str = "", *,
                 head_dim: int | None = None, fused_in_checkpoint: bool = False,
                 checkpoint_transposed: bool = False):
        # The checkpoint modules behind the layer (what quantization configs name), None: one tensor.
        self.checkpoint_shards = None if fused_in_checkpoint else list(shard_sizes)
        rank, size = tp_rank(), tp_size()
        parts = []
        for name, whole in shard_sizes.items():
            if head_dim is None:
                per_rank = divide(whole, size, f"{prefix} {name} size")
                parts.append((rank * per_rank, per_rank))
                continue
            heads = whole // head_dim
            per_rank = heads_per_rank(heads, size, f"{prefix} {name} heads")
            first = rank * heads // size if heads < size else rank * per_rank
            parts.append((first * head_dim, per_rank * head_dim))
        super().__init__(in_features, list(shard_sizes.values()), bias, quant_config, prefix, parallel="column",
                         shard_names=list(shard_sizes), output_parts=parts,
                         checkpoint_transposed=checkpoint_transposed)

    @torch.no_grad()
    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | None = None) -> None:
        if shard_id is None:  # the checkpoint's one fused tensor, on one rank
            default_weight_loader(param, loaded_weight)
            return
        start, size = self.shard_offsets[shard_id]
        if loaded_weight.shape[0] != size or loaded_weight.shape[1:] != param.shape[1:]:
            raise ValueError(f"checkpoint shard {shard_id!r} has shape {tuple(loaded_weight.shape)}, "
                             f"expected {size} rows of {tuple(param.shape[1:])}")
        param[start:start + size].copy_(loaded_weight)


def qkv_linear(hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool = False,
               quant_config: QuantizationConfig | None = None, prefix: str = "",
               shard_names: tuple[str, str, str] = ("q_proj", "k_proj", "v_proj"), *,
               fused_in_checkpoint: bool = False, checkpoint_transposed: bool = False) -> MergedLinear:
    """Q, K and V in one matmul, cut by heads; the layer's `num_heads` and `num_kv_heads` are this
    rank's (KV heads replicated when fewer than ranks)."""
    size = tp_size()
    heads = divide(num_heads, size, "num_attention_heads")
    kv_heads = heads_per_rank(num_kv_heads, size)
    q, k, v = shard_names
    layer = MergedLinear(hidden_size, {q: num_heads * head_dim, k: num_kv_heads * head_dim,
                                       v: num_kv_heads * head_dim},
                         bias, quant_config, prefix, head_dim=head_dim, fused_in_checkpoint=fused_in_checkpoint,
                         checkpoint_transposed=checkpoint_transposed)
    layer.num_heads, layer.num_kv_heads = heads, kv_heads
    return layer


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
    for module in model.modules():  # then what a block may fuse into those kernels (norms, activations)
        if hasattr(module, "tune_single_row_fusions"):
            report.extend(module.tune_single_row_fusions(timings))
    on_cpu = next(model.parameters()).device.type == "cpu"
    logger.info("one-row products: %s", "; ".join(report) or (
        "weights as loaded (row-major) for every shape" if on_cpu else "cuBLAS GEMM for every shape"))
