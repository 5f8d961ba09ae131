"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary,
padded to a multiple of the ranks. The embedding looks up the ids in its slice and the ranks sum
(all-reduce); the LM head computes its slice's logits and the ranks gather them into the whole row.
At tensor_parallel_size 1 they are a plain lookup and a plain linear layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asyncserve.layers.linear import Linear, default_weight_loader
from asyncserve.layers.parallel_state import all_reduce, tp_rank, tp_size
from asyncserve.layers.quantization import QuantizationConfig


class VocabParallelEmbedding(nn.Module):
    """ids [T] -> [T, E]; `weight` [ceil(V / ranks), E] is this rank's slice, its padding rows zero."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.tp_size = tp_size()
        self.per_rank = -(-vocab_size // self.tp_size)
        self.start = tp_rank() * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden_size))
        self.weight.weight_loader = self.weight_loader

    @torch.no_grad()
    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if self.tp_size == 1:
            default_weight_loader(param, loaded_weight)
            return
        if loaded_weight.shape != (self.vocab_size, param.shape[1]):
            raise ValueError(f"checkpoint tensor has shape {tuple(loaded_weight.shape)}, expected "
                             f"({self.vocab_size}, {param.shape[1]})")
        rows = max(0, min(self.per_rank, self.vocab_size - self.start))
        param.zero_()
        param[:rows].copy_(loaded_weight[self.start:self.start + rows])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        hidden = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(hidden.masked_fill(outside.unsqueeze(-1), 0.0))


def lm_head(hidden_size: int, vocab_size: int, quant_config: QuantizationConfig | None = None,
            tied_to: VocabParallelEmbedding | None = None) -> Linear:
    """[T, E] -> [T, V]: column-parallel over the vocabulary, sliced as the embedding is (whose weight
    it shares when `tied_to`), the logits gathered over the ranks."""
    return Linear(hidden_size, vocab_size, quant_config=quant_config if tied_to is None else None,
                  prefix="lm_head", shared_weight=tied_to.weight if tied_to is not None else None,
                  parallel="column", gather_output=True)
