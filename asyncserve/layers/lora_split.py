"""Which part of a LoRA adapter one tensor-parallel rank holds: A and B cut as the layer cuts its weight
(vLLM's split), so an adapter arrives whole, as PEFT saved it, and every rank takes its own part.

- column-parallel (QKV, gate|up, every slice of a fused layer on its own): A [r, in] whole on every rank, B
  [out_slice, r] cut to this rank's rows of that slice by the base weight's rule (heads; KV heads replicated
  where the layer replicates them; zeros past the end of a padded part). The rank's delta is its columns of
  the whole delta, beside its columns of the base product: nothing to communicate.
- row-parallel (o_proj, down_proj): A cut to this rank's columns of the input, B whole. Each rank adds
  `scale * (x_shard @ A_shard.T) @ B.T` to its partial product before the layer's own all-reduce, which
  sums the ranks' shrunk rows through B as it sums the base products (the expand is linear), giving
  `scale * x @ A.T @ B.T` once. So LoRA adds no collective and nothing to capture in CUDA graphs; each rank
  pays a [T, r] x [r, out] expand and holds B whole (out x r per adapter, small beside the layer's weight).
  vLLM's default RowParallelLinearWithLoRA does the same; its fully sharded variant all-reduces the [T, r]
  shrunk rows to cut B too, one more collective per layer to save that small B.
- replicated, or tensor_parallel_size 1: the whole adapter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from asyncserve.errors import LoRAAdapterError


@dataclass(frozen=True)
class LoRASplit:
    whole_in_features: int
    whole_widths: tuple[int, ...]             # each slice's outputs in the whole layer
    input_part: tuple[int, int] | None        # (start, size) of the inputs this rank multiplies; None: all
    output_parts: tuple[tuple[int, int], ...] | None  # per slice, (start, size) of its outputs here; None: all

    @classmethod
    def of(cls, layer) -> "LoRASplit":
        """The split of a `LinearBase` (layers/linear.py), read from what the layer holds."""
        return cls(whole_in_features=layer.whole_in_features, whole_widths=tuple(layer.whole_output_sizes),
                   input_part=(layer.input_start, layer.in_features) if layer.input_parallel else None,
                   output_parts=tuple(layer.output_parts) if layer.output_parallel else None)

    def check(self, a: torch.Tensor, b: torch.Tensor, index: int) -> None:
        """The whole slice's A [r, in] and B [out, r] fit the whole layer's slice `index`."""
        width = self.whole_widths[index]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != self.whole_in_features or b.shape[0] != width:
            raise LoRAAdapterError(f"An adapter slice of shape A{tuple(a.shape)} B{tuple(b.shape)} does not fit "
                                   f"a projection of {self.whole_in_features} -> {width}.")

    def rank_part(self, a: torch.Tensor, b: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's A and B of slice `index`, from the whole slice's."""
        if self.input_part is not None:
            start, size = self.input_part
            a = a.narrow(1, start, size)
        if self.output_parts is not None:
            start, size = self.output_parts[index]
            present = max(0, min(start + size, b.shape[0]) - start)
            part = b.narrow(0, start, present)
            if present < size:  # a padded part (an evenly cut gathered output) runs past the last row
                part = torch.cat([part, part.new_zeros(size - present, b.shape[1])])
            b = part
        return a, b
