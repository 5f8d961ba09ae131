"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the (padded)
vocabulary. The embedding looks up the ids in its slice and the ranks sum (all-reduce); the LM head
computes its slice's logits and the ranks gather them into the whole row."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asyncserve.layers.linear import Linear
from asyncserve.layers.parallel_state import all_gather_last_dim, all_reduce, tp_rank, tp_size


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // tp_size())      # padded: the last rank's tail rows stay zero
        self.start = tp_rank() * self.per_rank
        self.weight = nn.Parameter(torch.zeros(self.per_rank, hidden_size))
        self.weight.weight_loader = self.weight_loader

    @torch.no_grad()
    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if loaded_weight.shape[1:] != param.shape[1:] or loaded_weight.shape[0] < self.vocab_size:
            raise ValueError(f"checkpoint tensor has shape {tuple(loaded_weight.shape)}, expected "
                             f"({self.vocab_size}, {param.shape[1]})")
        rows = max(0, min(self.per_rank, self.vocab_size - self.start))
        param.zero_()
        param[:rows].copy_(loaded_weight[self.start:self.start + rows])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        hidden = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(hidden.masked_fill(outside.unsqueeze(-1), 0.0))


class ParallelLMHead(Linear):
    """[T, E] -> [T, V]: this rank's vocabulary slice, gathered over ranks (padding trimmed)."""

    def __init__(self, hidden_size: int, vocab_size: int, embedding: VocabParallelEmbedding | None = None,
                 prefix: str = "lm_head"):
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // tp_size())
        self.start = tp_rank() * self.per_rank
        super().__init__(hidden_size, self.per_rank, prefix=prefix,
                         shared_weight=embedding.weight if embedding is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_last_dim(super().forward(x))[..., :self.vocab_size]

    @torch.no_grad()
    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        rows = max(0, min(self.per_rank, self.vocab_size - self.start))
        param.zero_()
        param[:rows].copy_(loaded_weight[self.start:self.start + rows])
