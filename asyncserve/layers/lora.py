"""LoRA on the linear layers: a wrapper around a layer's linear method that adds each row's adapter delta
after the base product, so every quantization method (and the single-row kernels) keep working beneath it.

`LoRASlots` is the GPU side of the adapters one step may use: `max_loras` slots, a scale per slot, and a
persistent [max_tokens] buffer holding each row's slot for the step (-1: the base model), which the runner
fills before the forward; the wrapped layers read its first T entries, so CUDA graphs capture them like any
other static input. A layer's adapter weights live in stacked [slots, r, in] / [slots, out_slice, r] tensors,
one pair per slice of a fused projection (Q, K, V; gate, up), zero where an adapter leaves a slice alone, the
rank padded with zeros to `max_lora_rank` (zero rows and columns add nothing). Under tensor parallelism each
rank's stacks hold its part of every adapter, cut as the layer's weight is (layers/lora_split.py).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from asyncserve.errors import LoRAAdapterError
from asyncserve.kernels.lora import lora_expand, lora_shrink, prepare_lora_tables
from asyncserve.kernels.lora_grouped import lora_expand_grouped, lora_shrink_grouped, lora_slot_groups
from asyncserve.kernels.lora_segments import lora_expand_chunks, lora_shrink_chunks
from asyncserve.layers.lora_split import LoRASplit


# Decode steps group their rows by adapter (kernels/lora_grouped.py) instead of running each row alone. Built
# without a GPU run: off until tests/gpu/test_lora_cuda.py and the batch-64 figure have run with it on.
GROUPED_DECODE = os.environ.get("ASYNCSERVE_LORA_GROUPED") == "1"


class LoRASlots:
    def __init__(self, max_loras: int, max_lora_rank: int, max_tokens: int, device: torch.device,
                 dtype: torch.dtype | None = None):
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        self.dtype = dtype  # the adapters' element type (the model's); None: each layer's weight dtype
        self.token_slots = torch.full((max_tokens,), -1, dtype=torch.int32, device=device)
        self.scales = torch.zeros(max_loras, dtype=torch.float32, device=device)
        self.layers: dict[str, LoRALinearMethod] = {}
        self.checkpoint_prefix = ""  # the checkpoint's decoder prefix, absent from our module names
        # False while no row of the step has an adapter: eager forwards skip the two launches per layer.
        # CUDA graphs are captured with it True, so a replay serves any mix (base rows return at once).
        self.active = True
        # Eager steps with prompt chunks: [chunks, 3] (first row, rows, slot) for the tiled kernels of
        # kernels/lora_segments.py (each adapter tile read once per chunk); None: the per-row kernels.
        self.chunks: torch.Tensor | None = None
        # The rows grouped by slot (kernels/lora_grouped.py), refilled with the slot table each step: buffers
        # the captured decode graphs read. None: the per-row kernels.
        self.groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if GROUPED_DECODE and torch.device(device).type == "cuda":
            self.groups = (torch.zeros(max_tokens, dtype=torch.int32, device=device),
                           torch.zeros(max_loras, dtype=torch.int32, device=device),
                           torch.zeros(max_loras, dtype=torch.int32, device=device))

    def set_token_slots(self, slots: torch.Tensor) -> None:
        """Each row's slot for the next forward (rows past it keep -1: graph padding runs the base)."""
        self.token_slots[:slots.shape[0]].copy_(slots, non_blocking=True)
        self.token_slots[slots.shape[0]:].fill_(-1)
        if self.groups is not None:
            lora_slot_groups(self.token_slots, self.max_loras, *self.groups)

    def clear_token_slots(self) -> None:
        """Every row on the base model (a graph replayed for such a step adds nothing)."""
        self.token_slots.fill_(-1)
        if self.groups is not None:
            self.groups[2].zero_()  # no rows in any slot's group

    def load(self, slot: int, weights: dict[str, list], scaling: float) -> None:
        """An adapter's per-module slices (checkpoints/peft_adapter.py's `LoRAAdapter.weights`) into `slot`;
        modules it does not name are zeroed there, so the slot holds this adapter alone."""
        adapter_names = {name.removeprefix(self.checkpoint_prefix): name for name in weights}  # ours -> its
        unknown = sorted(name for ours, name in adapter_names.items() if ours not in self.layers)
        if unknown:
            raise LoRAAdapterError(f"The adapter names modules this model does not have or does not adapt: "
                                   f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}.")
        for name, method in self.layers.items():
            method.load_slot(slot, weights.get(adapter_names.get(name, "")))
        self.scales[slot] = scaling

    def shapes(self) -> dict[str, tuple[int, list[int]]]:
        """Each adapted layer's whole (input size, output slices), by the checkpoint's name (as PEFT names them
        and saves them: the same on every tensor-parallel rank)."""
        return {self.checkpoint_prefix + name: (method.split.whole_in_features, list(method.split.whole_widths))
                for name, method in self.layers.items()}

    def clear(self, slot: int) -> None:
        for method in self.layers.values():
            method.load_slot(slot, None)
        self.scales[slot] = 0.0


