"""Pooling for embedding models: one vector per sequence from its prompt's final hidden states.

Works on a whole step at once (one gather or one segment sum for every sequence in it), and across
chunked prefill: a prompt split over steps carries its partial value (the running sum for MEAN, the first
row for CLS) from one step to the next.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class Pooler:
    def __init__(self, pooling_type: str, normalize: bool):
        self.pooling_type = pooling_type  # "LAST", "MEAN" or "CLS"
        self.normalize = normalize        # the model's default; a request may override it

    @property
    def carries_partials(self) -> bool:
        """Whether a prompt computed over several steps needs a value carried between them."""
        return self.pooling_type != "LAST"

    def step_values(self, hidden: torch.Tensor, first_rows: torch.Tensor, last_rows: torch.Tensor,
                    segment_ids: torch.Tensor | None, num_seqs: int) -> torch.Tensor:
        """[T, E] hidden rows of a step -> [S, E] float32: each sequence's part of its pooled value."""
        if self.pooling_type == "LAST":
            return hidden[last_rows].float()
        if self.pooling_type == "CLS":
            return hidden[first_rows].float()
        sums = torch.zeros(num_seqs, hidden.shape[1], dtype=torch.float32, device=hidden.device)
        return sums.index_add_(0, segment_ids, hidden.float())

    def combine(self, values: torch.Tensor, carried_index: torch.Tensor, carried: torch.Tensor) -> torch.Tensor:
        """Folds the values carried from earlier chunks ([C, E], rows `carried_index` of `values`) in."""
        if self.pooling_type == "MEAN":
            return values.index_add_(0, carried_index, carried)
        return values.index_copy_(0, carried_index, carried)  # CLS: the first chunk's row

    def finish(self, values: torch.Tensor, num_tokens: torch.Tensor | None, dimensions: torch.Tensor | None,
               normalize: torch.Tensor | None) -> torch.Tensor:
        """[F, E] pooled values of the sequences whose prompts ended -> their embeddings.

        `num_tokens` [F] divides MEAN sums; `dimensions` [F] zeroes each row past its Matryoshka size
        (before normalizing, so that the kept part is the normalized truncation); `normalize` [F] bool
        overrides the model's setting per row (None: the model's setting for all).
        """
        if self.pooling_type == "MEAN":
            values = values / num_tokens[:, None]
        if dimensions is not None:
            columns = torch.arange(values.shape[1], device=values.device)
            values = values * (columns[None, :] < dimensions[:, None])
        if normalize is None:
            return F.normalize(values, dim=-1) if self.normalize else values
        return torch.where(normalize[:, None], F.normalize(values, dim=-1), values)