class LoRALinearMethod:
    """The base method's product, then each row's `scale * x @ A.T @ B.T` added in place (two launches); a
    row-parallel layer's partial product gets this rank's partial delta, summed by the layer's all-reduce."""

    def __init__(self, base, layer: nn.Module, slots: LoRASlots):
        self.base = base
        self.slots = slots
        self.split = LoRASplit.of(layer)
        self.widths = list(layer.output_sizes)  # this rank's part of each slice
        self.offsets = [sum(self.widths[:i]) for i in range(len(self.widths))]
        # A quantized layer (GPTQ, AWQ, FP8) keeps its own weights; its adapters are in the model's dtype.
        weight = next(iter(layer.parameters()))
        dtype = slots.dtype or (weight.dtype if weight.dtype.is_floating_point else torch.bfloat16)
        rank, loras, device = slots.max_lora_rank, slots.max_loras, weight.device
        self.lora_a = [torch.zeros(loras, rank, layer.in_features, dtype=dtype, device=device) for _ in self.widths]
        self.lora_b = [torch.zeros(loras, width, rank, dtype=dtype, device=device) for width in self.widths]
        prepare_lora_tables(self.lora_a, self.lora_b, self.offsets)  # before any CUDA graph capture

    # Neither a norm nor an activation joins the GEMV here: the adapter's shrink reads the projection's input.
    gated_row = None
    normed_row = None

    def tune_gated_row(self, layer: nn.Module, activation: str, timings: dict) -> None:
        return None

    def tune_normed_row(self, layer: nn.Module, timings: dict) -> None:
        return None

    def __getattr__(self, name):  # everything else (create_weights, tune_single_row, ...) is the base's
        return getattr(self.base, name)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = self.base.apply(layer, x, bias)
        if not self.slots.active:
            return out
        slots = self.slots.token_slots[:x.shape[0]]
        chunks = self.slots.chunks
        if chunks is not None and x.is_cuda:
            return self._apply_chunks(x, out, chunks)
        if self.slots.groups is not None and x.is_cuda:
            return self._apply_grouped(x, out, self.slots.groups)
        y = lora_shrink(x.to(self.lora_a[0].dtype), self.lora_a, slots)
        if out.dtype != self.lora_b[0].dtype:  # a quantized layer's output in another dtype: added after
            delta = torch.zeros_like(out, dtype=self.lora_b[0].dtype)
            return out + lora_expand(y, self.lora_b, slots, self.slots.scales, delta, self.offsets).to(out.dtype)
        return lora_expand(y, self.lora_b, slots, self.slots.scales, out, self.offsets)

    def _apply_chunks(self, x: torch.Tensor, out: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
        y = lora_shrink_chunks(x.to(self.lora_a[0].dtype), self.lora_a, chunks)
        target = out if out.dtype == self.lora_b[0].dtype else torch.zeros_like(out, dtype=self.lora_b[0].dtype)
        lora_expand_chunks(y, self.lora_b, chunks, self.slots.scales, target, self.offsets)
        return out if target is out else out + target.to(out.dtype)

    def _apply_grouped(self, x: torch.Tensor, out: torch.Tensor, groups) -> torch.Tensor:
        y = lora_shrink_grouped(x.to(self.lora_a[0].dtype), self.lora_a, *groups)
        target = out if out.dtype == self.lora_b[0].dtype else torch.zeros_like(out, dtype=self.lora_b[0].dtype)
        lora_expand_grouped(y, self.lora_b, *groups, self.slots.scales, target, self.offsets)
        return out if target is out else out + target.to(out.dtype)

    @torch.no_grad()
    def load_slot(self, slot: int, pairs: list | None) -> None:
        pairs = pairs or [None] * len(self.widths)
        if len(pairs) != len(self.widths):
            raise LoRAAdapterError(f"{len(pairs)} slices given for a projection of {len(self.widths)}.")
        for index, (a_stack, b_stack, pair) in enumerate(zip(self.lora_a, self.lora_b, pairs)):
            a_stack[slot].zero_()
            b_stack[slot].zero_()
            if pair is None:
                continue
            a, b = pair
            rank = a.shape[0]
            if rank > self.slots.max_lora_rank:
                raise LoRAAdapterError(f"The adapter's rank {rank} is over max_lora_rank="
                                       f"{self.slots.max_lora_rank}: raise --max-lora-rank.")
            self.split.check(a, b, index)
            a, b = self.split.rank_part(a, b, index)
            a_stack[slot, :rank].copy_(a)
            b_stack[slot, :, :rank].copy_(b)


def enable_lora(model: nn.Module, slots: LoRASlots, target_modules: set[str] | None = None) -> list[str]:
    """Wraps the linear methods of the layers whose last name is in `target_modules` (our fused names:
    qkv_proj, o_proj, gate_up_proj, down_proj; None: every linear layer of the model but the LM head, which
    adapters may not target); returns the wrapped layers' names."""
    from asyncserve.layers.linear import LinearBase
    slots.checkpoint_prefix = getattr(model, "checkpoint_prefix", "")
    # Never the LM head: its input holds the sampled rows only, not the step's rows that the slot table and
    # prompt chunks index (wrapped, the chunk kernels read past it on the GPU).
    lm_head = getattr(model, "lm_head", None)
    for name, module in model.named_modules():
        if module is lm_head or not isinstance(module, LinearBase):
            continue
        if target_modules is None or name.rpartition(".")[2] in target_modules:
            module.quant_method = LoRALinearMethod(module.quant_method, module, slots)
            slots.layers[name] = module.quant_method
    return list(slots.layers)
